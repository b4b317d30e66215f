"""Which tensors of a checkpoint are indexed by token id (input and output embeddings).

Found by name, as the architectures transformers users merge call their embedding modules
(`embed_tokens` of Llama, Mistral, Qwen, Gemma, Phi, Granite and LLaVA's language model, GPT-2's
`wte`, GPT-NeoX's `embed_in`/`embed_out`, BLOOM's `word_embeddings`, `lm_head` with its bias
where Phi has one), and by shape: a candidate's first dimension must be the input embedding's
row count. Every such tensor has the vocabulary on axis 0, as mergekit's architecture files say.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# The last components of the names of input and output embeddings.
INPUT_NAMES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight", "lm_head.bias")


def _is(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


@dataclass(frozen=True)
class VocabTensors:
    """The token-indexed tensors of one checkpoint: its row count and their names."""

    rows: int
    inputs: tuple[str, ...]  # input embeddings (the first one fixes `rows`)
    outputs: tuple[str, ...]  # output embeddings (lm_head), absent when tied

    @property
    def names(self) -> tuple[str, ...]:
        return self.inputs + self.outputs


def find_vocab_tensors(shapes: Mapping[str, tuple[int, ...]]) -> VocabTensors | None:
    """The token-indexed tensors among `shapes` ({name: shape}), or None when there is no input
    embedding. A candidate whose first dimension is not the input embedding's rows is skipped
    (it is some other table that happens to share the name, e.g. a vision tower's)."""
    inputs = [n for n, s in shapes.items() if _is(n, INPUT_NAMES) and len(s) == 2]
    if not inputs:
        return None
    rows = shapes[inputs[0]][0]
    inputs = [n for n in inputs if shapes[n][0] == rows]
    outputs = [
        n for n, s in shapes.items() if _is(n, OUTPUT_NAMES) and len(s) >= 1 and s[0] == rows
    ]
    return VocabTensors(rows, tuple(inputs), tuple(outputs))


def tied_aliases(own: VocabTensors, others: Iterable[VocabTensors]) -> dict[str, str]:
    """{output embedding name: this model's input embedding} for output embeddings that other
    models have and this one lacks: a model without an `lm_head` ties it to its input
    embeddings, so that is the row a merge with untied models must take."""
    wanted = {n for o in others for n in o.outputs if n.endswith("weight")}  # a bias has no tie
    return {n: own.inputs[0] for n in sorted(wanted) if n not in own.outputs}
