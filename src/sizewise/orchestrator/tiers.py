"""The tier names, cheapest first: the one list the orchestrator, the config schema, the demo family
and the CLI read. Imports nothing (the CLI reads it before torch is loaded)."""

TIER_ORDER = ("small", "medium", "large")
