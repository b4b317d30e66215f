"""`merge align`: checkpoint and JSON report written, --show-spec, --spec, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import align_entry
import pytest
import torch
from align_helpers import TrainedPair
from click.testing import CliRunner

from merge.cli import cli
from merge.io import load_state_dict, save_state_dict
from merge.toy import make_mlp

ENTRY = str(Path(__file__).parent / "align_entry.py")


def invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture
def checkpoints(mlp_pair: TrainedPair, tmp_path: Path) -> tuple[Path, Path]:
    return (
        save_state_dict(mlp_pair.a.state_dict(), tmp_path / "a.safetensors"),
        save_state_dict(mlp_pair.b.state_dict(), tmp_path / "b"),
    )


def test_align_writes_checkpoint_and_report(
    checkpoints: tuple[Path, Path], tmp_path: Path, mlp_pair: TrainedPair
) -> None:
    a, b = checkpoints
    out = tmp_path / "b_aligned.safetensors"
    code, text = invoke("align", a, b, "--model", f"{ENTRY}:make_model", "--seed", 3, "-o", out)
    assert code == 0, text
    assert f"wrote {out} and {tmp_path / 'b_aligned.align.json'}" in text
    assert "weight matching: objective" in text
    aligned = load_state_dict(out)
    assert set(aligned) == set(mlp_pair.b.state_dict())
    report = json.loads((tmp_path / "b_aligned.align.json").read_text())
    assert report["method"] == "weight" and report["seed"] == 3
    assert report["a"] == str(a) and report["b"] == str(b)
    assert set(report["groups"]) == {"P_layers.0", "P_layers.1"}
    assert report["groups"]["P_layers.0"]["size"] == 128
    assert report["objective_after"] > report["objective_before"]
    assert report["sweeps"] >= 2 and len(report["restarts"]) == 3
    assert report["extra"]["verification"]["aligned_vs_b"] < 1e-9
    model = make_mlp(16, 128, 4, 2).eval()
    x = mlp_pair.data[0][0]
    model.load_state_dict(aligned)
    torch.testing.assert_close(model(x), mlp_pair.b(x), rtol=1e-5, atol=1e-6)


def test_align_activation_into_a_folder(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = checkpoints
    out = tmp_path / "aligned"
    code, text = invoke(
        "align", a, b, "--model", f"{ENTRY}:make_model", "--method", "activation",
        "--data", f"{ENTRY}:make_data", "-o", out, "-q",
    )  # fmt: skip
    assert code == 0, text
    assert text == ""
    assert (out / "model.safetensors").exists() or list(out.glob("*.safetensors"))
    report = json.loads((tmp_path / "aligned.align.json").read_text())
    assert report["method"] == "activation" and report["extra"]["batches"] == 4


def test_show_spec_alone_prints_groups_and_reasons() -> None:
    code, text = invoke("align", "--model", f"{ENTRY}:make_model", "--show-spec")
    assert code == 0, text
    assert text.startswith(
        "permutation spec (inferred by torch.fx): 2 groups\n  P_layers.0  size 128, 3 members\n"
    )
    assert "reaches the model output (output order is part of the function):" in text


def test_hand_written_spec(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = checkpoints
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "groups:\n  h0:\n    size: 128\n    members: [[layers.0.weight, 0], [layers.0.bias, 0], [layers.1.weight, 1]]\n"
    )
    code, text = invoke(
        "align",
        a,
        b,
        "--model",
        f"{ENTRY}:make_model",
        "--spec",
        spec,
        "--show-spec",
        "-o",
        tmp_path / "o.safetensors",
    )
    assert code == 0, text
    assert "permutation spec (" + str(spec) + "): 1 groups" in text
    report = json.loads((tmp_path / "o.align.json").read_text())
    assert list(report["groups"]) == ["h0"] and report["extra"]["spec_source"] == str(spec)


def test_exit_codes_and_nothing_written_on_failure(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = checkpoints
    model = f"{ENTRY}:make_model"
    code, text = invoke("align", a, b, "--model", model)
    assert (code, text.strip()) == (
        2,
        "Error: merge align needs -o/--output for the aligned checkpoint (or use --show-spec alone)",
    )
    code, text = invoke("align", a, "--model", model, "-o", tmp_path / "x")
    assert (code, text.strip()) == (2, "Error: merge align takes two checkpoints, A and B (got 1)")
    code, text = invoke(
        "align", a, b, "--model", model, "--method", "activation", "-o", tmp_path / "x"
    )
    assert (code, text.strip()) == (2, "Error: --method activation needs --data MODULE:FN")
    code, text = invoke(
        "align", a, b, "--model", f"{ENTRY}:make_narrow_model", "-o", tmp_path / "x"
    )
    assert code == 1 and "does not match checkpoint A" in text
    code, text = invoke("align", a, b, "--model", f"{ENTRY}:make_untraceable", "-o", tmp_path / "x")
    assert code == 1 and "does not match checkpoint A" in text  # names checked before tracing
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "groups:\n  g:\n    size: 128\n    members: [[layers.1.weight, 0], [layers.1.bias, 0]]\n"
    )
    code, text = invoke("align", a, b, "--model", model, "--spec", bad, "-o", tmp_path / "x")
    assert code == 1 and "permutation group `g` is not a symmetry of the model" in text
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.align.json").exists()
    out = tmp_path / "done.safetensors"
    assert invoke("align", a, b, "--model", model, "-o", out, "-q")[0] == 0
    code, text = invoke("align", a, b, "--model", model, "-o", out, "-q")
    assert code == 1 and "already exists; pass --force to replace it" in text
    assert invoke("align", a, b, "--model", model, "-o", out, "-q", "--force")[0] == 0


def test_align_activation_on_a_one_shot_generator(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    # Tracing and the example input look at the first batch; both batches are still matched.
    a, b = checkpoints
    code, text = invoke(
        "align", a, b, "--model", f"{ENTRY}:make_model", "--method", "activation",
        "--data", f"{ENTRY}:two_batches", "-o", tmp_path / "aligned", "-q",
    )  # fmt: skip
    assert code == 0, text
    report = json.loads((tmp_path / "aligned.align.json").read_text())
    assert report["extra"]["batches"] == 2
    assert sum(g["moved"] for g in report["groups"].values()) > 100


def test_align_device_is_checked_like_every_verb(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = checkpoints
    args = ["align", a, b, "--model", f"{ENTRY}:make_model", "-o", tmp_path / "x.safetensors"]
    code, text = invoke(*args, "--device", "gpu")
    assert (code, text.strip()) == (
        2,
        "Error: --device `gpu` is not a device: use cpu, cuda, cuda:N or auto",
    )
    if not torch.cuda.is_available():
        code, text = invoke(*args, "--device", "cuda")
        assert code == 1 and "torch sees no CUDA device; use --device cpu or auto" in text
    assert not (tmp_path / "x.safetensors").exists()


def test_align_of_hugging_face_folders_writes_a_loadable_folder(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        align_entry.make_tiny_llama().save_pretrained(tmp_path / name)
    out = tmp_path / "b_aligned"
    code, text = invoke(
        "align", tmp_path / "a", tmp_path / "b", "--model", f"{ENTRY}:make_tiny_llama", "-o", out
    )
    assert code == 0, text
    assert f"wrote {out} (with config.json, generation_config.json from B)" in text
    aligned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(aligned(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-5)


def test_hub_error_names_the_installed_hf_command(tmp_path: Path) -> None:
    # A hub id that cannot be fetched (the endpoint refuses): the hint names `hf download`, the
    # command huggingface_hub installs (`huggingface-cli` is gone from it).
    import os
    import shutil
    import subprocess
    import sys

    assert shutil.which("hf", path=str(Path(sys.executable).parent))
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run(
        [sys.executable, "-m", "merge", "align", "someorg/no-such-model", "someorg/no-such-model",
         "--model", f"{ENTRY}:make_model", "-o", str(tmp_path / "x.safetensors")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "download it first with `hf download someorg/no-such-model`" in r.stderr
    assert "huggingface-cli" not in r.stderr
