"""The recipe's `tokenizer:` section: which vocabulary the output has and how rows are filled.

    tokenizer:
      source: union          # union | an input's name | a folder holding a tokenizer
      base: base             # first in a union; its row fills a token another model lacks
      tokens:                # per-token embedding sources (mergekit's `tokenizer.tokens`)
        "<|im_start|>": {source: chat, force: true}
        "<tool>": {source: {kind: model_token, model: code, token: "<tool_call>"}}
        "<pad>": {source: {kind: zero}}
      pad_to_multiple_of: 64 # extra rows hold the mean embedding
      chat_template: chatml  # auto | a built-in name | a literal Jinja template
      embed_slerp: false     # slerp steps: lerp the embedding rows instead (mergekit 0.0.4)

Validation of names against the recipe's inputs happens in `tokenizer_problems`, which the
recipe compiler calls so these problems are reported with every other one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge.errors import did_you_mean
from merge.vocab.chat import TEMPLATES, template_problem

UNION = "union"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZeroRow(_Strict):
    """`{kind: zero}`: the token's row is all zeros."""

    kind: Literal["zero"]


class ModelToken(_Strict):
    """`{kind: model_token, model: x, token: "<t>" | token_id: 5}`: a row of input x, by its
    own token or id (x's tokenizer; the id indexes x's embedding rows)."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> ModelToken:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of `token` or `token_id`")
        return self


class TokenSpec(_Strict):
    """One entry of `tokens:`. `source` an input's name takes that input's row for the token;
    `force` applies the source to every model, even those that have the token."""

    source: str | ModelToken | ZeroRow | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _by_kind(cls, v: Any) -> Any:
        """A mapping is read by its `kind`, so a mistake gets one message, not one per shape."""
        if not isinstance(v, Mapping):
            return v
        kinds: dict[str, type[_Strict]] = {"model_token": ModelToken, "zero": ZeroRow}
        kind = v.get("kind")
        if kind not in kinds:
            raise ValueError(
                f"a mapping source needs `kind: model_token` or `kind: zero`, not {kind!r}"
            )
        try:
            return kinds[kind].model_validate(v)
        except ValidationError as e:
            raise ValueError(
                "; ".join(
                    f"{'.'.join(str(x) for x in err['loc']) or kind}: "
                    + str(err["msg"]).removeprefix("Value error, ")
                    for err in e.errors()
                )
            ) from None


class TokenizerSpec(_Strict):
    source: str | None = None
    base: str | None = None
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(None, ge=1)
    chat_template: str | None = None
    embed_slerp: bool | None = None

    def input_names(self) -> list[str]:
        """Inputs whose weights this section reads besides the steps' own (the base, tokens' sources)."""
        out = [] if self.base is None else [self.base]
        for t in self.tokens.values():
            src = t.source
            name = src.model if isinstance(src, ModelToken) else src
            if isinstance(name, str) and name not in out:
                out.append(name)
        return out


def tokenizer_problems(
    spec: TokenizerSpec | None, inputs: Sequence[str], base_dir: Path
) -> list[tuple[str, str]]:
    """(key path, message) for every name in a recipe's `tokenizer:` section (`spec`) that is
    not one of its `inputs`, and every setting that does not apply."""
    if spec is None:
        return []
    inputs = list(inputs)
    out: list[tuple[str, str]] = []

    def need_input(path: str, name: str) -> None:
        if name not in inputs:
            out.append((path, f"no input named `{name}`{did_you_mean(name, inputs)}"))

    if spec.source is None and spec.chat_template is None:
        out.append(
            ("tokenizer", "give `source:` (union, an input or a folder) or `chat_template:`")
        )
    if spec.source is None:
        for key in ("base", "tokens", "pad_to_multiple_of", "embed_slerp"):
            if key in spec.model_fields_set:
                out.append(
                    (
                        f"tokenizer.{key}",
                        "only applies with `tokenizer.source` (union, an input or a folder); "
                        "without it the output keeps its layout input's tokenizer",
                    )
                )
    elif spec.source != UNION and spec.source not in inputs:
        path = Path(spec.source.removeprefix("model:")).expanduser()
        looks_like_path = "/" in spec.source or (base_dir / path).exists() or path.exists()
        if not looks_like_path:
            out.append(
                (
                    "tokenizer.source",
                    f"`{spec.source}` is neither `union`, an input"
                    f"{did_you_mean(spec.source, [UNION, *inputs])}, nor a folder; give one of "
                    f"those (inputs: {', '.join(inputs)})",
                )
            )
    if spec.base is not None:
        need_input("tokenizer.base", spec.base)
    for tok, t in spec.tokens.items():
        where = f"tokenizer.tokens.{tok}.source"
        if isinstance(t.source, ModelToken):
            need_input(f"{where}.model", t.source.model)
        elif isinstance(t.source, str):
            need_input(where, t.source)
    if spec.chat_template is not None:
        why = template_problem(spec.chat_template)
        if why:
            out.append(("tokenizer.chat_template", why))
    return out


__all__ = ["TEMPLATES", "ModelToken", "TokenSpec", "TokenizerSpec", "ZeroRow", "tokenizer_problems"]
