"""Live what-if: the served tokens scored under candidate KV configs (docs/what-if.md)."""
