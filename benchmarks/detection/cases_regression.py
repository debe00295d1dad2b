"""Placeholder."""

CASES = ()
