"""merge: model merging and task-vector arithmetic.

Example::

    import merge

    src = merge.open_checkpoint("model/")  # lazy: headers only
    merge.merge_expression("base + 0.7 * (math - base)", {"base": "b/", "math": "m/"}, "out/")

Map of the package (where a format is read, where the output layout is chosen, where a new
method or CLI verb goes): docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from merge.version import __version__

# The public surface, imported on first use so `import merge` stays cheap.
_EXPORTS = {
    "open_checkpoint": "merge.io",
    "load_state_dict": "merge.io",
    "save_state_dict": "merge.io",
    "merge_expression": "merge.api",
    "evaluate_expression_in_memory": "merge.api",
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

if TYPE_CHECKING:  # the same names, for type checkers and IDEs (keep in step with _EXPORTS)
    from merge.api import evaluate_expression_in_memory as evaluate_expression_in_memory
    from merge.api import evaluate_recipe_in_memory as evaluate_recipe_in_memory
    from merge.api import merge_expression as merge_expression
    from merge.api import plan_recipe as plan_recipe
    from merge.api import run_recipe as run_recipe
    from merge.errors import MergeError as MergeError
    from merge.io import load_state_dict as load_state_dict
    from merge.io import open_checkpoint as open_checkpoint
    from merge.io import save_state_dict as save_state_dict
    from merge.methods import get_method as get_method
    from merge.methods import list_methods as list_methods
    from merge.methods import register as register
    from merge.recipe import load_recipe as load_recipe


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module `merge` has no attribute `{name}`")
