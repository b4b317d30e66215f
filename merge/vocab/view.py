"""Lazy views that show each input's token-indexed tensors in the output vocabulary's order.

`VocabView` wraps one input: its embedding and lm_head tensors have the output's row count,
row i being what `merge.vocab.fill` planned for output token i (its own row, another model's,
a mean, zeros or padding); every other tensor passes through. Rows are read on demand, a chunk
at a time, in runs of consecutive source rows, so a merge streams them like any tensor and
memory stays a chunk. `TokenizerLayout` wraps the output's layout input: its support files
lose their tokenizer files for the output tokenizer's, and config.json gets the new vocab size.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from merge.io.sources import TensorMeta, TensorSource
from merge.vocab.build import TOKENIZER_FILES
from merge.vocab.fill import Copy, Mean, RowPlan, Zero

if TYPE_CHECKING:
    from merge.io.writer import FilePlan, OutputTensor

# Rows per block when a view sums its own rows for the padding mean (float32 working set).
PAD_BLOCK_ELEMENTS = 1 << 22


class VocabTable:
    """What the views of one merge share: each input's source and token-indexed tensors, the
    tied aliases, and the row plans (one per model and group of models merged together).

    Args:
        sources: each checkpoint input's source (as opened: cast views included).
        names: each input's {view name: its own tensor}, for token-indexed tensors (an
            lm_head a tied model lacks maps to its input embedding).
        plan_rows: the fill rules for a group of models -> {model: RowPlan}.
        group_of: the models merged into a token-indexed tensor (its fill-rule group).
        size: the output's row count, padding included.
    """

    def __init__(
        self,
        sources: Mapping[str, TensorSource],
        names: Mapping[str, Mapping[str, str]],
        plan_rows: Callable[[Sequence[str]], dict[str, RowPlan]],
        group_of: Callable[[str], tuple[str, ...]],
        size: int,
    ):
        self.sources = dict(sources)
        self.names = {m: dict(n) for m, n in names.items()}
        self._plan_rows = plan_rows
        self._group_of = group_of
        self.size = size
        self._plans: dict[tuple[str, ...], dict[str, RowPlan]] = {}
        self._fill_keys: dict[tuple[str, str], np.ndarray] = {}
        self._pad: dict[tuple[str, str], Tensor] = {}
        self._lock = threading.Lock()

    def plan(self, model: str, name: str) -> RowPlan:
        group = self._group_of(name)
        if model not in group:  # read outside the merge (a layout-only input): its own group
            group = (*group, model)
        with self._lock:
            plans = self._plans.get(group)
            if plans is None:
                plans = self._plans[group] = self._plan_rows(group)
        return plans[model]

    def fill_keys(self, model: str, name: str) -> np.ndarray:
        key = (model, name)
        with self._lock:
            got = self._fill_keys.get(key)
        if got is None:
            got = np.array(sorted(self.plan(model, name).fills), dtype=np.int64)
            with self._lock:
                self._fill_keys[key] = got
        return got

    def row(self, model: str, name: str, row: int) -> Tensor:
        """Row `row` of `model`'s tensor shown as `name`, in float32."""
        real = self.names[model][name]
        src = self.sources[model]
        n = _row_numel(src.meta(real).shape)
        return src.read_range(real, row * n, (row + 1) * n).float()

    def fill_row(self, fill: Copy | Mean | Zero, name: str, n: int) -> Tensor:
        if isinstance(fill, Copy):
            return self.row(fill.row[0], name, fill.row[1])
        if isinstance(fill, Mean):
            total = torch.zeros(n, dtype=torch.float32)
            for model, r in fill.rows:
                total += self.row(model, name, r)
            return total / len(fill.rows)
        return torch.zeros(n, dtype=torch.float32)


def _row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


class VocabView(TensorSource):
    """Input `model` with its token-indexed tensors in the output vocabulary (see module doc)."""

    def __init__(self, model: str, table: VocabTable):
        self.model = model
        self.table = table
        self.source = table.sources[model]
        self.names = table.names[model]
        self.kind = self.source.kind
        self.path = self.source.path
        self._aligned_names: dict[str, bool] = {}

    def keys(self) -> list[str]:
        own = self.source.keys()
        have = set(own)
        return own + [n for n in self.names if n not in have]

    def _aligned(self, name: str) -> bool:
        """True when `name` is shown with rows other than the input's own, in order."""
        if name not in self.names:
            return False
        got = self._aligned_names.get(name)
        if got is None:
            real = self.names[name]
            rows = self.source.meta(real).shape[0]
            got = not self.table.plan(self.model, name).is_identity(rows)
            self._aligned_names[name] = got
        return got

    def meta(self, name: str) -> TensorMeta:
        real = self.names.get(name, name)
        m = self.source.meta(real)
        if not self._aligned(name):
            return m
        return TensorMeta((self.table.size, *m.shape[1:]), m.dtype, m.file, m.offset)

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        real = self.names.get(name, name)
        if not self._aligned(name):
            return self.source.read_range(real, start, stop, out=out)
        n = _row_numel(self.source.meta(real).shape)
        r0, r1 = start // n, -(-stop // n)
        flat = self._rows(name, r0, r1).reshape(-1)[start - r0 * n : stop - r0 * n]
        return out.copy_(flat) if out is not None else flat

    def _rows(self, name: str, r0: int, r1: int) -> Tensor:
        """Output rows [r0, r1) of `name`, shape (r1 - r0, row numel), in the input's dtype."""
        real = self.names[name]
        meta = self.source.meta(real)
        n = _row_numel(meta.shape)
        plan = self.table.plan(self.model, name)
        vocab = len(plan.own)
        buf = torch.zeros((r1 - r0, n), dtype=meta.dtype)
        a, b = r0, min(r1, vocab)
        if a < b:
            own = plan.own[a:b]
            at = np.flatnonzero(own >= 0)
            if at.size:
                # Runs consecutive in both the output and the input: one read each.
                cut = np.flatnonzero((np.diff(at) != 1) | (np.diff(own[at]) != 1)) + 1
                for run in np.split(at, cut):
                    s, k, o = int(own[run[0]]), len(run), int(run[0])
                    self.source.read_range(real, s * n, (s + k) * n, out=buf[o : o + k].view(-1))
            keys = self.table.fill_keys(self.model, name)
            lo, hi = np.searchsorted(keys, [a, b])
            for i in keys[lo:hi].tolist():
                buf[i - r0] = self.table.fill_row(plan.fills[i], name, n).to(meta.dtype)
        if r1 > vocab:
            buf[max(vocab, r0) - r0 :] = self._pad_row(name, vocab, n).to(meta.dtype)
        return buf

    def _pad_row(self, name: str, vocab: int, n: int) -> Tensor:
        """The mean of this view's rows [0, vocab): padding rows hold it (Hewitt's suggestion,
        as mergekit fills `pad_to_multiple_of` rows)."""
        key = (self.model, name)
        got = self.table._pad.get(key)
        if got is None:
            total = torch.zeros(n, dtype=torch.float64)
            step = max(1, PAD_BLOCK_ELEMENTS // max(n, 1))
            for s in range(0, vocab, step):
                total += self._rows(name, s, min(vocab, s + step)).double().sum(0)
            got = (total / max(vocab, 1)).float()
            self.table._pad[key] = got
        return got

    def files(self) -> list[Path]:
        return self.source.files()

    def root(self) -> Path | None:
        return self.source.root()

    def support_files(self) -> list[tuple[str, Path]]:
        return self.source.support_files()

    def plan_output(
        self, tensors: list[OutputTensor], *, shard_size: int, metadata: dict[str, str]
    ) -> tuple[list[FilePlan], dict[str, object]]:
        return self.source.plan_output(tensors, shard_size=shard_size, metadata=metadata)

    def fingerprint(self) -> dict[str, object]:
        return {**self.source.fingerprint(), "vocab_rows": self.table.size}

    def close(self) -> None:
        self.source.close()


def set_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    """config.json with `vocab_size` set wherever it is kept (top level, and `text_config` for
    models such as LLaVA whose embeddings live in the language model); top level if nowhere."""
    out = dict(config)
    placed = False
    if "vocab_size" in out:
        out["vocab_size"] = size
        placed = True
    text = out.get("text_config")
    if isinstance(text, dict) and "vocab_size" in text:
        out["text_config"] = {**text, "vocab_size": size}
        placed = True
    if not placed:
        out["vocab_size"] = size
    return out


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # copied as it is, as the engine copies an unreadable config
    return data if isinstance(data, dict) else None


def _is_tokenizer_file(rel: str) -> bool:
    return rel in TOKENIZER_FILES or rel.endswith(".tiktoken")


class TokenizerLayout(TensorSource):
    """The output's layout input with the output tokenizer's files in place of its own, and
    config.json's vocab size set (written to a temporary folder removed at close)."""

    def __init__(self, source: TensorSource, tokenizer: Any, vocab_size: int | None):
        self.source = source
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.kind = source.kind
        self.path = source.path
        self._tmp: Path | None = None

    def keys(self) -> list[str]:
        return self.source.keys()

    def meta(self, name: str) -> TensorMeta:
        return self.source.meta(name)

    def read_range(self, name: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return self.source.read_range(name, start, stop, out=out)

    def files(self) -> list[Path]:
        return self.source.files()

    def root(self) -> Path | None:
        return self.source.root()

    def fingerprint(self) -> dict[str, object]:
        return self.source.fingerprint()

    def plan_output(
        self, tensors: list[OutputTensor], *, shard_size: int, metadata: dict[str, str]
    ) -> tuple[list[FilePlan], dict[str, object]]:
        return self.source.plan_output(tensors, shard_size=shard_size, metadata=metadata)

    def support_files(self) -> list[tuple[str, Path]]:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="merge-vocab-"))
            self.tokenizer.save_pretrained(str(self._tmp / "tokenizer"))
        files = [(r, p) for r, p in self.source.support_files() if not _is_tokenizer_file(r)]
        if self.vocab_size is not None:
            out = []
            for rel, path in files:
                config = _json_object(path) if rel == "config.json" else None
                if config is not None:
                    path = self._tmp / "config.json"
                    path.write_text(
                        json.dumps(set_vocab_size(config, self.vocab_size), indent=2) + "\n"
                    )
                out.append((rel, path))
            files = out
        made = sorted((self._tmp / "tokenizer").iterdir())
        return files + [(p.name, p) for p in made if p.is_file()]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self.source.close()
