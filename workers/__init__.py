"""The worker: a gRPC service around an inference engine for one model replica."""
