"""ubc: a Universal Basic Compute ledger."""

__version__ = "0.1.0"
