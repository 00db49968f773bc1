"""Benchmarks of the Resultity node: `python -m bench` runs them all and writes the table."""
