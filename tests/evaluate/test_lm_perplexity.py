"""Causal-LM perplexity on a local text file with a local tokenizer, built offline in the test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from merge.cli import cli
from merge.evaluate.evaluators import Batches, CausalLMEvaluator, builtin_evaluator
from merge.evaluate.lm import TextBatches

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "red",
    "ball",
    "while",
    "a",
    "bird",
    "sang",
    "in",
    "the",
    "old",
    "tree",
]


def _corpus() -> str:
    g = torch.Generator().manual_seed(0)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (600,), generator=g)) + "\n"


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def llms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("llm")
    tok = _tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    paths = []
    for seed, name in ((0, "llm-a"), (1, "llm-b")):
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).save_pretrained(root / name)
        paths.append(root / name)
    tok.save_pretrained(paths[0])
    text = root / "corpus.txt"
    text.write_text(_corpus())
    return paths[0], paths[1], text


def test_perplexity_matches_the_models_own_loss(llms) -> None:
    from transformers import AutoModelForCausalLM

    a, _, text = llms
    model = AutoModelForCausalLM.from_pretrained(a).eval()
    batches = TextBatches(text, a, seq_len=8, batch_size=4)()
    assert all(b["input_ids"].shape[1] <= 8 for b in batches)
    ev = builtin_evaluator(Batches(batches))
    assert isinstance(ev, CausalLMEvaluator)
    got = ev(model)
    nll = tokens = 0.0
    with torch.no_grad():
        for b in batches:
            ids = b["input_ids"]
            n = ids.numel() - ids.shape[0]  # every position but the first of each row is predicted
            nll += float(model(input_ids=ids, labels=ids).loss) * n
            tokens += n
    assert got["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    assert (
        ev.tokens == tokens == 600 - 75
    )  # 600 words in 75 blocks of 8; a block's first token is not predicted


@pytest.mark.parametrize("cache", ["auto", "stream"])
def test_merge_path_on_two_llm_folders_needs_no_model(llms, tmp_path: Path, cache: str) -> None:
    a, b, text = llms
    r = CliRunner().invoke(
        cli,
        [
            "path",
            str(a),
            str(b),
            "--lm-text",
            str(text),
            "--seq-len",
            "16",
            "--steps",
            "3",
            "--cache",
            cache,
            "-o",
            str(tmp_path),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "path.json").read_text())
    assert data["settings"]["evaluator"] == "lm"
    assert (
        data["endpoints"]["a"]["ok"] and data["endpoints"]["b"]["ok"]
    )  # tied lm_head filled from wte
    point = data["curves"][0]["points"][1]["metrics"]
    assert set(point) == {"loss", "perplexity"} and point["perplexity"] == pytest.approx(
        math.exp(point["loss"])
    )
    assert "perplexity" in data["curves"][0]["barriers"]


def test_lm_text_without_a_tokenizer_or_text_is_clear(llms, tmp_path: Path) -> None:
    a, b, text = llms
    r = CliRunner().invoke(
        cli, ["path", str(b), str(b), "--lm-text", str(text), "-o", str(tmp_path), "-q"]
    )
    assert r.exit_code == 2 and "--lm-text needs a tokenizer: pass --tokenizer DIR" in r.output
    r = CliRunner().invoke(
        cli,
        [
            "path",
            str(a),
            str(b),
            "--lm-text",
            str(tmp_path / "missing.txt"),
            "-o",
            str(tmp_path),
            "-q",
        ],
    )
    assert r.exit_code == 2 and "missing.txt does not exist" in r.output
