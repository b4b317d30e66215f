"""One exception tree for every user-facing failure, each class with its exit code.

| class                    | exit | when                                                        |
| ------------------------ | ---- | ----------------------------------------------------------- |
| UsageError               | 2    | bad CLI usage, missing input path, unknown method/parameter |
| RecipeError              | 2    | a recipe that does not validate (all problems at once)      |
| FormatError              | 1    | unreadable/unknown/quantized checkpoint, unsafe pickle      |
| PlanError                | 1    | key or shape mismatch found from headers, refused output    |
| ExecutionError           | 1    | a tensor failed while merging (names tensor and step)       |
| DiskFullError            | 1    | not enough space, or the disk filled while writing          |
| Interrupted              | 130  | Ctrl-C, after the temporary output was removed              |
| Terminated               | 143  | SIGTERM, cleaned up like Ctrl-C (a KeyboardInterrupt)       |
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MergeError(Exception):
    """Base of every error `merge` raises for a user's input; `exit_code` is the CLI's status."""

    exit_code = 1


class UsageError(MergeError):
    exit_code = 2


class RecipeError(UsageError):
    """A recipe problem; `problems` holds every (key path, message) found, reported together."""

    def __init__(self, problems: list[tuple[str, str]] | str, source: str | None = None):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = problems
        self.source = source
        head = f"recipe {source} is invalid" if source else "the recipe is invalid"
        lines = [f"{head} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class FormatError(MergeError):
    pass


class PlanError(MergeError):
    pass


class ExecutionError(MergeError):
    pass


class DiskFullError(MergeError):
    pass


class Interrupted(MergeError):
    exit_code = 130


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler: everything that cleans up after Ctrl-C does after it too."""


class MergeWarning(UserWarning):
    """Warnings from `merge` itself (tests turn these into errors)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean `x`?)' suffix for the nearest valid name, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
