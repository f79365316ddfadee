"""Signed envelopes: payload schemas, the checks every envelope passes, the one write path."""
