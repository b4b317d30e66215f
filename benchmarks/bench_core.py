"""Core benchmark: linear and task-arithmetic merges against a plain copy of the same bytes.

    python benchmarks/bench_core.py                 # ~1 GB and ~3 GB sets (needs ~25 GB of disk)
    python benchmarks/bench_core.py --sizes 1       # the ~1 GB set only

Builds synthetic Llama-shaped bf16 checkpoints (sharded at 1 GB) under --data, then times, each
in a fresh process so peak RSS is its own (ru_maxrss, what `/usr/bin/time -v` reports):
- copy: read every input tensor into reused buffers and write one output of the same bytes,
  with no math (the I/O bound of a merge, done the same careful way);
- linear: `merge linear` of 3 inputs;
- task arithmetic: base + 3 task vectors (4 inputs read);
- mergekit-yaml on the same inputs when it is installed (not a dependency of ours).
Files are warm in the page cache for every contestant (each set is read once before timing),
and every timed run starts after `sync` with the previous output removed, so no run pays for
another's writeback. Ours run --repeat times, interleaved; the table gives the best run and the
ratio of medians (mergekit runs once: it takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # name: (hidden, intermediate, layers, vocab) -> about 1 GB and 3 GB of bf16
    "1GB": (1024, 2816, 32, 32000),
    "3GB": (2048, 5632, 26, 32000),
}


def llama_tensors(
    hidden: int, inter: int, layers: int, vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.v_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def write_config(dest: Path, hidden: int, inter: int, layers: int, vocab: int) -> None:
    """A real Llama config.json, so the folder loads with transformers (and mergekit)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        vocab_size=vocab,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    ).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "bfloat16"
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))


def build_checkpoint(
    dest: Path, spec: list[tuple[str, tuple[int, ...]]], seed: int, shape: tuple[int, int, int, int]
) -> None:
    """Stream random bf16 tensors into a sharded folder without holding the model in memory."""
    from merge.io.writer import OutputTensor, StagedOutput, TensorFileWriter, plan_files, write_json

    if dest.exists():
        write_config(dest, *shape)
        return
    tensors = [OutputTensor(n, s, torch.bfloat16) for n, s in spec]
    plans, index = plan_files(tensors, shard_size=10**9)
    g = torch.Generator().manual_seed(seed)
    with StagedOutput(dest, is_dir=True) as staged:
        with TensorFileWriter(staged.path(), plans) as w:  # a failure releases its buffers
            for t in tensors:
                w.write(
                    t.name,
                    torch.randn(t.shape, generator=g, dtype=torch.float32)
                    .mul_(0.02)
                    .to(torch.bfloat16),
                )
            w.finish()
        if index:
            write_json(staged.path("model.safetensors.index.json"), index)
        staged.commit()
    write_config(dest, *shape)


COPY_SCRIPT = r"""
import gc
gc.disable()  # the same start-up as the `merge` console script (merge/console.py)
import os, sys, json, resource, time, torch
from pathlib import Path
from merge.io import open_checkpoint
from merge.io.writer import OutputTensor, StagedOutput, TensorFileWriter, plan_files
gc.freeze()
gc.enable()
inputs, out = sys.argv[1:-1], Path(sys.argv[-1])
srcs = [open_checkpoint(p) for p in inputs]
names = srcs[0].keys()
names.sort(key=lambda n: (srcs[0].meta(n).file, srcs[0].meta(n).offset))
plans, _ = plan_files([OutputTensor(n, srcs[0].meta(n).shape, srcs[0].meta(n).dtype) for n in names], shard_size=5 * 10**9)
CHUNK = 1 << 23
bufs = [torch.empty(CHUNK * 2, dtype=torch.uint8) for _ in srcs]
t0 = time.perf_counter()
with StagedOutput(out, is_dir=True, force=True) as st:
    with TensorFileWriter(st.path(), plans) as w:
        for n in names:
            m = srcs[0].meta(n)
            for s in range(0, m.numel, CHUNK):
                e = min(m.numel, s + CHUNK)
                views = [s_.read_range(n, s, e, out=b[: (e - s) * 2].view(m.dtype)) for s_, b in zip(srcs, bufs)]
                w.write(n, views[0])
        w.finish()
    st.commit()
print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "inner": time.perf_counter() - t0}))
"""

MERGE_SCRIPT = r"""
import sys, json, resource, time
t0 = time.perf_counter()
from merge.console import main  # the `merge` console script
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "inner": time.perf_counter() - t0}))
"""


def timed(cmd: list[str], out: Path | None = None) -> tuple[float, int]:
    """Wall time and peak RSS of one command, as `/usr/bin/time -v` reports it.

    (A child's own getrusage would inherit this benchmark's peak across fork and exec.)
    """
    got = timed_external(cmd, out)
    if got is None:
        raise SystemExit(f"{' '.join(cmd[:4])} failed")
    return got


def settle(out: Path | None = None, wait: float = 0.0) -> None:
    """Start every timed run from the same state: the previous output removed and no dirty pages
    waiting for writeback. Otherwise a run pays for the previous run's writeback (dirty-page
    throttling made the same 1 GB write take 0.2 s or 2.7 s on this machine). `wait`: seconds
    more, for a VM's freed memory to go back to its host (see `COLD_PAGES_SECONDS`)."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()
    time.sleep(wait)


# A VM that reports free memory to its host (virtio free page reporting) pays a host fault on
# the first touch of each reported page. Reporting starts ~2 s after pages are freed and takes
# its time: after a process freed 16 GiB (mergekit's peak here), writing a new 2.5 GB file took
# 0.6-0.8 s 0-5 s later (its pages still "hot"), 3.5 s after 10 s, 4.4 s after 15 s, 6.8 s after
# 20 s and 7.7 s after 30 s. So a run started right after another one that freed gigabytes ran
# up to twice as fast (8B-shaped SLERP: 5.9-6.3 s hot, 8.1-10.2 s cold). Waiting this long
# before each run makes every run cold: the state a fresh process meets on this VM after idling.
COLD_PAGES_SECONDS = 30.0


def timed_external(
    cmd: list[str], out: Path | None = None, wait: float = 0.0
) -> tuple[float, int] | None:
    settle(out, wait)
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(f"{cmd[0]} failed (left out of the table):\n{res.stderr[-1500:]}", file=sys.stderr)
        return None
    rss = next(
        int(line.split()[-1]) * 1024
        for line in res.stderr.splitlines()
        if "Maximum resident set size" in line
    )
    return wall, rss


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.readinto(bytearray(64 << 20)):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=Path("bench-data"))
    ap.add_argument("--sizes", default="1,3", help="Which sets: 1 and/or 3 (GB).")
    ap.add_argument(
        "--keep", action="store_true", help="Keep the synthetic checkpoints afterwards."
    )
    ap.add_argument("--repeat", type=int, default=5, help="Best of N runs of each of ours.")
    ap.add_argument("--ties", action="store_true", help="Also time TIES (ours and mergekit's).")
    ap.add_argument(
        "--device", default="cpu", help="Where our merges compute: cpu (default), cuda or auto."
    )
    args = ap.parse_args()
    on_device = ["--device", args.device]
    py = sys.executable
    rows = []
    for size in args.sizes.split(","):
        key = f"{size.strip()}GB"
        spec = llama_tensors(*SHAPES[key])
        root = args.data / key
        names = ["base", "ft1", "ft2", "ft3"]
        print(f"building {key} set in {root} ...", file=sys.stderr, flush=True)
        for i, n in enumerate(names):
            build_checkpoint(root / n, spec, seed=i, shape=SHAPES[key])
        model_bytes = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
        ins = [root / n for n in names]
        warm(ins)
        out = root / "out"
        recipe = root / "ta.yaml"
        recipe.write_text(
            "version: 1\ninputs: {" + ", ".join(f"{n}: {root / n}" for n in names) + "}\n"
            "steps:\n  final: base + 0.5 * ((ft1 - base) + (ft2 - base) + (ft3 - base))\n"
        )
        results: dict[str, tuple[float, int]] = {}
        walls: dict[str, list[float]] = {}  # every run of ours, for the median column
        copy3 = [py, "-c", COPY_SCRIPT, *map(str, ins[1:]), str(out)]
        copy4 = [py, "-c", COPY_SCRIPT, *map(str, ins), str(out)]
        lin = [
            py,
            "-c",
            MERGE_SCRIPT,
            "linear",
            *map(str, ins[1:]),
            "-o",
            str(out),
            "--force",
            "-q",
            *on_device,
        ]
        ta = [
            py,
            "-c",
            MERGE_SCRIPT,
            "run",
            str(recipe),
            "-o",
            str(out),
            "--force",
            "-q",
            *on_device,
        ]
        timed(copy4, out)  # warm-up: interpreter, libraries and every input in the page cache
        # Best of `--repeat`, interleaved so that slow moments of the shared machine hit all alike.
        for _ in range(args.repeat):
            for name, cmd in (
                ("copy (3 inputs)", copy3),
                ("linear (3 inputs)", lin),
                ("copy (4 inputs)", copy4),
                ("task arithmetic (base + 3)", ta),
            ):
                got = timed(cmd, out)
                walls.setdefault(name, []).append(got[0])
                if name not in results or got[0] < results[name][0]:
                    results[name] = (got[0], max(got[1], results.get(name, got)[1]))
        if args.ties:
            ties = root / "ties.yaml"
            ties.write_text(
                "version: 1\ninputs: {" + ", ".join(f"{n}: {root / n}" for n in names) + "}\n"
                "steps:\n  final: {method: ties, base: base, models: [ft1, ft2, ft3], density: 0.2}\n"
            )
            results["ties (base + 3, density 0.2)"] = timed(
                [
                    py,
                    "-c",
                    MERGE_SCRIPT,
                    "run",
                    str(ties),
                    "-o",
                    str(out),
                    "--force",
                    "-q",
                    *on_device,
                ],
                out,
            )
        if shutil.which("mergekit-yaml"):
            mk = root / "mergekit-linear.yaml"
            mk.write_text(
                "merge_method: linear\ndtype: bfloat16\nmodels:\n"
                + "".join(
                    f"  - model: {root / n}\n    parameters: {{weight: 1.0}}\n" for n in names[1:]
                )
            )
            if (r := timed_external(["mergekit-yaml", str(mk), str(out)], out)) is not None:
                results["mergekit linear (3 inputs)"] = r
            mt = root / "mergekit-ta.yaml"
            mt.write_text(
                f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\ndtype: bfloat16\nparameters: {{lambda: 0.5}}\nmodels:\n"
                + "".join(
                    f"  - model: {root / n}\n    parameters: {{weight: 1.0}}\n" for n in names[1:]
                )
            )
            if (r := timed_external(["mergekit-yaml", str(mt), str(out)], out)) is not None:
                results["mergekit task arithmetic"] = r
            if args.ties:
                mties = root / "mergekit-ties.yaml"
                mties.write_text(
                    f"merge_method: ties\nbase_model: {root / 'base'}\ndtype: bfloat16\nmodels:\n"
                    + "".join(
                        f"  - model: {root / n}\n    parameters: {{weight: 1.0, density: 0.2}}\n"
                        for n in names[1:]
                    )
                )
                if (r := timed_external(["mergekit-yaml", str(mties), str(out)], out)) is not None:
                    results["mergekit ties"] = r
        shutil.rmtree(out, ignore_errors=True)
        for name, (wall, rss) in results.items():
            four = "4 inputs" in name or "task" in name or "ties" in name
            bound_name = "copy (4 inputs)" if four else "copy (3 inputs)"
            bound = results[bound_name][0]
            # Median ratio: a second view, since single runs on a shared machine vary by ±30%.
            med = (
                statistics.median(walls[name]) / statistics.median(walls[bound_name])
                if name in walls
                else None
            )
            mk = results.get(
                "mergekit ties"
                if "ties" in name
                else "mergekit task arithmetic"
                if "task" in name
                else "mergekit linear (3 inputs)"
            )
            print(f"{key} {name}: {wall:.2f} s, {rss / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            rows.append(
                (
                    key,
                    model_bytes,
                    name,
                    wall,
                    rss,
                    wall / bound,
                    med,
                    (wall / mk[0]) if mk and not name.startswith(("copy", "mergekit")) else None,
                )
            )
        if not args.keep:
            shutil.rmtree(root)
    print(
        f"\n{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; inputs warm in the page cache\n"
    )
    print(
        "| set | model size | job | wall (s), best | peak RSS (MiB) | x copy, best | x copy, median | x mergekit |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")

    def fmt(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}"

    for key, mb, name, wall, rss, ratio, med, vs_mk in rows:
        print(
            f"| {key} | {mb / 1e9:.2f} GB | {name} | {wall:.2f} | {rss / 2**20:.0f} | {ratio:.2f} | {fmt(med)} | {fmt(vs_mk)} |"
        )


if __name__ == "__main__":
    main()
