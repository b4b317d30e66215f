from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge.errors import FormatError, UsageError
from merge.io import load_state_dict, open_checkpoint


def sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(4, 3, generator=g).bfloat16(),
        "b": torch.randn(3, generator=g),
        "steps": torch.tensor(7),
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def test_pt_file_with_nested_state_dict(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "state_dict": sd()}, tmp_path / "x.ckpt")
    assert same(load_state_dict(tmp_path / "x.ckpt"), sd())


def test_legacy_non_zip_pickle_loads_without_mmap(tmp_path: Path) -> None:
    torch.save(sd(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert same(load_state_dict(tmp_path / "old.pt"), sd())


def test_sharded_bin_index(tmp_path: Path) -> None:
    d = sd()
    torch.save({"w": d["w"]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": d["b"], "steps": d["steps"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {
        "weight_map": {
            "w": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00002-of-00002.bin",
            "steps": "pytorch_model-00002-of-00002.bin",
        }
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    src = open_checkpoint(tmp_path)
    assert sorted(src.keys()) == ["b", "steps", "w"]
    assert same({k: src.read(k) for k in d}, d)


def test_pickle_with_unknown_globals_is_refused_with_their_names(tmp_path: Path) -> None:
    torch.save({"state_dict": sd(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "train.ckpt")
    with pytest.raises(FormatError) as e:
        open_checkpoint(tmp_path / "train.ckpt")
    assert "refusing to unpickle objects beyond tensors; globals found: argparse.Namespace" in str(
        e.value
    )
    assert "--unsafe-pickle" in str(e.value)
    # The explicit opt-in loads it.
    assert same(
        {k: open_checkpoint(tmp_path / "train.ckpt", unsafe_pickle=True).read(k) for k in sd()},
        sd(),
    )


def test_hub_id_resolves_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, snap / "model.safetensors")
    (snap / "config.json").write_text("{}")
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    src = open_checkpoint("org/tiny")
    assert torch.equal(src.read("w"), torch.ones(2))
    with pytest.raises(
        UsageError, match="`org/missing` is neither a local path nor in the Hugging Face cache"
    ):
        open_checkpoint("org/missing")


@pytest.mark.parametrize(
    ("tensors", "config", "fmt"),
    [
        ({"l.weight": torch.zeros(2, dtype=torch.float8_e4m3fn)}, None, "fp8-quantized"),
        (
            {"l.qweight": torch.zeros(2, dtype=torch.int32), "l.scales": torch.zeros(2)},
            None,
            "GPTQ/AWQ",
        ),
        (
            {"l.weight": torch.zeros(2, dtype=torch.int8), "l.SCB": torch.zeros(2)},
            None,
            "bitsandbytes int8",
        ),
        (
            {"l.weight": torch.zeros(2)},
            {"quantization_config": {"quant_method": "awq"}},
            "quantized checkpoint (awq",
        ),
    ],
)
def test_quantized_checkpoints_are_refused(
    tmp_path: Path, tensors: dict, config: dict | None, fmt: str
) -> None:
    save_file(tensors, tmp_path / "model.safetensors")
    if config:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=fmt.replace("(", r"\(")):
        open_checkpoint(tmp_path)


def test_gguf_refused(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(FormatError, match="GGUF is a quantized llama.cpp format"):
        open_checkpoint(tmp_path / "m.gguf")


def test_unknown_folder_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FormatError, match=r"no checkpoint found .*found: notes.txt"):
        open_checkpoint(tmp_path)
    with pytest.raises(UsageError, match="does not exist; check the path"):
        open_checkpoint(tmp_path / "nope")


def test_module_and_dict_inputs() -> None:
    m = torch.nn.Linear(3, 2)
    src = open_checkpoint(m)
    assert torch.equal(src.read("weight"), m.weight.detach())
    with pytest.raises(UsageError, match="must map names to torch tensors"):
        open_checkpoint({"a": 1})


def test_legacy_pickle_refusal_names_the_offending_globals(tmp_path: Path) -> None:
    f = tmp_path / "old.pt"
    torch.save(
        {"state_dict": sd(), "args": argparse.Namespace(lr=0.1)},
        f,
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(FormatError) as e:
        open_checkpoint(f)
    assert (
        f"{f}: refusing to unpickle objects beyond tensors; globals found: argparse.Namespace. "
        in str(e.value)
    )


def test_unsafe_pickle_says_once_what_it_loads_and_allows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "train.ckpt"
    torch.save({"state_dict": sd(), "args": argparse.Namespace(lr=0.1)}, f)
    src = open_checkpoint(f, unsafe_pickle=True)
    assert same({k: src.read(k) for k in sd()}, sd())
    open_checkpoint(f, unsafe_pickle=True)
    err = capsys.readouterr().err
    line = (
        f"--unsafe-pickle: loading {f} with full pickle; it may run code. "
        "Globals it names beyond tensors (all allowed): argparse.Namespace\n"
    )
    assert err.count(line) == 1, err


def test_unsafe_pickle_load_failure_is_a_clear_error(tmp_path: Path) -> None:
    # A (legacy-format) pickle naming a module that does not exist: unpickling fails on import.
    f = tmp_path / "bad.pt"
    f.write_bytes(b"\x80\x02cno_such_module_here\nGone\nq\x00)\x81q\x01.")
    with pytest.raises(
        FormatError,
        match=rf"{f}: cannot load this PyTorch file, even with --unsafe-pickle "
        r"\((ModuleNotFoundError|UnpicklingError|RuntimeError)",
    ):
        open_checkpoint(f, unsafe_pickle=True)


def test_non_finite_tensor_in_a_pt_file_warns(tmp_path: Path) -> None:
    from merge.errors import MergeWarning

    torch.save({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "m.pt")
    with pytest.warns(MergeWarning, match=r"m.pt: tensor `w` holds 1 NaN or Inf values"):
        open_checkpoint(tmp_path / "m.pt").read("w")


def test_diffusers_pipeline_index_and_model_index_are_validated(tmp_path: Path) -> None:
    import json

    (tmp_path / "model_index.json").write_text("[1]")
    with pytest.raises(FormatError, match="model_index.json must be a JSON object of components"):
        open_checkpoint(tmp_path)
    (tmp_path / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]})
    )
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../secret.safetensors"}})
    )
    with pytest.raises(FormatError, match=r"`weight_map`.a points outside the model folder"):
        open_checkpoint(tmp_path)
