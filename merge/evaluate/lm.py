"""Causal-LM perplexity on a local text file with a local tokenizer (transformers, offline).

`TextBatches(path, tokenizer_dir)` is a picklable data factory: it tokenizes the file once per
process and cuts the token stream into consecutive blocks of `seq_len` tokens, which
`CausalLMEvaluator` scores (token-weighted loss, perplexity = exp(loss)). `HFCausalLM(folder)`
builds a Hugging Face model from a checkpoint folder's config.json, so `merge path llm-a/ llm-b/
--lm-text corpus.txt` needs no `--model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge.errors import UsageError

# Any one of these makes a folder loadable by AutoTokenizer (settings files alone do not).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def has_tokenizer(folder: str | Path) -> bool:
    p = Path(folder)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path) -> Any:
    """A tokenizer from a local folder (never the network)."""
    from transformers import AutoTokenizer

    p = Path(folder)
    if not p.is_dir():
        raise UsageError(
            f"--tokenizer {folder}: not a folder; give the folder holding tokenizer.json (or the model folder)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise UsageError(
            f"--tokenizer {folder}: cannot load a tokenizer from it ({type(e).__name__}: {e})"
        ) from e


class TextBatches:
    """`() -> list of {"input_ids": (B, T)} batches` over a text file; blocks of `seq_len` tokens."""

    def __init__(
        self,
        path: str | Path,
        tokenizer: str | Path,
        *,
        seq_len: int = 128,
        batch_size: int = 8,
        max_tokens: int | None = None,
    ):
        if seq_len < 2:
            raise UsageError(
                f"--seq-len must be at least 2 (one token predicts the next), got {seq_len}"
            )
        self.path = str(path)
        self.tokenizer = str(tokenizer)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.__qualname__ = f"text file {self.path}"
        self._batches: list[dict[str, torch.Tensor]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_batches": None}

    def __call__(self) -> list[dict[str, torch.Tensor]]:
        if self._batches is None:
            p = Path(self.path)
            if not p.is_file():
                raise UsageError(f"--lm-text {self.path} does not exist")
            text = p.read_text(encoding="utf-8", errors="replace")
            ids = load_tokenizer(self.tokenizer)(text, add_special_tokens=False)["input_ids"]
            if self.max_tokens is not None:
                ids = ids[: self.max_tokens]
            if len(ids) < 2:
                raise UsageError(
                    f"--lm-text {self.path}: holds {len(ids)} token(s); perplexity needs at least 2"
                )
            t = torch.tensor(ids, dtype=torch.long)
            full = len(t) // self.seq_len
            blocks = t[: full * self.seq_len].view(full, self.seq_len)  # (blocks, seq_len)
            batches = [
                {"input_ids": blocks[i : i + self.batch_size]}
                for i in range(0, full, self.batch_size)
            ]
            rest = t[full * self.seq_len :]
            if len(rest) >= 2:
                batches.append({"input_ids": rest.view(1, -1)})
            self._batches = batches
        return self._batches


class HFCausalLM:
    """`() -> nn.Module`: a Hugging Face causal LM built from `folder/config.json` (weights loaded later)."""

    def __init__(self, folder: str | Path):
        self.folder = str(folder)
        self.__qualname__ = f"AutoModelForCausalLM from {self.folder}/config.json"

    def __call__(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
            model = AutoModelForCausalLM.from_config(config)
        except Exception as e:
            raise UsageError(
                f"cannot build a causal LM from {self.folder}/config.json ({type(e).__name__}: {e}); pass --model"
            ) from e
        return model.float()  # type: ignore[no-any-return]


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()
