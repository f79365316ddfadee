"""The double-entry core: accounts, transfers, holds, linked batches."""
