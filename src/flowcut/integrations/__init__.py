"""Integrations with evaluation and serving frameworks (optional extras; each imports its framework lazily)."""
