"""Tiny causal LMs with their own tokenizers, built offline for the vocabulary tests.

Each tokenizer is a `tokenizers` WordLevel model over whitespace-split words wrapped in
`PreTrainedTokenizerFast`: 45 shared words after `<unk> <s> </s>`, then the model's own words
(ordinary vocabulary), then its added tokens (`add_tokens`) and special tokens. The model is a
2-layer Llama (hidden 32) whose vocab size is the tokenizer's length unless `rows` says more.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHARED = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(45)]


def make_tokenizer(
    words: Sequence[str] = (), added: Sequence[str] = (), special: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*SHARED, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        fast.add_tokens(list(added))
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def make_model(
    path: Path,
    *,
    seed: int,
    words: Sequence[str] = (),
    added: Sequence[str] = (),
    special: Sequence[str] = (),
    rows: int | None = None,
    tie: bool = False,
    chat_template: str | None = None,
) -> Path:
    """A model folder at `path`: weights, config.json and tokenizer files."""
    tok = make_tokenizer(words, added, special)
    if chat_template is not None:
        tok.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=rows or len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_hidden_layers=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def vocab_of(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(path)).get_vocab())
