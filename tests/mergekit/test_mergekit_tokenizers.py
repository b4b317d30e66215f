"""mergekit configs with `tokenizer_source`, `tokenizer:` and `chat_template`, run with
`merge run` and with mergekit 0.1.5 on the same tiny models: the output vocabularies are equal
id for id, and every tensor agrees (float32 configs to float32 rounding; bf16 ones within
four bf16 steps of the tensor's largest magnitude, as in test_basic_merges.py).

The models' vocabularies differ only where mergekit's union order is deterministic: its union
appends another model's ordinary tokens in hash order, so at most one such token each here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from vocab_models import make_model

from merge.cli import cli
from merge.errors import MergeWarning
from merge.vocab.chat import TEMPLATES

mergekit_merge = pytest.importorskip("mergekit.merge", reason="mergekit (the compare extra)")
from mergekit.config import MergeConfiguration  # noqa: E402

T_A = "{% for m in messages %}A:{{ m['content'] }}\n{% endfor %}"
T_B = "{% for m in messages %}B:{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mk-vocab")
    specs = {
        "a": dict(
            seed=1,
            words=["x1", "x2"],
            added=["<tool>"],
            special=["<|im_start|>"],
            chat_template=T_A,
        ),
        "b": dict(
            seed=2,
            words=["x2", "y1"],
            added=["<img>", "<tool>"],
            special=["<|im_end|>"],
            chat_template=T_B,
        ),
        "c": dict(seed=3, words=["x1", "y1"], added=["<img>"], tie=True, chat_template=T_B),
        # a's tokenizer on an embedding padded to 60 rows
        "p": dict(seed=4, words=["x1", "x2"], added=["<tool>"], special=["<|im_start|>"], rows=60),
    }
    return {n: str(make_model(root / n, **kw)) for n, kw in specs.items()}  # type: ignore[arg-type]


def _config(models: dict[str, str], text: str) -> dict:
    for name, path in models.items():
        text = text.replace(f"{{{name}}}", path)
    return yaml.safe_load(text)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ours(config: dict, out: Path, expect: str | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergeWarning)
        quiet = [] if expect else ["-q"]  # -q silences warnings; the expected one is read
        res = CliRunner().invoke(
            cli, ["run", str(out.parent / "config.yml"), "-o", str(out), *quiet]
        )
    assert res.exit_code == 0, res.output
    assert expect is None or f"warning: {expect}" in res.output, res.output
    for w in caught:
        if issubclass(w.category, MergeWarning):
            assert str(w.message).startswith("mergekit config: "), w.message


def _theirs(config: dict, out: Path) -> None:
    mergekit_merge.run_merge(
        MergeConfiguration.model_validate(config),
        out_path=str(out),
        options=mergekit_merge.MergeOptions(quiet=True),
    )


LINEAR = """
merge_method: linear
base_model: "{a}"
models:
  - {model: "{a}", parameters: {weight: 0.6}}
  - {model: "{b}", parameters: {weight: 0.4}}
"""
TASK_ARITHMETIC = """
merge_method: task_arithmetic
base_model: "{a}"
models:
  - {model: "{b}", parameters: {weight: 0.7}}
  - {model: "{c}", parameters: {weight: 0.5}}
"""
CASES = {
    "union_linear_bf16": LINEAR + "tokenizer_source: union\ndtype: bfloat16\n",
    "union_linear_f32": LINEAR + "tokenizer_source: union\ndtype: float32\n",
    "base_linear": LINEAR + "tokenizer_source: base\ndtype: float32\n",
    "model_source": LINEAR + 'tokenizer_source: "{b}"\ndtype: float32\n',
    "union_slerp": """
merge_method: slerp
base_model: "{a}"
models: [{model: "{a}"}, {model: "{b}"}]
parameters: {t: 0.3}
tokenizer_source: union
dtype: float32
""",
    "union_task_arithmetic_tied": TASK_ARITHMETIC + "tokenizer_source: union\ndtype: float32\n",
    "tokens_and_padding": LINEAR
    + """
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<img>": {source: {kind: zero}}
    "<new>": {source: {kind: model_token, model: "{b}", token: "y1"}}
    "<new2>": {source: {kind: model_token, model: "{a}", token_id: 7}}
    x2: {source: "{b}", force: true}
dtype: float32
""",
    "padded_embeddings_union": """
merge_method: linear
base_model: "{p}"
models:
  - {model: "{p}", parameters: {weight: 0.5}}
  - {model: "{b}", parameters: {weight: 0.5}}
tokenizer_source: union
dtype: float32
""",
    # Embeddings come from the first slice's models, lm_head from the last's: a token the
    # slice's model lacks is in none of "its" models, so its row is zero (mergekit warns too).
    "sliced_union": """
merge_method: passthrough
base_model: "{a}"
slices:
  - sources: [{model: "{a}", layer_range: [0, 1]}]
  - sources: [{model: "{b}", layer_range: [1, 2]}]
tokenizer_source: union
dtype: float32
""",
    "chat_template_named": LINEAR
    + "tokenizer_source: base\nchat_template: chatml\ndtype: float32\n",
    # b's and c's template against a's: a clear majority (mergekit breaks ties in set order)
    "chat_template_auto": TASK_ARITHMETIC
    + "tokenizer_source: union\nchat_template: auto\ndtype: bfloat16\n",
}


WARNS = {
    "sliced_union": "tokenizer: 3 token(s) of the output vocabulary are in none of the merged "
    "models ('y1', '<img>', '<|im_end|>')"
}


@pytest.mark.parametrize("name", list(CASES))
def test_tokenizer_config_matches_mergekit(
    name: str, models: dict[str, str], tmp_path: Path
) -> None:
    config = _config(models, CASES[name])
    ours, theirs = tmp_path / "ours" / "out", tmp_path / "mergekit"
    _ours(config, ours, WARNS.get(name))
    _theirs(config, theirs)
    tok_ours = AutoTokenizer.from_pretrained(str(ours))
    tok_theirs = AutoTokenizer.from_pretrained(str(theirs))
    assert tok_ours.get_vocab() == tok_theirs.get_vocab()
    assert {i: (t.content, t.special) for i, t in tok_ours.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in tok_theirs.added_tokens_decoder.items()
    }
    cfg_ours = json.loads((ours / "config.json").read_text())
    cfg_theirs = json.loads((theirs / "config.json").read_text())
    assert cfg_ours["vocab_size"] == cfg_theirs["vocab_size"]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    if name.startswith("chat_template"):
        assert tok_ours.chat_template == {"chat_template_auto": T_B}.get(name, TEMPLATES["chatml"])
        assert tok_ours.apply_chat_template(chat, tokenize=False) == tok_theirs.apply_chat_template(
            chat, tokenize=False
        )
    got, ref = _tensors(ours), _tensors(theirs)
    assert sorted(got) == sorted(ref)
    for k, r in ref.items():
        assert got[k].shape == r.shape, k
        span = float(r.float().abs().max())
        diff = float((got[k].float() - r.float()).abs().max())
        tol = 2**-5 * span if r.dtype == torch.bfloat16 else 1e-6 * max(span, 1.0)
        assert diff <= tol + 1e-12, f"{k}: max |ours - mergekit| = {diff:.3g} of {span:.3g}"
    model = AutoModelForCausalLM.from_pretrained(ours)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
