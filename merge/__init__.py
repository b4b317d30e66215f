"""merge: model merging and task-vector arithmetic.

Example::

    import merge

    src = merge.open_checkpoint("model/")  # lazy: headers only
    merge.merge_expression("base + 0.7 * (math - base)", {"base": "b/", "math": "m/"}, "out/")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The public surface, imported on first use so `import merge` stays cheap.
_EXPORTS = {
    "open_checkpoint": "merge.io",
    "load_state_dict": "merge.io",
    "save_state_dict": "merge.io",
    "merge_expression": "merge.api",
    "run_recipe": "merge.api",
    "plan_recipe": "merge.api",
    "evaluate_recipe_in_memory": "merge.api",
    "load_recipe": "merge.recipe",
    "register": "merge.methods",
    "get_method": "merge.methods",
    "list_methods": "merge.methods",
    "MergeError": "merge.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module `merge` has no attribute `{name}`")
