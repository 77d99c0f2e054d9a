"""OpenAI-compatible HTTP API over the engine (monolithic or an AFD attention rank)."""
