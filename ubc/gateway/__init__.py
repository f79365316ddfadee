"""OpenAI-compatible metered model gateway."""
