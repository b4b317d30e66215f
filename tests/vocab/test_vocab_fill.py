"""mergekit's row-fill rules (`merge.vocab.fill.plan_rows`), hand-worked token by token."""

from __future__ import annotations

import numpy as np
import pytest

from merge.errors import MergeWarning, UsageError
from merge.vocab.fill import Copy, Mean, Zero, padded_size, plan_rows
from merge.vocab.spec import ModelToken, TokenSpec, ZeroRow

# Output vocabulary and where three models keep each token (their own row numbers).
IDS = {"the": 0, "cat": 1, "dog": 2, "<a>": 3, "<bc>": 4, "<c>": 5, "<none>": 6}
INPUTS = {
    "base": {"the": 0, "cat": 1, "dog": 2, "<a>": 7},
    "b": {"the": 2, "cat": 0, "<bc>": 3},
    "c": {"the": 1, "cat": 2, "dog": 0, "<bc>": 5, "<c>": 4},
}
ROWS = {"base": 8, "b": 4, "c": 6}


def _plans(models=("base", "b", "c"), base="base", tokens=None, size=7):
    return plan_rows(
        IDS,
        INPUTS,
        list(models),
        base=base,
        tokens=tokens or {},
        originals=INPUTS,
        rows=ROWS,
        size=size,
    )


def test_each_rule_in_order_hand_worked():
    with pytest.warns(
        MergeWarning, match=r"1 token\(s\) .* in none of the merged models \('<none>'\)"
    ):
        p = _plans()
    # own rows where a model has the token (-1 where a fill stands in)
    assert p["base"].own.tolist() == [0, 1, 2, 7, -1, -1, -1]
    assert p["b"].own.tolist() == [2, 0, -1, -1, 3, -1, -1]
    assert p["c"].own.tolist() == [1, 2, 0, -1, 5, 4, -1]
    # dog: base and c have it -> the base's row (rule 4) for b
    assert p["b"].fills[2] == Copy(("base", 2))
    # <a>: only the base has it -> the sole owner's row (rule 2)
    assert p["b"].fills[3] == p["c"].fills[3] == Copy(("base", 7))
    # <bc>: b and c have it, the base does not -> their mean (rule 5)
    assert p["base"].fills[4] == Mean((("b", 3), ("c", 5)))
    # <c>: only c
    assert p["base"].fills[5] == p["b"].fills[5] == Copy(("c", 4))
    # <none>: nobody -> zeros (rule 3)
    assert all(p[m].fills[6] == Zero() for m in p)
    assert set(p["c"].fills) == {3, 6}


def test_without_a_base_a_token_two_models_share_is_their_mean():
    with pytest.warns(MergeWarning, match="none of the merged models"):
        p = _plans(base=None)
    assert p["b"].fills[2] == Mean((("base", 2), ("c", 0)))


def test_tokens_sources_and_force():
    tokens = {
        "dog": TokenSpec(source=ZeroRow(kind="zero")),  # b lacks it: zeros, not the base's row
        "cat": TokenSpec(source="c", force=True),  # everyone takes c's row
        "<c>": TokenSpec(source=ModelToken(kind="model_token", model="b", token="the")),
        "<none>": TokenSpec(source=ModelToken(kind="model_token", model="base", token_id=5)),
    }
    p = _plans(tokens=tokens)
    assert p["b"].fills[2] == Zero() and p["c"].own[2] == 0  # force off: owners keep theirs
    assert [p[m].own[1] for m in p] == [-1, -1, -1]
    assert all(p[m].fills[1] == Copy(("c", 2)) for m in p)
    assert p["base"].fills[5] == Copy(("b", 2)) and p["c"].own[5] == 4
    assert p["c"].fills[6] == Copy(("base", 5))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            TokenSpec(),
            "tokenizer.tokens.<c>.source: `<c>` is missing from input(s) base, b, so it needs a source",
        ),
        (TokenSpec(source="b"), "tokenizer.tokens.<c>.source: input `b` has no row for `<c>`"),
        (
            TokenSpec(source="x"),
            "tokenizer.tokens.<c>.source: `x` is not one of the models merged into this tensor (base, b, c)",
        ),
        (
            TokenSpec(source=ModelToken(kind="model_token", model="b", token_id=4)),
            "tokenizer.tokens.<c>.source: token id 4 is past input `b`'s 4 embedding rows",
        ),
        (
            TokenSpec(source=ModelToken(kind="model_token", model="b", token="<zz>")),
            "tokenizer.tokens.<c>.source.token: `<zz>` is not in input `b`'s tokenizer",
        ),
    ],
)
def test_unusable_token_sources_name_the_key(spec, message):
    with pytest.raises(UsageError) as e:
        _plans(tokens={"<c>": spec, "<none>": TokenSpec(source=ZeroRow(kind="zero"))})
    assert str(e.value).startswith(message)


def test_padding_and_identity():
    assert padded_size(7, None) == 7 and padded_size(7, 4) == 8 and padded_size(8, 4) == 8
    ids = {"a": 0, "b": 1}
    p = plan_rows(
        ids, {"m": ids}, ["m"], base=None, tokens={}, originals={"m": ids}, rows={"m": 2}, size=2
    )
    assert p["m"].is_identity(2)
    assert not p["m"].is_identity(3)  # the model has a row the output drops
    q = plan_rows(
        ids, {"m": ids}, ["m"], base=None, tokens={}, originals={"m": ids}, rows={"m": 2}, size=4
    )
    assert not q["m"].is_identity(2) and np.array_equal(q["m"].own, [0, 1])
