"""The ledger's configuration table now lives with the ledger (``ubc.ledger.models``)."""

from ubc.ledger.models import LedgerConfigRow

__all__ = ["LedgerConfigRow"]
