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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from merge.io.sources import TensorMeta, TensorSource
from merge.io.support_files import is_tokenizer_file, read_json
from merge.io.views import View
from merge.vocab.fill import Copy, Mean, RowPlan

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
        self.pad_means: dict[tuple[str, str], Tensor] = {}  # (model, tensor) -> mean row
        self._lock = threading.Lock()

    def plan_groups(self, groups: Iterable[tuple[str, ...]]) -> None:
        """Plan these groups now (so every per-token problem is found before any read)."""
        for group in groups:
            if group not in self._plans:
                self._plans[group] = self._plan_rows(group)

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

    def read_into(
        self, model: str, name: str, rows: np.ndarray, buf: Tensor, at: np.ndarray
    ) -> None:
        """buf[at[k]] = row rows[k] of `model`'s tensor shown as `name`: one read per run that
        is consecutive in both `at` and `rows`, straight into `buf` when the dtypes agree
        (reads into our buffers skip the sources' NaN check: the engine checks its results)."""
        if rows.size == 0:
            return
        real = self.names[model][name]
        src = self.sources[model]
        n = buf.shape[1]
        flat = buf.view(-1)
        starts = np.concatenate(
            ([0], np.flatnonzero((np.diff(at) != 1) | (np.diff(rows) != 1)) + 1)
        )
        sizes = np.diff(np.concatenate((starts, [rows.size])))
        same = src.meta(real).dtype == buf.dtype  # a peer of another dtype is cast on the way
        for s, o, k in zip(rows[starts].tolist(), at[starts].tolist(), sizes.tolist()):
            if same:
                src.read_range(real, s * n, (s + k) * n, out=flat[o * n : (o + k) * n])
            else:
                flat[o * n : (o + k) * n] = src.read_range(real, s * n, (s + k) * n)

    def gather(self, model: str, name: str, rows: np.ndarray, n: int, dtype: torch.dtype) -> Tensor:
        """Rows `rows` of `model`'s tensor shown as `name`, shape (len(rows), n)."""
        out = torch.empty((rows.size, n), dtype=dtype)
        self.read_into(model, name, rows, out, np.arange(rows.size))
        return out


def _row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


class VocabView(View):
    """Input `model` with its token-indexed tensors in the output vocabulary (see module doc)."""

    def __init__(self, model: str, table: VocabTable):
        super().__init__(table.sources[model])
        self.model = model
        self.table = table
        self.names = table.names[model]
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
        if out is not None and start % n == 0 and stop % n == 0:  # whole rows: no extra copy
            self._rows(name, r0, r1, into=out.view(r1 - r0, n))
            return out
        flat = self._rows(name, r0, r1).reshape(-1)[start - r0 * n : stop - r0 * n]
        return out.copy_(flat) if out is not None else flat

    def _rows(self, name: str, r0: int, r1: int, into: Tensor | None = None) -> Tensor:
        """Output rows [r0, r1) of `name`, shape (r1 - r0, row numel), in the input's dtype
        (written into `into` when given)."""
        real = self.names[name]
        meta = self.source.meta(real)
        n = _row_numel(meta.shape)
        plan = self.table.plan(self.model, name)
        vocab = len(plan.own)
        if into is None:
            buf = torch.zeros((r1 - r0, n), dtype=meta.dtype)
        else:
            buf = into.zero_()
        a, b = r0, min(r1, vocab)
        if a < b:
            own = plan.own[a:b]
            at = np.flatnonzero(own >= 0)
            self.table.read_into(self.model, name, own[at], buf, at)
            self._fill(buf, name, plan, a, b, r0)
        if r1 > vocab:
            buf[max(vocab, r0) - r0 :] = self._pad_row(name, vocab, n).to(meta.dtype)
        return buf

    def _fill(self, buf: Tensor, name: str, plan: RowPlan, a: int, b: int, r0: int) -> None:
        """Rows [a, b) that take a fill: copies read into place by runs, means summed in
        float32 and divided; zero rows are left as they are."""
        keys = self.table.fill_keys(self.model, name)
        lo, hi = np.searchsorted(keys, [a, b])
        copies: dict[str, tuple[list[int], list[int]]] = {}
        means: dict[str, tuple[list[int], list[int]]] = {}
        counts: dict[int, int] = {}
        for i in keys[lo:hi].tolist():
            fill = plan.fills[i]
            if isinstance(fill, Copy):
                at, rows = copies.setdefault(fill.row[0], ([], []))
                at.append(i - r0)
                rows.append(fill.row[1])
            elif isinstance(fill, Mean):
                counts[i - r0] = len(fill.rows)
                for model, row in fill.rows:
                    at, rows = means.setdefault(model, ([], []))
                    at.append(i - r0)
                    rows.append(row)
        for model, (at, rows) in copies.items():
            self.table.read_into(model, name, np.array(rows), buf, np.array(at))
        if counts:
            where = sorted(counts)
            slot = {r: k for k, r in enumerate(where)}
            total = torch.zeros((len(where), buf.shape[1]), dtype=torch.float32)
            for model, (at, rows) in means.items():
                got = self.table.gather(model, name, np.array(rows), buf.shape[1], buf.dtype)
                total.index_add_(0, torch.tensor([slot[r] for r in at]), got.float())
            total /= torch.tensor([counts[r] for r in where], dtype=torch.float32)[:, None]
            buf[torch.tensor(where)] = total.to(buf.dtype)

    def _pad_row(self, name: str, vocab: int, n: int) -> Tensor:
        """The mean of this view's rows [0, vocab): padding rows hold it (Hewitt's suggestion,
        as mergekit fills `pad_to_multiple_of` rows)."""
        key = (self.model, name)
        got = self.table.pad_means.get(key)
        if got is None:
            total = torch.zeros(n, dtype=torch.float64)
            step = max(1, PAD_BLOCK_ELEMENTS // max(n, 1))
            for s in range(0, vocab, step):
                total += self._rows(name, s, min(vocab, s + step)).double().sum(0)
            got = (total / max(vocab, 1)).float()
            self.table.pad_means[key] = got
        return got

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


class TokenizerLayout(View):
    """The output's layout input with the output tokenizer's files in place of its own, and
    config.json's vocab size set (written to a temporary folder removed at close)."""

    def __init__(self, source: TensorSource, tokenizer: Any, vocab_size: int | None):
        super().__init__(source)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._tmp: Path | None = None

    def fingerprint(self) -> dict[str, object]:
        return self.source.fingerprint()

    def support_files(self) -> list[tuple[str, Path]]:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="merge-vocab-"))
            self.tokenizer.save_pretrained(str(self._tmp / "tokenizer"))
        files = [(r, p) for r, p in self.source.support_files() if not is_tokenizer_file(r)]
        if self.vocab_size is not None:
            out = []
            for rel, path in files:
                config = read_json(path) if rel == "config.json" else None
                if isinstance(config, dict):  # else copied as it is, as the engine does
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
