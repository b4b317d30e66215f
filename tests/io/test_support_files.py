"""Files copied beside merged weights (14.16): the model format's files by name, never the base's
model card or stray files; sentence-transformers module folders included."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from merge.cli import cli


def invoke(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def test_single_file_input_copies_format_files_by_name(tmp_path: Path) -> None:
    src = tmp_path / "base"
    src.mkdir()
    save_file({"w": torch.ones(2, 2)}, src / "model.safetensors")
    save_file({"w": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    keep = {
        "config.json": '{"model_type": "foo", "auto_map": {"AutoModel": "modeling_foo.FooModel"}}',
        "modeling_foo.py": "class FooModel: ...\n",  # custom code that auto_map names
        "generation_config.json": "{}",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
        "chat_template.jinja": "{{ messages }}",
        "merges.txt": "#version: 0.2\n",
    }
    stray = {
        "README.md": "# base-model\naccuracy 91%\n",
        "train.py": "print('hi')\n",
        "notes.txt": "x\n",
        "eval_results.json": "{}",
        ".gitattributes": "*.safetensors filter=lfs\n",
    }
    for name, text in {**keep, **stray}.items():
        (src / name).write_text(text)
    code, out = invoke(
        "linear", src / "model.safetensors", tmp_path / "other.safetensors", "-o", tmp_path / "out"
    )
    assert code == 0, out
    got = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    # README.md and merge-recipe.yaml are the merge's own model card, never the base's.
    assert got == sorted([*keep, "model.safetensors", "README.md", "merge-recipe.yaml"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "accuracy 91%" not in card and "- merge" in card
    assert f"; copied from {src / 'model.safetensors'}: {', '.join(sorted(keep))}" in out


def _st_folder(root: Path, seed: int) -> None:
    """A tiny sentence-transformers MiniLM-style folder: BERT at the root + Pooling + Normalize."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(root)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"]) + "\n")
    (root / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\n# all-MiniLM\n")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "config_sentence_transformers.json").write_text('{"similarity_fn_name": "cosine"}')
    (root / "sentence_bert_config.json").write_text('{"max_seq_length": 32}')
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 16, "pooling_mode_mean_tokens": true}'
    )
    (root / "2_Normalize").mkdir()


def test_sentence_transformers_folder_keeps_its_modules(tmp_path: Path) -> None:
    """The layout sentence-transformers' loader reads (modules.json, each listed module folder,
    its configs) is in the output; the root model loads in transformers; README.md is not copied."""
    from transformers import BertModel

    a, b = tmp_path / "a", tmp_path / "b"
    _st_folder(a, 0)
    _st_folder(b, 1)
    code, out = invoke("linear", a, b, "-o", tmp_path / "m")
    assert code == 0, out
    m = tmp_path / "m"
    assert "# all-MiniLM" not in (m / "README.md").read_text()  # our card, not the base's
    for module in json.loads((m / "modules.json").read_text()):
        src = a / module["path"]  # every file of every listed module folder is there
        for f in (p for p in src.rglob("*") if p.is_file() and module["path"]):
            assert (m / f.relative_to(a)).read_bytes() == f.read_bytes(), f
    assert (m / "1_Pooling" / "config.json").read_text() == (
        a / "1_Pooling" / "config.json"
    ).read_text()
    for name in ("config_sentence_transformers.json", "sentence_bert_config.json", "vocab.txt"):
        assert (m / name).read_bytes() == (a / name).read_bytes()
    merged = BertModel.from_pretrained(m).state_dict()
    wa, wb = BertModel.from_pretrained(a).state_dict(), BertModel.from_pretrained(b).state_dict()
    k = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(merged[k], (wa[k] + wb[k]) / 2)
