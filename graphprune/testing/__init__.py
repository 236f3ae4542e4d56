"""Helpers for tests and benchmarks (not used by the pruning pipeline itself)."""

from graphprune.testing.plant import PlantRecord, plant_zeros

__all__ = ["PlantRecord", "plant_zeros"]
