"""The offline auditor: export, verify and restore a journal."""
