"""Members: registration, keys, admission, tiers, suspension, API-key grants."""
