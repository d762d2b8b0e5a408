"""Embeddable runtime that chains the built engines (not built yet)."""
