"""Merges whose inputs' vocabularies differ: the recipe's `tokenizer:` section end to end.

Every expected embedding row is worked out here from the inputs' own rows, token by token
(the token's row in each model, or the row mergekit's rules give a model that lacks it, then
the method's weights), never from the code under test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from vocab_models import make_model, make_tokenizer, vocab_of

from merge.api import plan_recipe, run_recipe
from merge.errors import MergeWarning, PlanError, RecipeError, UsageError
from merge.execute import Engine
from merge.io.sources import MemorySource
from merge.vocab.chat import TEMPLATES
from merge.vocab.view import VocabView

T_A = "{% for m in messages %}A:{{ m['content'] }}\n{% endfor %}"
T_B = "{% for m in messages %}B:{{ m['content'] }}\n{% endfor %}"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab-models")
    return {
        # a: x1 x2 | <tool> <|im_start|>;  b: x2 y1 | <img> <tool>;  c: x1 y1 | <img>, tied
        "a": make_model(
            root / "a",
            seed=1,
            words=["x1", "x2"],
            added=["<tool>"],
            special=["<|im_start|>"],
            chat_template=T_A,
        ),
        "b": make_model(
            root / "b", seed=2, words=["x2", "y1"], added=["<img>", "<tool>"], chat_template=T_B
        ),
        "c": make_model(
            root / "c", seed=3, words=["x1", "y1"], added=["<img>"], tie=True, chat_template=T_B
        ),
        "d": make_model(
            root / "d", seed=4, words=["x1", "x2"], added=["<tool>"], special=["<|im_start|>"]
        ),
        # a's tokenizer plus one plain added token that has no embedding row
        "short": make_model(
            root / "short", seed=5, words=["x1", "x2"], added=["<tool>", "<x>"], rows=51
        ),
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _linear(inputs: dict[str, Path], weights: dict[str, float], **tokenizer: object) -> dict:
    return {
        "inputs": {k: str(v) for k, v in inputs.items()},
        "steps": {
            "merged": {
                "method": "linear",
                "models": {k: {"weight": w} for k, w in weights.items()},
                "normalize": False,
            }
        },
        "tokenizer": tokenizer,
    }


def _merged(
    tmp_path: Path, inputs: dict[str, Path], weights: dict[str, float], **tokenizer: object
) -> Path:
    """The linear merge of `inputs` with `tokenizer:` settings, written to tmp_path/out."""
    return run_recipe(_linear(inputs, weights, **tokenizer), tmp_path / "out", quiet=True)


def _row(tensors: dict, vocab: dict[str, int], name: str, token: str) -> torch.Tensor:
    return tensors[name][vocab[token]]


def _expected(out_vocab, sources, weights, name, base=None):
    """Σ_m w_m · row_m(t): a model's own row, else (mergekit) the sole owner's, zeros, the
    base's, or the owners' mean."""
    rows = []
    for token, _ in sorted(out_vocab.items(), key=lambda kv: kv[1]):
        owners = [m for m, (voc, _) in sources.items() if token in voc]

        def own(m, token=token):
            voc, t = sources[m]
            return t[name if name in t else EMBED][voc[token]]

        total = 0
        for m, w in weights.items():
            if m in owners:
                r = own(m)
            elif len(owners) == 1:
                r = own(owners[0])
            elif not owners:
                r = torch.zeros(32)
            elif base in owners:
                r = own(base)
            else:
                r = sum(own(o) for o in owners) / len(owners)
            total = total + w * r
        rows.append(total)
    return torch.stack(rows)


def test_union_of_two_tokenizers_and_their_rows(models, tmp_path):
    out = _merged(
        tmp_path,
        {"base": models["a"], "b": models["b"]},
        {"base": 0.6, "b": 0.4},
        source="union",
        base="base",
    )
    va, vb, vo = vocab_of(models["a"]), vocab_of(models["b"]), vocab_of(out)
    # a's 52 tokens keep their ids; b's plain `y1` and added `<img>` follow (mergekit's order)
    assert {t: i for t, i in vo.items() if i < 52} == va
    assert (vo["y1"], vo["<img>"]) == (52, 53) and len(vo) == 54
    added = AutoTokenizer.from_pretrained(str(out)).added_tokens_decoder
    assert added[51].special and not added[53].special  # settings come along
    ta, tb, to = _tensors(models["a"]), _tensors(models["b"]), _tensors(out)
    for name in (EMBED, HEAD):
        assert to[name].shape == (54, 32)
        # hand-worked rows: shared, at different ids in a and b
        torch.testing.assert_close(
            _row(to, vo, name, "x2"),
            0.6 * _row(ta, va, name, "x2") + 0.4 * _row(tb, vb, name, "x2"),
        )
        assert vo["x2"] == va["x2"] == 49 and vb["x2"] == 48
        # only b has <img>: a's missing row is b's, so the merge gives b's row
        torch.testing.assert_close(_row(to, vo, name, "<img>"), _row(tb, vb, name, "<img>"))
        # only a (the base) has x1 and <|im_start|>
        torch.testing.assert_close(_row(to, vo, name, "x1"), _row(ta, va, name, "x1"))
        torch.testing.assert_close(
            _row(to, vo, name, "<tool>"),
            0.6 * _row(ta, va, name, "<tool>") + 0.4 * _row(tb, vb, name, "<tool>"),
        )
        want = _expected(vo, {"a": (va, ta), "b": (vb, tb)}, {"a": 0.6, "b": 0.4}, name, "a")
        torch.testing.assert_close(to[name], want)
    # every other tensor is the plain weighted sum
    for k in ta:
        if k not in (EMBED, HEAD):
            torch.testing.assert_close(to[k], 0.6 * ta[k] + 0.4 * tb[k])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 54
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("w1 <img> y1 x2", return_tensors="pt").input_ids
    assert ids.tolist() == [[4, 53, 52, 49]]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 4, 54)


def test_three_models_mean_rule_and_a_tied_model(models, tmp_path):
    weights = {"base": 0.5, "b": 0.3, "c": 0.2}
    out = _merged(
        tmp_path,
        {"base": models["a"], "b": models["b"], "c": models["c"]},
        weights,
        source="union",
        base="base",
    )
    srcs = {m: (vocab_of(models[k]), _tensors(models[k])) for m, k in zip(weights, "abc")}
    assert HEAD not in srcs["c"][1]  # c ties its lm_head to its embeddings
    vo, to = vocab_of(out), _tensors(out)
    assert len(vo) == 54  # c brings nothing new
    for name in (EMBED, HEAD):
        torch.testing.assert_close(to[name], _expected(vo, srcs, weights, name, "base"))
    # <img>: b and c have it, the base does not -> the base's row is their mean
    vb, tb = srcs["b"]
    vc, tc = srcs["c"]
    mean = (tb[HEAD][vb["<img>"]] + tc[EMBED][vc["<img>"]]) / 2
    torch.testing.assert_close(
        to[HEAD][vo["<img>"]],
        0.5 * mean + 0.3 * tb[HEAD][vb["<img>"]] + 0.2 * tc[EMBED][vc["<img>"]],
    )


def test_base_tokenizer_drops_what_the_base_lacks(models, tmp_path):
    out = _merged(
        tmp_path,
        {"base": models["a"], "b": models["b"]},
        {"base": 0.5, "b": 0.5},
        source="base",
        base="base",
    )
    va, vb, vo = vocab_of(models["a"]), vocab_of(models["b"]), vocab_of(out)
    assert vo == va and "<img>" not in vo
    ta, tb, to = _tensors(models["a"]), _tensors(models["b"]), _tensors(out)
    for name in (EMBED, HEAD):
        torch.testing.assert_close(
            to[name], _expected(vo, {"a": (va, ta), "b": (vb, tb)}, {"a": 0.5, "b": 0.5}, name, "a")
        )


def test_a_base_tokenizer_longer_than_its_embeddings_is_cut(models, tmp_path):
    out = _merged(
        tmp_path,
        {"base": models["short"], "b": models["b"]},
        {"base": 0.5, "b": 0.5},
        source="base",
        base="base",
    )
    vo = vocab_of(out)
    assert len(vo) == 51 and "<x>" not in vo and vo["<tool>"] == 50
    assert _tensors(out)[EMBED].shape == (51, 32)


def test_tokens_overrides_and_padding(models, tmp_path):
    tokens = {
        "<img>": {"source": {"kind": "zero"}},
        "<new>": {"source": {"kind": "model_token", "model": "b", "token": "y1"}},
        "x2": {"source": "b", "force": True},
    }
    out = _merged(
        tmp_path,
        {"base": models["a"], "b": models["b"]},
        {"base": 0.6, "b": 0.4},
        source="union",
        base="base",
        tokens=tokens,
        pad_to_multiple_of=8,
    )
    vb, vo = vocab_of(models["b"]), vocab_of(out)
    assert vo["<new>"] == 54 and len(vo) == 55
    tb, to = _tensors(models["b"]), _tensors(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 56
    for name in (EMBED, HEAD):
        assert to[name].shape == (56, 32)
        # <img>: only b has it, so a takes the zero row: 0.4 of b's own
        torch.testing.assert_close(to[name][vo["<img>"]], 0.4 * tb[name][vb["<img>"]])
        # <new>: nobody has it; both take b's row of `y1`
        torch.testing.assert_close(to[name][vo["<new>"]], tb[name][vb["y1"]])
        # x2 forced to b's row in both models
        torch.testing.assert_close(to[name][vo["x2"]], tb[name][vb["x2"]])
        # the padding row is each model's mean row, so the merge's is the mean of its rows
        torch.testing.assert_close(to[name][55], to[name][:55].mean(0), atol=1e-6, rtol=0)
    AutoModelForCausalLM.from_pretrained(out)


def test_rows_stream_in_chunks_that_cut_rows(models):
    recipe = _linear(
        {"base": models["a"], "b": models["b"], "c": models["c"]},
        {"base": 0.5, "b": 0.3, "c": 0.2},
        source="union",
        base="base",
        pad_to_multiple_of=8,
    )
    whole = Engine(plan_recipe(recipe), quiet=True).to_memory()
    plan = plan_recipe(recipe)
    cut = Engine(plan, chunk=13, quiet=True).to_memory()  # rows of 32: chunks end mid-row
    for k in (EMBED, HEAD):
        assert torch.equal(whole[k], cut[k])
    view = plan.sources["b"]
    assert view.meta(EMBED).shape == (56, 32)
    assert torch.equal(
        view.read_range(EMBED, 31 * 32 + 5, 54 * 32 + 7),
        whole_rows(view, EMBED)[31 * 32 + 5 : 54 * 32 + 7],
    )
    plan.close()


def whole_rows(view, name):
    return torch.cat([view.read_range(name, i * 32, (i + 1) * 32) for i in range(56)])


def test_models_sharing_a_vocabulary_pass_through(models):
    plan = plan_recipe(
        _linear(
            {"base": models["a"], "d": models["d"]},
            {"base": 0.5, "d": 0.5},
            source="union",
            base="base",
        )
    )
    for n in ("base", "d"):
        view = plan.sources[n]
        while not isinstance(view, VocabView):  # the layout input is wrapped once more
            view = view.source
        assert not view._aligned(EMBED)  # identity: read as stored
    plan.close()


@pytest.mark.parametrize("which", ["literal", "auto", "chatml"])
def test_chat_template_round_trips_through_autotokenizer(models, tmp_path, which):
    literal = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    value = {"literal": literal, "auto": "auto", "chatml": "chatml"}[which]
    out = _merged(
        tmp_path,
        {"base": models["a"], "b": models["b"], "c": models["c"]},
        {"base": 0.4, "b": 0.3, "c": 0.3},
        source="union",
        base="base",
        chat_template=value,
    )
    tok = AutoTokenizer.from_pretrained(str(out))
    want = {"literal": literal, "auto": T_B, "chatml": TEMPLATES["chatml"]}[which]
    assert tok.chat_template == want
    chat = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert (
        text
        == {"literal": "<user>hi", "auto": "B:hi\n", "chatml": "<|im_start|>user\nhi<|im_end|>\n"}[
            which
        ]
    )


def test_chat_template_alone_keeps_the_layouts_tokenizer(models, tmp_path):
    recipe = _linear(
        {"base": models["a"], "d": models["d"]}, {"base": 0.5, "d": 0.5}, chat_template="chatml"
    )
    out = run_recipe(recipe, tmp_path / "out", quiet=True)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == vocab_of(models["a"]) and tok.chat_template == TEMPLATES["chatml"]
    assert (out / "chat_template.jinja").read_text() == TEMPLATES["chatml"]
    assert _tensors(out)[EMBED].shape == (52, 32)


def test_tokenizer_from_a_folder(models, tmp_path):
    folder = tmp_path / "tok"
    make_tokenizer(["x2", "y1"], ["<img>", "<tool>", "<new>"]).save_pretrained(folder)
    recipe = _linear(
        {"base": models["a"], "b": models["b"]}, {"base": 0.5, "b": 0.5}, source=str(folder)
    )
    with pytest.warns(MergeWarning, match=r"1 token\(s\) .* none of the merged models \('<new>'\)"):
        out = run_recipe(recipe, tmp_path / "out", quiet=True)
    vo = vocab_of(out)
    assert vo == vocab_of(folder) and len(vo) == 53
    to = _tensors(out)
    assert torch.equal(to[EMBED][vo["<new>"]], torch.zeros(32))
    # no base: x1 is gone, `x2` in both; `<|im_start|>` only in a, which this tokenizer lacks
    assert "<|im_start|>" not in vo


def test_embed_slerp_false_lerps_the_embeddings_only(models):
    def recipe(flag):
        r = {
            "inputs": {"base": str(models["a"]), "d": str(models["d"])},
            "steps": {"merged": {"method": "slerp", "base": "base", "models": ["d"], "t": 0.3}},
            "tokenizer": {"source": "union", "base": "base"},
        }
        if flag is not None:
            r["tokenizer"]["embed_slerp"] = flag
        return r

    slerped = Engine(plan_recipe(recipe(None)), quiet=True).to_memory()
    assert torch.equal(
        Engine(plan_recipe(recipe(True)), quiet=True).to_memory()[EMBED], slerped[EMBED]
    )
    lerped = Engine(plan_recipe(recipe(False)), quiet=True).to_memory()
    ta, td = _tensors(models["a"]), _tensors(models["d"])
    for k in (EMBED, HEAD):
        torch.testing.assert_close(lerped[k], 0.7 * ta[k] + 0.3 * td[k])
        assert not torch.allclose(slerped[k], lerped[k])
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(lerped[k], slerped[k])
    with pytest.raises(UsageError, match="tokenizer.embed_slerp: only a slerp merge's embeddings"):
        plan_recipe(
            _linear(
                {"base": models["a"], "d": models["d"]},
                {"base": 0.5, "d": 0.5},
                source="union",
                embed_slerp=False,
            )
        )


def test_recipe_problems_are_named_together(models):
    recipe = _linear(
        {"base": models["a"], "b": models["b"]},
        {"base": 0.5, "b": 0.5},
        source="unoin",
        base="bsae",
        tokens={
            "<x>": {"source": "c"},
            "<z>": {"source": {"kind": "model_token", "model": "d", "token_id": 1}},
        },
        chat_template="chatlm",
    )
    with pytest.raises(RecipeError) as e:
        plan_recipe(recipe)
    assert str(e.value).splitlines()[1:] == [
        "  tokenizer.source: `unoin` is neither `union`, an input (did you mean `union`?), nor "
        "a folder; give one of those (inputs: base, b)",
        "  tokenizer.base: no input named `bsae` (did you mean `base`?)",
        "  tokenizer.tokens.<x>.source: no input named `c`",
        "  tokenizer.tokens.<z>.source.model: no input named `d`",
        "  tokenizer.chat_template: `chatlm` is not a chat template: give `auto` (the inputs' most "
        "common), one of chatml, llama3, mistral, alpaca, exaone (did you mean `chatml`?), or a "
        "literal Jinja template (at least 20 characters, with `{`)",
    ]
    for tokenizer, message in [
        (
            {
                "source": "union",
                "tokens": {"<y>": {"source": {"kind": "model_token", "model": "b"}}},
            },
            "tokenizer.tokens.<y>.source: model_token: give exactly one of `token` or `token_id`",
        ),
        (
            {"source": "union", "tokens": {"<y>": {"source": {"kind": "one"}}}},
            "tokenizer.tokens.<y>.source: a mapping source needs `kind: model_token` or `kind: zero`, not 'one'",
        ),
        (
            {"source": "union", "colour": 1},
            "tokenizer.colour: unknown key; valid keys: source, base",
        ),
        (
            {"chat_template": "chatml", "pad_to_multiple_of": 8},
            "tokenizer.pad_to_multiple_of: only applies with `tokenizer.source`",
        ),
        ({}, "tokenizer: give `source:` (union, an input or a folder) or `chat_template:`"),
    ]:
        with pytest.raises(RecipeError) as e:
            plan_recipe({**recipe, "tokenizer": tokenizer})
        assert str(e.value).splitlines()[1].strip().startswith(message), str(e.value)


def test_inputs_without_embeddings_or_with_embedding_deltas_are_refused(models, three_models):
    toy = {k: str(v) for k, v in three_models.items()}
    with pytest.raises(UsageError) as e:
        plan_recipe(
            _linear({"base": toy["base"], "a": toy["a"]}, {"base": 0.5, "a": 0.5}, source="union")
        )
    assert str(e.value).startswith(
        f"tokenizer: input `base` (whose tokenizer the output starts from): cannot load a "
        f"tokenizer from {toy['base']} ("
    )
    bare = {n: MemorySource({"w": torch.ones(2)}) for n in ("x", "y")}
    with pytest.raises(
        UsageError, match=r"tokenizer: input `x` \(<memory>\) has no token embedding tensor"
    ):
        plan_recipe(
            _linear({"x": "<memory>", "y": "<memory>"}, {"x": 0.5, "y": 0.5}, source="union"),
            preopened=bare,
        )
    delta = MemorySource({EMBED: torch.zeros(52, 32)}, kind="delta")
    recipe = {
        "inputs": {"base": str(models["a"]), "lora": "<memory>"},
        "steps": {"merged": "base + lora"},
        "tokenizer": {"source": "union"},
    }
    with pytest.raises(
        UsageError,
        match="tokenizer: input `lora` is a delta .* changes `model.embed_tokens.weight`",
    ):
        plan_recipe(recipe, preopened={"lora": delta})


def test_hidden_sizes_must_match(models, tmp_path):
    wide = tmp_path / "wide"
    make_model(wide, seed=9, words=["x1"])
    cfg = json.loads((wide / "config.json").read_text())
    assert cfg["hidden_size"] == 32
    t = load_file(wide / "model.safetensors")
    t[EMBED] = torch.zeros(t[EMBED].shape[0], 16)
    from safetensors.torch import save_file

    save_file(t, wide / "model.safetensors")
    with pytest.raises(PlanError, match=r"`model.embed_tokens.weight`: rows of different shapes"):
        plan_recipe(
            _linear({"base": models["a"], "w": wide}, {"base": 0.5, "w": 0.5}, source="union")
        )


def test_no_warnings_for_a_plain_union(models):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_recipe(
            _linear(
                {"base": models["a"], "b": models["b"]}, {"base": 0.5, "b": 0.5}, source="union"
            )
        ).close()


def test_the_example_mergekit_chat_union_recipe_runs(tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "mergekit-chat-union.yml"
    (tmp_path / "r.yml").write_text(recipe.read_text())
    make_model(tmp_path / "base", seed=1, words=["x1"])
    make_model(tmp_path / "chat", seed=2, words=["x1"], special=["<|im_start|>", "<|im_end|>"])
    out = run_recipe(tmp_path / "r.yml", tmp_path / "out", quiet=True)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == TEMPLATES["chatml"]
    vb, vc, vo = vocab_of(tmp_path / "base"), vocab_of(tmp_path / "chat"), tok.get_vocab()
    assert {t: i for t, i in vo.items() if t in vb} == vb and len(vo) == len(vb) + 2
    tc, to = _tensors(tmp_path / "chat"), _tensors(out)
    for name in (EMBED, HEAD):
        # forced in both models: whole-matrix slerp scales that row by sin((1-t)Ω)/sin Ω +
        # sin(tΩ)/sin Ω, so it stays parallel to the chat model's row
        got, want = to[name][vo["<|im_end|>"]].float(), tc[name][vc["<|im_end|>"]]
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9999
    AutoModelForCausalLM.from_pretrained(out)


def test_gpt2_tied_embeddings_union(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = {}
    for name, seed, words, added in [("g1", 1, ["x1"], ["<a>"]), ("g2", 2, ["y1"], ["<b>"])]:
        tok = make_tokenizer(words, added)
        torch.manual_seed(seed)
        GPT2LMHeadModel(
            GPT2Config(
                n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), bos_token_id=1, eos_token_id=2
            )
        ).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    out = _merged(
        tmp_path,
        {"base": paths["g1"], "g2": paths["g2"]},
        {"base": 0.5, "g2": 0.5},
        source="union",
        base="base",
    )
    v1, v2, vo = vocab_of(paths["g1"]), vocab_of(paths["g2"]), vocab_of(out)
    t1, t2, to = _tensors(paths["g1"]), _tensors(paths["g2"]), _tensors(out)
    wte = "transformer.wte.weight"
    assert set(to) == set(t1) and "lm_head.weight" not in to  # tied: nothing to invent
    assert to[wte].shape == (len(vo), 32) == (52, 32)
    torch.testing.assert_close(to[wte][vo["y1"]], t2[wte][v2["y1"]])
    torch.testing.assert_close(to[wte][vo["w3"]], 0.5 * t1[wte][v1["w3"]] + 0.5 * t2[wte][v2["w3"]])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 52
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_vocab_size_goes_where_the_config_keeps_it():
    from merge.vocab.view import set_vocab_size

    assert set_vocab_size({"vocab_size": 5, "x": 1}, 9) == {"vocab_size": 9, "x": 1}
    llava = {"model_type": "llava", "text_config": {"vocab_size": 5, "hidden_size": 8}}
    assert set_vocab_size(llava, 9) == {
        "model_type": "llava",
        "text_config": {"vocab_size": 9, "hidden_size": 8},
    }
    assert set_vocab_size({"model_type": "x"}, 9) == {"model_type": "x", "vocab_size": 9}


def test_token_indexed_tensors_are_found_by_name_and_rows():
    from merge.vocab.tensors import find_vocab_tensors, tied_aliases

    llava = find_vocab_tensors(
        {
            "language_model.model.embed_tokens.weight": (70, 8),
            "language_model.lm_head.weight": (70, 8),
            "vision_tower.vision_model.embeddings.patch_embedding.weight": (8, 3, 4, 4),
            "vision_tower.vision_model.embeddings.position_embedding.weight": (17, 8),
            "multi_modal_projector.linear_1.weight": (8, 8),
        }
    )
    assert llava is not None and llava.rows == 70
    assert llava.names == (
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
    )
    phi = find_vocab_tensors(
        {"model.embed_tokens.weight": (9, 4), "lm_head.weight": (9, 4), "lm_head.bias": (9,)}
    )
    assert phi is not None and phi.outputs == ("lm_head.weight", "lm_head.bias")
    tied = find_vocab_tensors({"model.embed_tokens.weight": (9, 4)})
    assert tied is not None
    assert tied_aliases(tied, [phi]) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert find_vocab_tensors({"w": (3, 3)}) is None


def test_inputs_of_different_dtypes_fill_each_other(models, tmp_path):
    half = tmp_path / "b16"
    make_model(half, seed=2, words=["x2", "y1"], added=["<img>", "<tool>"])
    t = load_file(half / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, half / "model.safetensors")
    recipe = _linear(
        {"base": models["a"], "b": half}, {"base": 0.5, "b": 0.5}, source="union", base="base"
    )
    with pytest.warns(MergeWarning, match="dtype"):
        plan = plan_recipe(recipe)
    got = Engine(plan, quiet=True).to_memory()
    va, vb = vocab_of(models["a"]), vocab_of(half)
    ta, tb = _tensors(models["a"]), _tensors(half)
    out_vocab = {**va, "y1": 52, "<img>": 53}
    # a (float32) lacks <img>: b's bf16 row, cast into a's float32 view
    assert torch.equal(got[EMBED][out_vocab["<img>"]], tb[EMBED][vb["<img>"]].float())
    # b (bf16) lacks x1: a's float32 row, rounded into b's bf16 view
    want = 0.5 * ta[EMBED][va["x1"]] + 0.5 * ta[EMBED][va["x1"]].bfloat16().float()
    torch.testing.assert_close(got[EMBED][out_vocab["x1"]], want)
    plan.close()
