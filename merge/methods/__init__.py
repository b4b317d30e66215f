"""Merge methods: pure functions over float32 tensors, registered by name (no I/O here)."""

import merge.methods.catalogue  # noqa: F401  (registers the method catalogue)
from merge.methods import linear, task_arithmetic  # noqa: F401  (registers the methods)
from merge.methods._registry import MethodSpec, get_method, list_methods, register

__all__ = ["MethodSpec", "get_method", "list_methods", "register"]
