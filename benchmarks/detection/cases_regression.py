"""Placeholder."""
CASES = ()
