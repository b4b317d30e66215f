"""Where each output embedding row of each model comes from (mergekit's `PermutedVocabulary`).

A model that has a token keeps its own row for it. For a token some model lacks, that model's
row is, in this order:
  1. the `tokens:` entry's source, if there is one (`force: true` applies it to every model);
  2. the only owner's row, when one model has the token;
  3. zeros, when no model has it;
  4. the base's row, when the base is among the models and has the token;
  5. the mean of the owners' rows (unweighted).
Rows past the vocabulary (`pad_to_multiple_of`) hold the mean of the model's other rows. The
merge then combines these aligned rows like any other tensor, with the method's own weights.
Pure: token maps in, row plans out; the view (`merge.vocab.view`) reads the rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from merge.errors import MergeWarning, UsageError
from merge.vocab.spec import ModelToken, TokenSpec, ZeroRow

Row = tuple[str, int]  # (input, row of its embedding)


@dataclass(frozen=True)
class Copy:
    """One row of one model (a donor, the base, or a `tokens:` source)."""

    row: Row


@dataclass(frozen=True)
class Mean:
    """The unweighted mean of the owners' rows."""

    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Zero:
    pass


Fill = Copy | Mean | Zero


@dataclass(frozen=True)
class RowPlan:
    """One model's output rows: `own[i]` its own row for output row i, or -1 where `fills[i]`
    gives the row; rows from `len(own)` to `size` are padding (the mean of the others)."""

    own: np.ndarray  # (vocab,) int64
    fills: dict[int, Fill] = field(default_factory=dict)
    size: int = 0

    def is_identity(self, rows: int) -> bool:
        """True when the output rows are the model's own rows, in order, all of them."""
        return (
            not self.fills
            and self.size == rows == len(self.own)
            and bool((self.own == np.arange(rows)).all())
        )


def padded_size(vocab: int, multiple: int | None) -> int:
    """`vocab` rounded up to a multiple of `multiple` (mergekit's `pad_to_multiple_of`)."""
    if not multiple or vocab % multiple == 0:
        return vocab
    return (vocab // multiple + 1) * multiple


def _token_source(
    token: str,
    spec: TokenSpec,
    models: Sequence[str],
    inputs: Mapping[str, Mapping[str, int]],
    originals: Mapping[str, Mapping[str, int]],
    rows: Mapping[str, int],
) -> Fill:
    where = f"tokenizer.tokens.{token}.source"
    src = spec.source
    if isinstance(src, ZeroRow):
        return Zero()
    if src is None:
        lacking = [m for m in models if token not in inputs[m]]
        raise UsageError(
            f"{where}: `{token}` is missing from input(s) {', '.join(lacking) or '(none)'}"
            f"{' (and `force` is set)' if spec.force else ''}, so it needs a source: an input's "
            "name, {kind: model_token, model: ..., token: ...} or {kind: zero}"
        )
    model = src.model if isinstance(src, ModelToken) else src
    if model not in models:
        raise UsageError(
            f"{where}: `{model}` is not one of the models merged into this tensor "
            f"({', '.join(models)}), so it has no row to give"
        )
    if isinstance(src, ModelToken):
        if src.token_id is not None:
            row = src.token_id
        elif src.token in originals.get(model, {}):
            row = originals[model][str(src.token)]
        else:
            raise UsageError(f"{where}.token: `{src.token}` is not in input `{model}`'s tokenizer")
        if row >= rows[model]:
            raise UsageError(
                f"{where}: token id {row} is past input `{model}`'s {rows[model]} embedding rows"
            )
        return Copy((model, row))
    if token not in inputs[model]:
        raise UsageError(
            f"{where}: input `{model}` has no row for `{token}`; name a model that has it, or "
            "take another token's row with {kind: model_token, model: ..., token: ...}"
        )
    return Copy((model, inputs[model][token]))


def plan_rows(
    ids: Mapping[str, int],
    inputs: Mapping[str, Mapping[str, int]],
    models: Sequence[str],
    *,
    base: str | None,
    tokens: Mapping[str, TokenSpec],
    originals: Mapping[str, Mapping[str, int]],
    rows: Mapping[str, int],
    size: int,
) -> dict[str, RowPlan]:
    """Each of `models`' row plan for the output vocabulary `ids` (token -> output row).

    Args:
        inputs: each model's token -> row (its tokenizer, rows it has).
        base: the base input (rule 4), or None when the merge has no base model.
        originals: each model's whole tokenizer vocabulary (`model_token` by token).
        rows: each model's embedding row count.
        size: output rows, padding included.
    """
    vocab = len(ids)
    own = {m: np.full(vocab, -1, dtype=np.int64) for m in models}
    fills: dict[str, dict[int, Fill]] = {m: {} for m in models}
    nowhere: list[str] = []
    for token, i in sorted(ids.items(), key=lambda kv: kv[1]):  # id order: stable messages
        spec = tokens.get(token)
        forced = spec is not None and spec.force
        have = [m for m in models if token in inputs[m]]
        for m in have:
            if not forced:
                own[m][i] = inputs[m][token]
        if len(have) == len(models) and not forced:
            continue
        fill: Fill
        if spec is not None:
            fill = _token_source(token, spec, models, inputs, originals, rows)
        elif len(have) == 1:
            fill = Copy((have[0], inputs[have[0]][token]))
        elif not have:
            fill = Zero()
            nowhere.append(token)
        elif base is not None and base in have:
            fill = Copy((base, inputs[base][token]))
        else:
            fill = Mean(tuple((m, inputs[m][token]) for m in have))
        for m in models:
            if own[m][i] < 0:
                fills[m][i] = fill
    if nowhere:
        warnings.warn(
            f"tokenizer: {len(nowhere)} token(s) of the output vocabulary are in none of the "
            f"merged models ({', '.join(repr(t) for t in nowhere[:5])}"
            f"{' ...' if len(nowhere) > 5 else ''}); their rows are zero (give them a source "
            "under `tokenizer.tokens` to choose another)",
            MergeWarning,
            stacklevel=2,
        )
    return {m: RowPlan(own[m], fills[m], size) for m in models}
