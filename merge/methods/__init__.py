"""Merge methods: pure functions over float32 tensors, registered by name (no I/O here).

A new method is one file here (docs/architecture.md, "Where would a new merge method go?").
"""

import merge.methods.catalogue  # noqa: F401  (registers the method catalogue)
from merge.methods import linear, task_arithmetic  # noqa: F401  (registers the methods)
from merge.methods._registry import MethodSpec, get_method, list_methods, register

__all__ = ["MethodSpec", "get_method", "list_methods", "register"]
