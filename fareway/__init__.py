"""Fareway's shared package: config, telemetry, gRPC server set-up, errors,
Redis connections, and the generated protobuf modules (fareway.<area>.v1)."""

__version__ = "0.1.0"
