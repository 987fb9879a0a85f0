"""Fareway's shared kernel: config, errors, gRPC server set-up, TLS, telemetry, API keys, request
validation, quotas, the worker registry, Redis (fareway.redis) and the generated protobuf modules
(fareway.<area>.v1). It imports none of the services (gateway, workers, accounting) nor the command
line (cli); see docs/architecture.md."""

__version__ = "0.1.0"
