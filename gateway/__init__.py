"""The gateway: the public gRPC endpoint. Authenticates, dispatches to workers,
streams back, and records every request's usage."""
