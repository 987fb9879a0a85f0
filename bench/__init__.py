"""Benchmarks: each measures its baseline in the same run and prints ratios.
Run as `.venv/bin/python -m bench.<name>` (add --quick for a short run)."""
