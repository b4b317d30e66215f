"""The path engine: named state dicts combined into one model instance, in place.

θ(w) = Σ_i w_i θ_i over named states θ_i (checkpoints, aligned copies, task-vector endpoints),
written straight into the model's own parameter and buffer storage:

- an interpolation path A→B is w = (1−α, α), computed with one `torch.lerp` per tensor;
- a task-vector scale θ0 + λτ, τ = θ1 − θ0, is w = (1−λ, λ) (negation: λ < 0);
- a plane θ0 + λ1τ1 + λ2τ2 is w = (1−λ1−λ2, λ1, λ2);
- a soup is w_i = 1/n over its ingredients.

A one-hot w copies that state bit for bit, so path endpoints are exactly the checkpoints.
Integer and boolean tensors (`num_batches_tracked`, masks) are never combined: they are taken
from the state with the largest weight. Nothing is written to disk per point.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from merge.errors import FormatError, UsageError
from merge.io.sources import TensorSource

StateLike = str | os.PathLike[str] | Mapping[str, Tensor] | nn.Module

FLOATS = (torch.float32, torch.float64)
CACHES = ("auto", "device", "cpu", "stream")


def read_state(spec: StateLike) -> dict[str, Tensor]:
    """A state dict in memory from a path (any layout `open_checkpoint` reads), a dict or a module."""
    if isinstance(spec, nn.Module):
        return {k: v.detach() for k, v in spec.state_dict().items()}
    if isinstance(spec, Mapping):
        return dict(spec)
    from merge.io import load_state_dict

    return load_state_dict(spec if isinstance(spec, str) else Path(spec))


def describe_state(spec: object) -> str:
    if isinstance(spec, str | os.PathLike):
        return str(spec)
    if isinstance(spec, nn.Module):
        return f"<{type(spec).__name__} instance>"
    return "<in-memory state dict>"


def tied_aliases(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{name: twin} for the names a checkpoint leaves out because the model ties them (lm_head = wte)."""
    have = set(names)
    by_ptr: dict[tuple[int, str], list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.device.type != "meta" and v.numel():
            by_ptr.setdefault((v.data_ptr(), str(v.device)), []).append(k)
    out = {}
    for group in by_ptr.values():
        present = [n for n in group if n in have]
        if present:
            out.update({n: present[0] for n in group if n not in have})
    return out


class Aliased(Mapping[str, Tensor]):
    """A tensor mapping plus alias names that read their twin's tensor (nothing is copied)."""

    def __init__(self, tensors: Mapping[str, Tensor], aliases: Mapping[str, str]):
        self.tensors, self.aliases = tensors, dict(aliases)

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[self.aliases.get(key, key)]

    def __iter__(self) -> Iterator[str]:
        yield from self.tensors
        yield from self.aliases

    def __len__(self) -> int:
        return len(self.tensors) + len(self.aliases)


class SourceTensors(Mapping[str, Tensor]):
    """A checkpoint's tensors read on demand from its `TensorSource` (mmap; nothing held)."""

    def __init__(self, source: TensorSource):
        self.source = source
        self._keys = list(source.keys())

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.source:
            raise KeyError(key)
        return self.source.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def with_tied_aliases(model: nn.Module, tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    aliases = tied_aliases(model, tensors.keys())
    return Aliased(tensors, aliases) if aliases else tensors


def has_batchnorm(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for m in model.modules()
    )


def available_ram() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; else free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_cache(model: nn.Module, n_states: int) -> str:
    """Where states live: beside the model ("device") when they fit, else CPU RAM, else streamed.

    Each state costs the model's size in float32; "device" may use 80% of a GPU's free memory,
    CPU RAM 50% of what is available.
    """
    need = n_states * sum(t.numel() * 4 for t in model.state_dict().values())
    ram = available_ram()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need < 0.8 * free:
            return "device"
        return "cpu" if need < 0.5 * ram else "stream"
    return "device" if need < 0.5 * ram else "stream"


class StateSpace:
    """Named states held for `model`, ready to be combined into its tensors with `apply`.

    Every state is checked against the model when it is added (missing, unexpected or mis-shaped
    names, all listed). `cache` says where states live:

    - "device": beside the model's tensors, in the model's float dtype when that is float32/64
      and in float32 otherwise (the combination is then computed in float32 and cast once);
    - "cpu": the same copies in CPU memory, moved to the model's device tensor by tensor;
    - "stream": nothing held for checkpoints on disk: every point reads the tensors it needs
      from the files (memory-mapped, so repeated points read from the page cache);
    - "auto": "device" when all states fit, else "cpu", else "stream" (`choose_cache`).
    """

    def __init__(
        self,
        model: nn.Module,
        states: Mapping[str, StateLike] | None = None,
        *,
        cache: str = "device",
    ):
        if cache not in CACHES:
            from merge.errors import did_you_mean

            raise UsageError(
                f"unknown cache `{cache}`{did_you_mean(cache, CACHES)}; choose one of {', '.join(CACHES)}"
            )
        self.model = model
        self.cache = choose_cache(model, len(states or {})) if cache == "auto" else cache
        self.targets: dict[str, Tensor] = {}
        seen: set[tuple[int, str]] = set()
        for k, v in model.state_dict(keep_vars=True).items():
            key = (v.data_ptr(), str(v.device))
            if v.numel() and key in seen:  # a tied alias: written once through its first name
                continue
            seen.add(key)
            self.targets[k] = v.data
        self.states: dict[str, Mapping[str, Tensor]] = {}
        self.sources: dict[str, str] = {}
        self._scratch: dict[str, Tensor] = {}
        for name, spec in (states or {}).items():
            self.add(name, spec)

    def add(self, name: str, spec: StateLike) -> None:
        from merge.entrypoints import load_weights

        if self.cache == "stream" and isinstance(spec, str | os.PathLike):
            from merge.io import open_checkpoint

            tensors: Mapping[str, Tensor] = SourceTensors(open_checkpoint(spec))
        else:
            tensors = read_state(spec)
        tensors = with_tied_aliases(self.model, tensors)
        # load_weights lists every mismatch with a fix; loading also leaves the model usable.
        try:
            load_weights(self.model, tensors, source=name)
        except FormatError as e:
            raise FormatError(f"{describe_state(spec)}: {e}") from None
        if isinstance(getattr(tensors, "tensors", tensors), SourceTensors):
            self.states[name] = tensors  # read per point
        else:
            home = None if self.cache == "device" else torch.device("cpu")
            self.states[name] = {
                k: tensors[k]
                .detach()
                .to(device=home or target.device, dtype=storage_dtype(target), copy=True)
                for k, target in self.targets.items()
            }
        self.sources[name] = describe_state(spec)

    def state(self, name: str) -> Mapping[str, Tensor]:
        return self.states[name]

    def _get(self, name: str, key: str, target: Tensor) -> Tensor:
        t = self.states[name][key]
        return t.to(device=target.device, dtype=storage_dtype(target), non_blocking=True)

    def apply(self, weights: Mapping[str, float]) -> None:
        """Write Σ_i w_i θ_i into the model, in place (no allocation for float32/64 models)."""
        unknown = [n for n in weights if n not in self.states]
        if unknown:
            raise UsageError(f"unknown state {unknown[0]!r}; known: {', '.join(self.states)}")
        terms = [(n, float(w)) for n, w in weights.items() if float(w) != 0.0]
        if not terms:
            raise UsageError("every weight of the combination is zero")
        dominant = max(weights, key=lambda n: float(weights[n]))
        one_hot = len(terms) == 1 and terms[0][1] == 1.0
        lerp = len(terms) == 2 and abs(terms[0][1] + terms[1][1] - 1.0) < 1e-12
        with torch.no_grad():
            for k, target in self.targets.items():
                if not target.is_floating_point():
                    target.copy_(self._get(dominant, k, target))
                    continue
                if one_hot:
                    target.copy_(self._get(terms[0][0], k, target))
                    continue
                out = target if target.dtype in FLOATS else self._buffer(k, target)
                if lerp:
                    (a, _), (b, wb) = terms
                    torch.lerp(self._get(a, k, target), self._get(b, k, target), wb, out=out)
                else:
                    n0, w0 = terms[0]
                    torch.mul(self._get(n0, k, target), w0, out=out)
                    for n, w in terms[1:]:
                        out.add_(self._get(n, k, target), alpha=w)
                if out is not target:
                    target.copy_(out)

    def _buffer(self, key: str, like: Tensor) -> Tensor:
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(
                like.shape, dtype=torch.float32, device=like.device
            )
        return buf


def storage_dtype(target: Tensor) -> torch.dtype:
    """float32/64 targets keep their dtype; half types are combined in float32; others as they are."""
    if target.is_floating_point():
        return target.dtype if target.dtype in FLOATS else torch.float32
    return target.dtype


def weighted_state(
    states: Mapping[str, StateLike], weights: Mapping[str, float]
) -> dict[str, Tensor]:
    """Σ_i w_i θ_i as a new state dict in each tensor's own dtype (float math in float32/64), no model needed.

    Non-float tensors come from the state with the largest weight, as on a path.
    """
    loaded = {n: read_state(states[n]) for n in weights}
    dominant = max(weights, key=lambda n: float(weights[n]))
    out: dict[str, Tensor] = {}
    for k, ref in loaded[dominant].items():
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        acc_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        acc = torch.zeros(ref.shape, dtype=acc_dtype)
        for n, w in weights.items():
            if float(w) != 0.0:
                acc.add_(loaded[n][k].to(acc_dtype), alpha=float(w))
        out[k] = acc.to(ref.dtype)
    return out
