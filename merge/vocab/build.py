"""The output tokenizer and where each input keeps each of its tokens (mergekit's rules).

- `base`: the base input's tokenizer with every token whose id has no embedding row removed
  (ids >= the base's row count: a tokenizer may list more tokens than the model was given);
- `union`: the base's tokens, then every other input's tokens the base lacks (ordinary tokens
  in their own id order, then added tokens with their settings, the first input's winning),
  appended with `add_tokens`, so the base's ids never move;
- an input's or a folder's tokenizer, as it is.

Tokens named under `tokens:` that the result lacks are added after. Each input's token -> row
map is its own tokenizer's vocabulary, ids without an embedding row left out; an input whose
tokenizer cannot be loaded is taken to share the base's (as mergekit does, with a warning).
Tokenizers are loaded with transformers' `AutoTokenizer` (fast where there is one).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge.errors import MergeWarning, UsageError
from merge.io.support_files import TOKENIZER_FILES


@dataclass
class OutputVocab:
    """The output tokenizer, its token -> id map, and each input's token -> embedding row."""

    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    ids: dict[str, int]
    inputs: dict[str, dict[str, int]]  # input -> {token: its row}, rows below its row count
    originals: dict[str, dict[str, int]]  # input -> its own tokenizer's whole vocabulary

    @property
    def size(self) -> int:
        return len(self.ids)


def load_tokenizer(root: Path, where: str) -> Any:
    """transformers' tokenizer of the folder `root` (fast where possible); UsageError naming
    `where` when there is none."""
    from transformers import AutoTokenizer

    if not root.is_dir():
        raise UsageError(f"{where}: {root} is not a folder, so it holds no tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(root), use_fast=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"{where}: cannot load a tokenizer from {root} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no message'}); the folder needs "
            "tokenizer.json or tokenizer.model with tokenizer_config.json"
        ) from None


def _reloaded(tok: Any) -> Any:
    """A fresh copy of a tokenizer (saved and loaded again), so adding tokens leaves `tok` alone."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="merge-tok-") as tmp:
        tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True)


def stripped_tokenizer(root: Path, rows: int, where: str) -> Any:
    """The tokenizer of `root` without the tokens whose ids are `rows` or more.

    The vocabulary, added tokens and BPE merges of tokenizer.json lose those tokens (WordLevel,
    WordPiece and BPE keep a token -> id map, Unigram a list in id order: either way only the
    tail goes, so no other id moves), and tokenizer_config.json's added tokens with them.
    """
    from transformers import AutoTokenizer

    tok = load_tokenizer(root, where)
    vocab = tok.get_vocab()
    removed = {t for t, i in vocab.items() if i >= rows}
    if not removed:
        return tok
    if not (root / "tokenizer.json").is_file():
        raise UsageError(
            f"{where}: its tokenizer has {len(removed)} tokens with ids at or past its {rows} "
            "embedding rows, and only a fast tokenizer (tokenizer.json) can be cut to the rows; "
            "convert it, or use another input's tokenizer"
        )
    with tempfile.TemporaryDirectory(prefix="merge-tok-") as tmp:
        for name in (*TOKENIZER_FILES, "config.json"):
            if (root / name).is_file():
                shutil.copyfile(root / name, Path(tmp) / name)
        data = json.loads((root / "tokenizer.json").read_text())
        data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < rows]
        model = data.get("model", {})
        table = model.get("vocab")
        if isinstance(table, dict):
            model["vocab"] = {t: i for t, i in table.items() if i < rows}
        elif isinstance(table, list):  # Unigram: [piece, score] pairs in id order
            model["vocab"] = table[:rows]
        if isinstance(model.get("merges"), list):
            model["merges"] = [m for m in model["merges"] if not _merge_uses(m, removed)]
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
        cfg_path = Path(tmp) / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            decoder = cfg.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < rows}
            for key in ("additional_special_tokens", "extra_special_tokens"):
                if isinstance(cfg.get(key), list):  # else loading adds them back, past the rows
                    cfg[key] = [t for t in cfg[key] if _content(t) not in removed]
            cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    left = sorted(t for t, i in out.get_vocab().items() if i >= rows)
    if left:  # a special token (pad, eos...) that the settings add back past the rows
        raise UsageError(
            f"{where}: its tokenizer settings name tokens that have no embedding row "
            f"({', '.join(left[:5])}); give the model rows for them or use another tokenizer"
        )
    return out


def _content(token: str | dict[str, Any]) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _merge_uses(merge: str | list[str], removed: set[str]) -> bool:
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    return any(p in removed for p in parts) or "".join(parts) in removed


def union_tokenizer(
    base: Any,
    others: Sequence[tuple[Any, int | None]],
    vocabs: Sequence[Mapping[str, int]] | None = None,
) -> Any:
    """`base` with every token of `others` ((tokenizer, row count or None)) it lacks appended:
    ordinary tokens first, in each tokenizer's id order, then added tokens (first settings win).
    `vocabs`: the tokenizers' vocabularies (base first) when the caller has them already."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    tokenizers = [(base, None), *others]
    if vocabs is None:
        vocabs = [t.get_vocab() for t, _ in tokenizers]
    for (tok, rows), vocab in zip(tokenizers, vocabs):
        decoder = tok.added_tokens_decoder
        names = {a.content for a in decoder.values()}
        for t, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if (rows is None or i < rows) and t not in names:
                plain.setdefault(t)
        for i, info in sorted(decoder.items()):
            if rows is None or i < rows:
                added.setdefault(info.content, info)
    out = _reloaded(base)
    have = vocabs[0]
    # One call each: ids follow list order, and a call per token rebuilds the added-token
    # matcher every time (minutes for the tens of thousands a union of two families adds).
    out.add_tokens([t for t in plain if t not in added and t not in have])
    out.add_tokens(list(added.values()))
    return out


def build_vocab(
    source: str,
    *,
    order: Sequence[str],
    base: str,
    roots: Mapping[str, Path | None],
    rows: Mapping[str, int],
    source_root: Path | None,
    extra_tokens: Sequence[str] = (),
) -> OutputVocab:
    """The output vocabulary for `source` (`union`, an input name, or `source_root`'s tokenizer).

    Args:
        order: the inputs whose tokens count, in order (the union's order after `base`).
        base: the input whose tokenizer starts the union and stands in for missing ones.
        roots: each input's folder (None: no folder, so no tokenizer of its own).
        rows: each checkpoint input's embedding rows (token ids at or past them are left out).
    """
    where = f"tokenizer: input `{base}` (whose tokenizer the output starts from)"
    base_root = roots.get(base)
    if base_root is None:
        raise UsageError(
            f"{where}: not a model folder (a single weights file or tensors in memory), so it "
            "has no tokenizer; give a model folder"
        )
    base_tok = (
        stripped_tokenizer(base_root, rows[base], where)
        if base in rows
        else load_tokenizer(base_root, where)
    )
    toks: dict[str, Any] = {base: base_tok}
    assumed: list[str] = []
    for name in order:
        if name in toks:
            continue
        root = roots.get(name)
        try:
            if root is None:
                raise UsageError("no folder")
            toks[name] = load_tokenizer(root, f"input `{name}`")
        except UsageError:
            assumed.append(name)
            toks[name] = base_tok
    if assumed:
        warnings.warn(
            f"tokenizer: no tokenizer could be loaded for input(s) {', '.join(assumed)}; taken to "
            f"be the same as `{base}`'s (as mergekit does)",
            MergeWarning,
            stacklevel=2,
        )
    vocabs = {id(t): dict(t.get_vocab()) for t in toks.values()}  # one call each: it copies
    originals = {n: vocabs[id(t)] for n, t in toks.items()}
    past = {n: [t for t, i in originals[n].items() if i >= rows[n]] for n in rows if n in toks}
    past = {n: ts for n, ts in past.items() if ts and n != base}
    if past:
        warnings.warn(
            "tokenizer: "
            + "; ".join(
                f"input `{n}` has {len(ts)} token(s) past its {rows[n]} embedding rows "
                f"(e.g. {sorted(ts)[0]!r})"
                for n, ts in past.items()
            )
            + "; they have no row and are left out, as mergekit does",
            MergeWarning,
            stacklevel=2,
        )
    if source == "union":
        others = [n for n in order if n != base and toks[n] is not base_tok]
        out = union_tokenizer(
            base_tok,
            [(toks[n], rows.get(n)) for n in others],
            [originals[n] for n in [base, *others]],
        )
    elif source == base:
        out = _reloaded(base_tok)
    else:  # another input's or a folder's tokenizer, as it is (mergekit does not cut it)
        root = source_root if source_root is not None else roots.get(source)
        if root is None:
            raise UsageError(
                f"tokenizer.source: input `{source}` is not a model folder (a single weights "
                "file or tensors in memory), so it has no tokenizer; give a model folder"
            )
        out = load_tokenizer(root, f"tokenizer.source `{source}`")
    have = set(out.get_vocab())
    out.add_tokens([t for t in dict.fromkeys(extra_tokens) if t not in have])
    ids = dict(out.get_vocab())
    if sorted(ids.values()) != list(range(len(ids))):
        raise UsageError(
            f"tokenizer.source: the output tokenizer's {len(ids)} ids are not 0..{len(ids) - 1} "
            "(it skips ids), so they cannot index embedding rows"
        )
    inputs = {n: {t: i for t, i in originals[n].items() if i < rows[n]} for n in rows if n in toks}
    return OutputVocab(out, ids, inputs, originals)
