"""Values every render of the Helm chart needs: the chart refuses to render without them."""

from __future__ import annotations

import copy
from typing import Any

# The webhook receivers' networks (config.callbackAllowedNetworks): asked for, never assumed.
RECEIVERS = "10.20.64.0/20"


def with_receivers(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """`values` plus the receivers' networks, unless they choose otherwise."""
    merged = copy.deepcopy(values or {})
    config = merged.setdefault("config", {})
    if not config.get("callbackAllowAnyNetwork"):
        config.setdefault("callbackAllowedNetworks", RECEIVERS)
    return merged
