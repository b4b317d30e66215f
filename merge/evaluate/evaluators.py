"""Evaluators: `evaluator(model) -> dict[str, float]` with at least `loss`.

Built in: classification (cross-entropy loss and accuracy over `(inputs, targets)` batches, or
dict batches whose `labels` hold one class per example) and causal-LM loss and perplexity (dict
batches with `input_ids`; `merge.evaluate.lm` adds a local text file). A user's `--eval`
callable is wrapped so that its output is checked once, with a clear message.

Every evaluator is picklable when its data is (an entry-point string, a module-level factory or
a list), so the pool and Ray executors can ship it to their workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merge.errors import UsageError

Batch = Any
IGNORE_INDEX = -100  # label of positions that are not scored (PyTorch's and Hugging Face's default)
DataSpec = str | Callable[[], Iterable[Batch]] | Iterable[Batch]


class Evaluator(Protocol):
    def __call__(self, model: nn.Module) -> Mapping[str, float]: ...


class Batches:
    """A re-iterable view of the user's data: an iterable, a zero-argument factory or `module:function`.

    A factory is called again for every pass when what it returns can be iterated only once (a
    generator); a list or DataLoader is reused. A pass that yields nothing is an error that names
    the data, since a silent zero would read as a perfect score.
    """

    def __init__(self, spec: DataSpec, *, what: str = "--data", max_batches: int | None = None):
        self.spec = spec
        self.what = what
        self.max_batches = max_batches
        self._data: Iterable[Batch] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not isinstance(self.spec, Iterable) or isinstance(self.spec, str):
            state["_data"] = None  # rebuilt from the factory in the worker
        return state

    def _factory(self) -> Callable[[], Iterable[Batch]] | None:
        if isinstance(self.spec, str):
            from merge.entrypoints import resolve

            return resolve(self.spec, self.what)
        if callable(self.spec) and not isinstance(self.spec, Iterable):
            return self.spec
        return None

    def _fresh(self) -> Iterable[Batch]:
        factory = self._factory()
        if factory is None:
            return self.spec  # type: ignore[return-value]
        try:
            data = factory()
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(
                f"{self.what} `{_name(self.spec)}` raised {type(e).__name__}: {e}"
            ) from e
        if not isinstance(data, Iterable):
            raise UsageError(
                f"{self.what} `{_name(self.spec)}` returned {type(data).__name__}, which is not iterable"
            )
        return data

    def __iter__(self) -> Iterator[Batch]:
        if self._data is None or iter(self._data) is self._data:
            self._data = self._fresh()
        n = 0
        for batch in self._data:
            if self.max_batches is not None and n >= self.max_batches:
                break
            n += 1
            yield batch
        if n == 0:
            hint = ""
            if iter(self._data) is self._data and self._factory() is None:
                hint = " (it is a one-shot iterator that was already used up; pass a list, a DataLoader or a factory)"
            raise UsageError(
                f"{self.what} `{_name(self.spec)}` yielded no batches{hint}; an evaluation needs at least one"
            )


def as_batches(data: DataSpec | Batches, what: str = "--data") -> Batches:
    return data if isinstance(data, Batches) else Batches(data, what=what)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(to_device(v, device) for v in x)
    return x


def split_batch(batch: Batch, what: str = "--data") -> tuple[Any, Tensor | None]:
    """(model inputs, targets or None) for an `(inputs, targets)` pair or a keyword dict (with `labels`)."""
    if isinstance(batch, Mapping):
        return dict(batch), batch.get("labels")
    if isinstance(batch, tuple | list) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Tensor):
        return batch, None
    raise UsageError(
        f"{what}: a batch must be `(inputs, targets)` or a dict of keyword arguments for the model, "
        f"got {type(batch).__name__}"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: a tensor, a Hugging Face output's `.logits`, or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise UsageError(
        f"the model returned {type(output).__name__}; the built-in evaluators need logits (a tensor or `.logits`)"
    )


class ClassificationEvaluator:
    """Mean cross-entropy `loss` and `accuracy` (top-1, in [0, 1]) over every example of `data`."""

    kind = "classification"
    higher_is_better: ClassVar[dict[str, bool]] = {"loss": False, "accuracy": True}

    def __init__(self, data: DataSpec | Batches):
        self.data = as_batches(data)
        self.examples = 0

    def __call__(self, model: nn.Module) -> dict[str, float]:
        device = model_device(model)
        loss_sum, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for batch in self.data:
                inputs, targets = split_batch(batch, self.data.what)
                if inputs is None or targets is None:
                    raise UsageError(
                        f"{self.data.what}: classification needs `(inputs, targets)` batches or dicts with `labels`"
                    )
                logits = logits_of(call_model(model, to_device(inputs, device)))
                targets = targets.to(logits.device)
                if logits.dim() > 2:  # (batch, ..., classes): a per-position task
                    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
                keep = targets != IGNORE_INDEX  # padding and special tokens (Hugging Face's -100)
                logits, targets = logits[keep], targets[keep]
                loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
                correct += int((logits.argmax(-1) == targets).sum())
                n += int(targets.numel())
        if n == 0:
            raise UsageError(
                f"{self.data.what}: no labelled example (every target is {IGNORE_INDEX}, or the data is empty)"
            )
        self.examples = n
        return {"loss": loss_sum / n, "accuracy": correct / n}


class CausalLMEvaluator:
    """Token-weighted next-token `loss` (nats) and `perplexity` = exp(loss) over dict batches.

    Each batch needs `input_ids`; `labels` (with -100 for ignored positions) default to the
    inputs, and `attention_mask` zeros are ignored too. Logits at position t predict token t+1.
    """

    kind = "lm"
    higher_is_better: ClassVar[dict[str, bool]] = {"loss": False, "perplexity": False}

    def __init__(self, data: DataSpec | Batches):
        self.data = as_batches(data)
        self.tokens = 0

    def __call__(self, model: nn.Module) -> dict[str, float]:
        device = model_device(model)
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for batch in self.data:
                if not isinstance(batch, Mapping) or "input_ids" not in batch:
                    raise UsageError(
                        f"{self.data.what}: causal-LM evaluation needs dict batches with `input_ids`"
                    )
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                labels = batch.get("labels", batch["input_ids"]).clone()
                if "attention_mask" in batch and "labels" not in batch:
                    labels[batch["attention_mask"] == 0] = -100
                logits = logits_of(call_model(model, to_device(inputs, device)))
                labels = labels.to(logits.device)
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
                shift_labels = labels[:, 1:].reshape(-1)
                nll += float(
                    F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                )
                tokens += int((shift_labels != -100).sum())
        if tokens == 0:
            raise UsageError(
                f"{self.data.what}: no token to predict (every label is ignored or sequences have length 1)"
            )
        self.tokens = tokens
        loss = nll / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


class CallableEvaluator:
    """A user's `evaluate(model) -> dict[str, float]`, checked to return at least a numeric `loss`."""

    kind = "custom"

    def __init__(self, fn: str | Callable[[nn.Module], Mapping[str, float]]):
        self.fn = fn

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """The user function's own `higher_is_better` mapping (`evaluate.higher_is_better = {...}`)."""
        from merge.entrypoints import resolve

        declared = getattr(resolve(self.fn, "--eval"), "higher_is_better", None) or {}
        if not isinstance(declared, Mapping):
            raise UsageError(
                f"--eval `{_name(self.fn)}`: `higher_is_better` must be a dict of metric name -> bool"
            )
        return {str(k): bool(v) for k, v in declared.items()}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from merge.entrypoints import resolve

        fn = resolve(self.fn, "--eval")
        try:
            with torch.no_grad():
                out = fn(model)
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"--eval `{_name(self.fn)}` raised {type(e).__name__}: {e}") from e
        if not isinstance(out, Mapping):
            raise UsageError(
                f"--eval `{_name(self.fn)}` returned {type(out).__name__}; it must return a dict of floats with at least `loss`"
            )
        bad = [k for k, v in out.items() if not isinstance(v, int | float | Tensor)]
        if bad:
            raise UsageError(
                f"--eval `{_name(self.fn)}` returned non-numeric values for {', '.join(map(str, bad))}"
            )
        if "loss" not in out:
            raise UsageError(
                f"--eval `{_name(self.fn)}` returned {sorted(out)}; it must include `loss`"
            )
        return {str(k): float(v) for k, v in out.items()}


def builtin_evaluator(data: DataSpec | Batches) -> ClassificationEvaluator | CausalLMEvaluator:
    """Classification for `(inputs, targets)` batches and per-example labels; causal LM for token dicts."""
    batches = as_batches(data)
    first = next(iter(batches))
    if isinstance(first, Mapping) and "input_ids" in first:
        labels = first.get("labels")
        if labels is None or (
            isinstance(labels, Tensor) and labels.shape == first["input_ids"].shape
        ):
            return CausalLMEvaluator(batches)
    split_batch(first, batches.what)
    return ClassificationEvaluator(batches)


def make_evaluator(
    *,
    eval_fn: str | Callable[[nn.Module], Mapping[str, float]] | None = None,
    data: DataSpec | Batches | None = None,
    what: str = "--data",
) -> Evaluator:
    """The user's `--eval` if given, else the built-in evaluator that fits `data`."""
    if eval_fn is not None:
        return CallableEvaluator(eval_fn)
    if data is None:
        raise UsageError(
            f"give {what} (batches for a built-in evaluator) or --eval (your own evaluate(model) function)"
        )
    return builtin_evaluator(as_batches(data, what))


def _name(spec: object) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "__qualname__", type(spec).__name__)


class PrefixedEvaluators:
    """Several evaluators on one model: {"target": ev1, "control": ev2} -> target_loss, control_loss, ..."""

    kind = "prefixed"

    def __init__(self, evaluators: Mapping[str, Evaluator]):
        self.evaluators = dict(evaluators)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {
            f"{prefix}_{k}": v
            for prefix, ev in self.evaluators.items()
            for k, v in declared_directions(ev).items()
        }

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for prefix, ev in self.evaluators.items():
            out.update({f"{prefix}_{k}": float(v) for k, v in ev(model).items()})
        return out


def declared_directions(evaluator: object) -> dict[str, bool]:
    """Metric directions the evaluator declares (`higher_is_better`), then the user's overrides."""
    declared = dict(getattr(evaluator, "higher_is_better", None) or {})
    declared.update(getattr(evaluator, "direction_overrides", None) or {})
    return declared


def set_directions(
    evaluator: Evaluator, higher: Iterable[str] = (), lower: Iterable[str] = ()
) -> Evaluator:
    """Record the CLI's --higher-is-better/--lower-is-better names on `evaluator` (they win)."""
    higher, lower = list(higher), list(lower)
    both = sorted(set(higher) & set(lower))
    if both:
        raise UsageError(
            f"{', '.join(f'`{m}`' for m in both)} given to both --higher-is-better and --lower-is-better"
        )
    if higher or lower:
        overrides = {**dict.fromkeys(lower, False), **dict.fromkeys(higher, True)}
        evaluator.direction_overrides = overrides  # type: ignore[attr-defined]
        if isinstance(evaluator, PrefixedEvaluators):
            for ev in evaluator.evaluators.values():
                set_directions(ev, higher, lower)
    return evaluator
