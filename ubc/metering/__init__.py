"""Metered model calls: usage and expired holds — tables, rules and their writes.

The gateway (``ubc.gateway``) serves the OpenAI-compatible endpoint and places the holds;
what a call's journal entry does lives here, so that the auditor re-runs it without
importing the endpoint.
"""
