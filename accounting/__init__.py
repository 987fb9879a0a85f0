"""Accounting: the usage ledger in Redis, prices, reports, exports, administration, and their gRPC
service. The gateway and the workers link only accounting.recorder, its seam."""
