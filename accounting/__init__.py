"""Accounting: the usage ledger in Redis, reports over it, and their gRPC service."""
