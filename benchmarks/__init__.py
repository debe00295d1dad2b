"""Benchmarks of lightning-sentinel (detection quality, overhead); not part of the installed package."""
