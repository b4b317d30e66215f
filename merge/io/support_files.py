"""Which non-tensor files of a model folder an output copies: those its format loads, by name.

A merged model is a new model: it keeps the base's config, tokenizer, generation settings and
chat template (the loaders need them), but not its model card (README.md: the base's identity,
metrics and license text), notes, scripts or other stray files. Named files only:

- transformers: `config.json`, `generation_config.json`, tokenizer and processor files, chat
  templates, and the custom-code `*.py` modules that `config.json`'s `auto_map` names;
- sentence-transformers: `modules.json`, `config_sentence_transformers.json`,
  `sentence_bert_config.json` and every module folder `modules.json` lists (`1_Pooling/`, ...);
  the whole folder is copied, so a module's own weights (`2_Dense/model.safetensors`) come
  from the base unmerged (`unmerged_module_weights` names them).
"""

from __future__ import annotations

import json
from pathlib import Path

# tokenizers (fast, slow BPE/WordPiece/SentencePiece, tiktoken) and their settings
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_SUFFIXES = (".tiktoken",)  # tokenizer files whose stem varies
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    # processors of multimodal models
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    # sentence-transformers
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)
TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def is_tokenizer_file(relpath: str) -> bool:
    """Whether a support file (its path in the folder) belongs to the tokenizer."""
    return relpath in TOKENIZER_FILES or relpath.endswith(TOKENIZER_SUFFIXES)


def read_json(path: Path) -> object:
    """The JSON in `path`, or None when it is unreadable or not JSON (copied as it is then)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _auto_map_modules(config: Path) -> set[str]:
    """Module files (`modeling_x.py`) that `config.json`'s `auto_map` points at (trust_remote_code)."""
    cfg = read_json(config)
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if not isinstance(auto_map, dict):
        return set()
    refs: list[str] = []
    for v in auto_map.values():
        refs += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]
    # "modeling_x.Class" or "owner/repo--modeling_x.Class": the module is before the last dot
    return {r.split("--")[-1].rpartition(".")[0] + ".py" for r in refs if "." in r}


def sentence_transformers_modules(root: Path) -> list[str]:
    """The module folders (`1_Pooling`, ...) that `modules.json` lists ("" = the root: skipped)."""
    mods = read_json(root / "modules.json")
    if not isinstance(mods, list):
        return []
    out = []
    for m in mods:
        path = m.get("path") if isinstance(m, dict) else None
        if isinstance(path, str) and path and ".." not in Path(path).parts:
            out.append(path)
    return out


def select_support_files(root: Path, tensor_files: set[str]) -> list[tuple[str, Path]]:
    """(relpath, source) of the files a model folder `root` needs beside merged weights, sorted.

    `tensor_files`: the names of the input's own weight files (never copied). Module folders of
    sentence-transformers are copied whole (an empty one, such as `2_Normalize/`, holds nothing
    its loader reads: hub repositories cannot even store it).
    """
    out: list[tuple[str, Path]] = []
    wanted = set(MODEL_FILES) | _auto_map_modules(root / "config.json")
    for f in sorted(root.iterdir()):
        if not f.is_file() or f.name in tensor_files:
            continue
        if f.name in wanted or f.suffix in TOKENIZER_SUFFIXES:
            out.append((f.name, f))
    for module in sentence_transformers_modules(root):
        folder = root / module
        if not folder.is_dir():
            continue
        files = [f for f in sorted(folder.rglob("*")) if f.is_file()]
        out += [(f.relative_to(root).as_posix(), f) for f in files]
    return out


def unmerged_module_weights(copied: list[tuple[str, Path]]) -> list[str]:
    """Copied files that hold weights (a sentence-transformers Dense module's): not merged."""
    return [rel for rel, src in copied if "/" in rel and src.suffix in TENSOR_SUFFIXES]
