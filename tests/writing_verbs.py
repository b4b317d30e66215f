"""Every command that writes a model, with tiny real inputs: for the output-safety and signal tests.

`build_world(folder)` writes a tiny Llama base and a fine-tune (transformers `save_pretrained`),
a peft LoRA of the base, two MLP checkpoints with an entry-point file (`merge align`, `stats`,
`data-merge`), four power-EMA snapshots and a `merge moe` config; `VERBS` turns a world and an
output path into each writing command's argument list, and says which inputs the command reads.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from merge.io import save_state_dict

LLAMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
)

ENTRY = """
from merge.toy import batches, make_mlp, synthetic_classification


def make_model():
    return make_mlp(in_features=8, hidden=16, out_features=3, depth=2)


def make_data():
    X, y = synthetic_classification(0, 64, in_features=8, num_classes=3)
    return batches(X, y, 32)
"""


def build_world(root: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    w: dict[str, Path] = {}
    base = LlamaForCausalLM(LlamaConfig(**LLAMA))  # type: ignore[arg-type]
    base.save_pretrained(root / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(root / "tuned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(
            LlamaForCausalLM.from_pretrained(root / "base"),
            LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        pm.save_pretrained(root / "adapter")
    w |= {k: root / k for k in ("base", "tuned", "adapter")}
    (root / "entry.py").write_text(ENTRY)
    w["entry"] = root / "entry.py"
    ns: dict[str, object] = {}
    exec(ENTRY, ns)
    for name, seed in (("mlp_a", 1), ("mlp_b", 2)):
        torch.manual_seed(seed)
        net = ns["make_model"]()  # type: ignore[operator]
        w[name] = save_state_dict(net.state_dict(), root / f"{name}.safetensors")
    for i, (step, sigma) in enumerate([(10, 0.05), (10, 0.1), (20, 0.05), (20, 0.1)]):
        w[f"snap{i}"] = save_state_dict(
            {"w": torch.randn(4, 4)},
            root / f"snap{i}",
            metadata={"step": str(step), "sigma_rel": str(sigma)},
        )
    (root / "recipe.yaml").write_text(
        f"inputs: {{base: {w['base']}, tuned: {w['tuned']}}}\n"
        "steps: {r: 'base + 0.5 * (tuned - base)'}\n"
    )
    w["recipe"] = root / "recipe.yaml"
    (root / "moe.yaml").write_text(
        f"base_model: {w['base']}\ngate_mode: random\n"
        f"experts: [{{source_model: {w['base']}}}, {{source_model: {w['tuned']}}}]\n"
    )
    w["moe"] = root / "moe.yaml"
    return w


def _ent(w: dict[str, Path], fn: str) -> str:
    return f"{w['entry']}:{fn}"


# name -> (argument list for an output, the inputs it reads, an input it may be pointed at)
Verb = tuple[Callable[[dict[str, Path], str], list[str]], tuple[str, ...]]
VERBS: dict[str, Verb] = {
    "linear": (
        lambda w, o: ["linear", str(w["base"]), str(w["tuned"]), "-o", o],
        ("base", "tuned"),
    ),
    "run": (lambda w, o: ["run", str(w["recipe"]), "-o", o], ("base", "tuned")),
    "moe": (lambda w, o: ["moe", str(w["moe"]), "-o", o], ("base", "tuned")),
    "ema": (
        lambda w, o: ["ema", str(w["base"]), str(w["tuned"]), "--swa", "-o", o],
        ("base", "tuned"),
    ),
    "ema-sigma-rel": (
        lambda w, o: [
            "ema",
            *(str(w[f"snap{i}"]) for i in range(4)),
            "--sigma-rel",
            "0.07",
            "-o",
            o,
        ],
        ("snap0", "snap1", "snap2", "snap3"),
    ),
    "lora-bake": (
        lambda w, o: ["lora", "bake", str(w["base"]), str(w["adapter"]), "-o", o],
        ("base", "adapter"),
    ),
    "lora-combine": (
        lambda w, o: ["lora", "combine", str(w["adapter"]), str(w["adapter"]), "-o", o],
        ("adapter",),
    ),
    "lora-extract": (
        lambda w, o: ["lora", "extract", str(w["base"]), str(w["tuned"]), "--rank", "2", "-o", o],
        ("base", "tuned"),
    ),
    "lora-convert": (
        lambda w, o: ["lora", "convert", str(w["adapter"]), "--to", "peft", "-o", o],
        ("adapter",),
    ),
    "align": (
        lambda w, o: [
            "align",
            str(w["mlp_a"]),
            str(w["mlp_b"]),
            "--model",
            _ent(w, "make_model"),
            "-o",
            o,
        ],
        ("mlp_a", "mlp_b"),
    ),
    "stats": (
        lambda w, o: [
            "stats",
            "fisher",
            str(w["mlp_a"]),
            "--model",
            _ent(w, "make_model"),
            "--data",
            _ent(w, "make_data"),
            "--n-examples",
            "16",
            "-o",
            o,
        ],
        ("mlp_a",),
    ),
    "data-merge": (
        lambda w, o: [
            "data-merge",
            "regmean",
            str(w["mlp_a"]),
            str(w["mlp_b"]),
            "--model",
            _ent(w, "make_model"),
            "--data",
            _ent(w, "make_data"),
            "--data",
            _ent(w, "make_data"),
            "--n-examples",
            "16",
            "-o",
            o,
        ],
        ("mlp_a", "mlp_b"),
    ),
}


def tree_hash(path: Path) -> str:
    """Every file's relative name, bytes and mode under `path` (or the file itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(f.read_bytes())
        h.update(oct(f.stat().st_mode).encode())
    return h.hexdigest()


def staging_left(folder: Path) -> list[str]:
    """Staging (`.NAME.tmp-*`) and aside (`.NAME.old-*`) paths anywhere under `folder`."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob(".*")
        if ".tmp-" in p.name or ".old-" in p.name or ".swap-" in p.name
    )


# A `merge` process whose tensor writer pauses after its first bytes: signals and concurrent runs
# then land mid-write, whatever the machine's speed. Only the writer is slowed; the signal policy,
# staging and clean-up are the real ones (`merge.console.main`).
SLOW_MERGE = """
import os, sys, time
from pathlib import Path
import merge.io.writer as W
real = W.TensorFileWriter._raw_write
def slow(self, data):
    real(self, data)
    ready = Path(os.environ["MERGE_TEST_READY"])
    if not ready.exists():
        ready.write_text(str(os.getpid()))
        time.sleep(120)
W.TensorFileWriter._raw_write = slow
from merge.console import main
main(sys.argv[1:])
"""


def start_slow_merge(
    args: list[str], ready: Path, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """Start `merge ARGS` in a child whose writer pauses once `ready` exists (see SLOW_MERGE)."""
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, *args],
        env=child_env(MERGE_TEST_READY=str(ready)),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def child_env(**extra: str) -> dict[str, str]:
    """This worktree's `merge` first on the path, warnings as usual, no colour."""
    import merge

    root = str(Path(merge.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def wait_for(
    cond: Callable[[], bool], proc: subprocess.Popen[str], what: str, limit: float = 120
) -> None:
    """Poll `cond` until true; fail with the child's output if it exits or `limit` seconds pass."""
    end = time.monotonic() + limit
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"child exited {proc.returncode} before {what}:\n{out}\n{err}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
