"""A C2SP ``tlog-witness``: cosigns the checkpoints of the logs it is configured for.

- :mod:`ubc.witness.cosignature`: Ed25519 cosignatures (C2SP ``tlog-cosignature``,
  ``cosignature/v1``, key type 0x04): sign, verify, and the witness's vkey.
- :mod:`ubc.witness.protocol`: the ``add-checkpoint`` request, parsed strictly, and the
  checks a witness makes before it cosigns (C2SP ``tlog-witness``).
- :mod:`ubc.witness.store`: the latest cosigned checkpoint per origin, in SQLite or
  PostgreSQL, in a table of its own (not part of the ledger's schema).
- :mod:`ubc.witness.app`: the HTTP service, ``POST /add-checkpoint``.
- :mod:`ubc.witness.cosigning`: the ledger's side: it asks its own witnesses
  (``UBC_WITNESSES``) to cosign its checkpoints, in rounds run by a background task, and
  stores the cosignatures it verified (served by ``GET /journal/checkpoint``).
- :mod:`ubc.witness.quorum`: what a reader requires: valid cosignatures on a checkpoint
  from at least K of the witnesses it trusts (``ubc audit verify --witness``, ``ubc
  proof check --witness``).

The witness needs only the signed-note and Merkle code: it never imports the ledger's
write path. Documentation: docs/witness.md.
"""
