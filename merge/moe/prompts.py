"""Prompts through the base: tokenised as mergekit-moe does, embedded, and run layer by layer.

Tokenisation follows mergekit exactly, since the gates depend on it: the base's tokenizer, the
BOS token's text prepended to each prompt, no other special tokens, left padding with BOS as the
pad token (EOS where there is no BOS). All prompts of one list form one batch.

The hidden states are computed with bounded memory: the embedding rows of the prompts' tokens
are read from the base's embedding tensor, then one decoder layer at a time is loaded into a
one-layer copy of the base model (transformers' own code, so masks and rotary embeddings are
the architecture's), every prompt batch is run through it, and the layer is dropped. Peak
memory is one layer's weights plus the prompts' activations, whatever the model's size; each
weight is read once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.errors import UsageError
from merge.io.sources import TensorSource
from merge.progress import counted

EMBED = "model.embed_tokens.weight"


@dataclass(frozen=True)
class PromptBatch:
    """One prompt list, tokenised: ids and attention mask, both (prompts, tokens)."""

    input_ids: Tensor
    attention_mask: Tensor


def load_tokenizer(folder: Path, key: str) -> Any:
    """The base's tokenizer from its folder (never the network), set up to pad as mergekit does."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise UsageError(
            f"{key}: the gates need the base's tokenizer to read the prompts, and none loads from "
            f"{folder} ({type(e).__name__}: {str(e)[:200]}); add its tokenizer files, or use "
            "gate_mode: random"
        ) from None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize(tokenizer: Any, prompts: Sequence[str], key: str) -> PromptBatch:
    """`prompts` as one left-padded batch, each prefixed with the BOS token's text."""
    bos = tokenizer.bos_token or ""
    try:
        enc = tokenizer(
            [bos + p for p in prompts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
    except ValueError as e:  # no BOS or EOS token to pad prompts of different lengths with
        raise UsageError(
            f"{key}: cannot batch these prompts with the base's tokenizer ({e}); give it a BOS or "
            "EOS token, or prompts of equal token length"
        ) from None
    if enc["input_ids"].shape[1] == 0:
        raise UsageError(f"{key}: the prompts tokenise to nothing; write some text in them")
    return PromptBatch(enc["input_ids"], enc["attention_mask"])


def embed_rows(source: TensorSource, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """The base's embedding rows of `ids`, (prompts, tokens, hidden), reading only those rows."""
    vocab, hidden = source.meta(EMBED).shape
    unique = sorted({int(t) for t in ids.reshape(-1)})
    bad = [t for t in unique if not 0 <= t < vocab]
    if bad:
        raise UsageError(
            f"base_model: the tokenizer gives token ids {bad[:5]} but the embedding has {vocab} "
            "rows; the tokenizer files do not belong to this model"
        )
    table = torch.empty((len(unique), hidden), dtype=source.meta(EMBED).dtype)
    for row, t in enumerate(unique):
        source.read_range(EMBED, t * hidden, (t + 1) * hidden, out=table[row])
    lookup = torch.zeros(unique[-1] + 1, dtype=torch.long)
    lookup[torch.tensor(unique)] = torch.arange(len(unique))
    return table[lookup[ids]].to(dtype)  # (prompts, tokens, hidden)


def sliding_window(config: Any) -> int | None:
    """The attention window the base applies (None: full attention)."""
    if not getattr(config, "use_sliding_window", True):  # Qwen2 keeps a window it does not use
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


class LayerwiseBase:
    """The base model's decoder run one layer at a time, weights read from `source`."""

    def __init__(self, folder: Path, source: TensorSource, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModel

        self.source = source
        self.dtype = dtype
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        self.num_layers = int(config.num_hidden_layers)
        self.window = sliding_window(config)
        one = copy.deepcopy(config)
        one.num_hidden_layers = 1
        # Prompts shorter than the window (checked in `run`) see the same keys with full
        # attention, and one layer cannot carry a per-layer window pattern.
        one.sliding_window = None
        if hasattr(one, "use_sliding_window"):
            one.use_sliding_window = False
        if getattr(one, "layer_types", None) is not None:
            one.layer_types = ["full_attention"]
        with torch.device("meta"):  # no memory for the embedding, head or random init
            shell = AutoModel.from_config(one)
        shell.rotary_emb = type(shell.rotary_emb)(config=one)  # real buffers, on the CPU
        shell.norm = torch.nn.Identity()  # the next layer's input, not the normed output
        shell.eval()
        self.shell = shell

    def _load_layer(self, i: int) -> None:
        layer = self.shell.layers[0]
        layer.to_empty(device="cpu")
        prefix = f"model.layers.{i}."
        wanted = {k for k in layer.state_dict()}
        state = {
            k[len(prefix) :]: self.source.read(k)
            for k in self.source.keys()
            if k.startswith(prefix) and k[len(prefix) :] in wanted
        }
        missing = wanted - set(state)
        if missing:
            raise UsageError(
                f"base_model: layer {i} lacks {', '.join(sorted(prefix + m for m in missing))}; "
                "the checkpoint does not match its config.json"
            )
        layer.load_state_dict(state, strict=True)
        layer.to(self.dtype)

    def run(self, batches: Sequence[PromptBatch], *, average: bool, quiet: bool) -> list[Tensor]:
        """For each batch, (layers, hidden): the summary (`gates.prompt_summary`) of the hidden
        state entering every layer, layer 0's being the token embeddings."""
        from merge.moe.gates import prompt_summary

        longest = max(b.input_ids.shape[1] for b in batches)
        if self.window is not None and longest > self.window:
            raise UsageError(
                f"a prompt list is {longest} tokens long (padded), past the base's sliding window "
                f"of {self.window}; shorten the prompts"
            )
        states = [embed_rows(self.source, b.input_ids, self.dtype) for b in batches]
        summaries = [[prompt_summary(h, average=average)] for h in states]
        # The state entering the last layer is the last one a gate needs.
        for i in counted(
            range(self.num_layers - 1), "gate hidden states", quiet=quiet, unit="layers"
        ):
            self._load_layer(i)
            with torch.no_grad():
                for j, b in enumerate(batches):
                    out = self.shell(
                        inputs_embeds=states[j], attention_mask=b.attention_mask, use_cache=False
                    )
                    states[j] = out.last_hidden_state
                    summaries[j].append(prompt_summary(states[j], average=average))
        self.shell.layers[0].to("meta")  # drop the last layer's weights
        return [torch.stack(s) for s in summaries]
