"""Bridges to other SAE libraries, each imported only when used: `rsae.integrations.saelens` (SAELens)."""
