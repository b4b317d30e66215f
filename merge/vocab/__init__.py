"""Tokenizers and embedding rows of a merge whose inputs' vocabularies differ (mergekit's
`tokenizer_source`, `tokenizer:`, `chat_template` and `embed_slerp`).

    spec.py    the recipe's `tokenizer:` section and its name checks
    build.py   the output tokenizer (base, union, an input's or a folder's) and token maps
    fill.py    where each output row of each model comes from (pure rules)
    view.py    lazy views showing the inputs' embeddings in the output vocabulary
    attach.py  wiring: views before planning, tokenizer files and config after
    chat.py    chat templates: auto, built-in names, literals
"""

from merge.vocab.spec import TokenizerSpec, tokenizer_problems

__all__ = ["TokenizerSpec", "tokenizer_problems"]
