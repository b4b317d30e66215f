"""Running a user's model over a user's data: batches in the DESIGN.md shapes, per example."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn


def iter_examples(batches: Iterable[Any], limit: int) -> Iterator[tuple[Any, Tensor | None]]:
    """Yield (model input, target or None) one example at a time, at most `limit` of them.

    A batch is `(inputs, targets)` or a dict of model keyword arguments (HF style, `labels`).
    """
    seen = 0
    for batch in batches:
        if isinstance(batch, Mapping):
            n = len(next(iter(v for v in batch.values() if isinstance(v, Tensor))))
            for i in range(n):
                ex = {k: (v[i : i + 1] if isinstance(v, Tensor) else v) for k, v in batch.items()}
                labels = ex.pop("labels", None)
                yield ex, labels
                seen += 1
                if seen >= limit:
                    return
        else:
            inputs, targets = batch[0], batch[1] if len(batch) > 1 else None
            for i in range(len(inputs)):
                yield inputs[i : i + 1], (targets[i : i + 1] if targets is not None else None)
                seen += 1
                if seen >= limit:
                    return


def forward_logits(model: nn.Module, example: Any) -> Tensor:
    """The model's logits for one example (`.logits` of HF outputs, first item of a tuple)."""
    out = model(**example) if isinstance(example, Mapping) else model(example)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"the model returned {type(out).__name__}, not logits")
    return out
