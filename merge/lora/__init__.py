"""LoRA deltas: per-module formulas, name maps, and the bake/combine/extract/convert operations.

Map of the package: docs/architecture.md.
"""
