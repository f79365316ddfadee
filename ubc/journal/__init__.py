"""Verifiable journal: RFC 9162 Merkle log, C2SP tiles, checkpoints and proofs."""
