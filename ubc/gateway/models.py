"""Tables of the metered model endpoint: they belong to the metering domain
(``ubc.metering.models``), which the auditor may import without the gateway."""

from ubc.metering.models import ApiKeySpend, GatewayHold, UsageRecord

__all__ = ["ApiKeySpend", "GatewayHold", "UsageRecord"]
