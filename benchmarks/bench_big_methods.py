"""Method merges at LLM scale: peak RSS and wall time on a Llama-3-8B-shaped set.

    python benchmarks/bench_big_methods.py --data bench-data            # build, run all, table
    python benchmarks/bench_big_methods.py --methods ties,slerp --keep   # a few, keep the set

The set (built once, tensor by tensor in row chunks, so building stays under 1 GiB): one decoder
layer of Llama-3-8B (hidden 4096, intermediate 14336, 32 query / 8 key-value heads) with its
vocab-128256 `embed_tokens` and `lm_head`, bf16, ~2.5 GB per model: a base and three fine-tunes
(base + small bf16 noise, so task vectors look like fine-tunes'). Each method runs as
`merge run` in a fresh process under `/usr/bin/time -v` (peak RSS as it reports it). The
target is RSS <= 2 GiB for every method whatever the vocabulary.

`--mergekit` also times `mergekit-yaml` on the same merges, for the "vs mergekit" column. Run
it only on a quiet machine with 24 GiB: mergekit reads whole tensors in float32 and peaks at
~22 GiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from bench_core import COLD_PAGES_SECONDS, timed_external, warm  # the same /usr/bin/time -v

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
ROWS_PER_CHUNK = 2048  # rows per generated chunk: 8M elements of a 4096-wide matrix


def tensors() -> list[tuple[str, tuple[int, ...]]]:
    kv = HIDDEN // HEADS * KV_HEADS
    p = "model.layers.0"
    return [
        ("model.embed_tokens.weight", (VOCAB, HIDDEN)),
        (f"{p}.input_layernorm.weight", (HIDDEN,)),
        (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (f"{p}.self_attn.k_proj.weight", (kv, HIDDEN)),
        (f"{p}.self_attn.v_proj.weight", (kv, HIDDEN)),
        (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN)),
        (f"{p}.mlp.up_proj.weight", (INTER, HIDDEN)),
        (f"{p}.mlp.down_proj.weight", (HIDDEN, INTER)),
        ("model.norm.weight", (HIDDEN,)),
        ("lm_head.weight", (VOCAB, HIDDEN)),
    ]


def write_config(dest: Path) -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))


def build(dest: Path, model: int) -> None:
    """Model 0 is the base; model i > 0 is the base plus 0.002·noise, both drawn per chunk
    from seeds of (tensor, chunk), so no model is ever held in memory."""
    from merge.io.writer import OutputTensor, StagedOutput, TensorFileWriter, plan_files, write_json

    if (dest / "config.json").exists():
        return
    spec = [OutputTensor(n, s, torch.bfloat16) for n, s in tensors()]
    plans, index = plan_files(spec, shard_size=5 * 10**9)
    with StagedOutput(dest, is_dir=True, force=True) as staged:
        with TensorFileWriter(staged.path(), plans) as w:  # a failure releases its buffers
            for ti, t in enumerate(spec):
                rows = t.shape[0]
                width = t.shape[1] if len(t.shape) > 1 else 1
                for c, r0 in enumerate(range(0, rows, ROWS_PER_CHUNK)):
                    n = min(ROWS_PER_CHUNK, rows - r0) * width
                    g = torch.Generator().manual_seed(1000 * ti + c)
                    x = torch.randn(n, generator=g).mul_(0.02)
                    if model:
                        g.manual_seed(10**6 * model + 1000 * ti + c)
                        x.add_(torch.randn(n, generator=g).mul_(0.002))
                    w.write(t.name, x.to(torch.bfloat16))
            w.finish()
        if index:
            write_json(staged.path("model.safetensors.index.json"), index)
        staged.commit()
    write_config(dest)


def recipes(root: Path) -> dict[str, str]:
    ins = "inputs: {" + ", ".join(f"{n}: {root / n}" for n in ("base", "ft1", "ft2", "ft3")) + "}\n"
    three = "[ft1, ft2, ft3]"
    steps = {
        "linear (reference)": f"{{method: linear, models: {three}}}",
        "ties": f"{{method: ties, base: base, models: {three}, density: 0.2}}",
        "dare_ties": f"{{method: dare_ties, base: base, models: {three}, density: 0.5}}",
        "breadcrumbs": f"{{method: breadcrumbs, base: base, models: {three}, density: 0.9, gamma: 0.01}}",
        "della": f"{{method: della, base: base, models: {three}, density: 0.5, epsilon: 0.1}}",
        "slerp": "{method: slerp, base: base, models: [ft1], t: 0.5}",
        "model_stock": f"{{method: model_stock, base: base, models: {three}}}",
    }
    return {k: f"version: 1\n{ins}steps:\n  final: {v}\n" for k, v in steps.items()}


def mergekit_configs(root: Path) -> dict[str, str]:
    """mergekit-yaml configs of the same merges (bf16 in and out, as mergekit users write)."""
    base = f"base_model: {root / 'base'}\ndtype: bfloat16\n"

    def models(params: str) -> str:
        return "models:\n" + "".join(
            f"  - model: {root / n}\n    parameters: {{{params}}}\n" for n in ("ft1", "ft2", "ft3")
        )

    return {
        "linear (reference)": "merge_method: linear\ndtype: bfloat16\n" + models("weight: 1.0"),
        "ties": "merge_method: ties\n" + base + models("weight: 1.0, density: 0.2"),
        "dare_ties": "merge_method: dare_ties\n" + base + models("weight: 1.0, density: 0.5"),
        "breadcrumbs": "merge_method: breadcrumbs\n"
        + base
        + models("weight: 1.0, density: 0.9, gamma: 0.01"),
        "della": "merge_method: della\n" + base + models("weight: 1.0, density: 0.5, epsilon: 0.1"),
        "slerp": "merge_method: slerp\n"
        + base
        + f"models:\n  - model: {root / 'ft1'}\nparameters: {{t: 0.5}}\n",
        "model_stock": "merge_method: model_stock\n" + base + models("weight: 1.0"),
    }


def timed(cmd: list[str], inputs: list[Path]) -> tuple[float, int] | None:
    """Wall seconds and peak RSS of a fresh process, as `/usr/bin/time -v` reports it, with
    the inputs read into the page cache first (mergekit's runs peak at 7-23 GiB on this 24 GiB
    machine and evict some of them: the run after one read them from disk) and started once the
    previous run's freed memory has gone back to the host (every run cold)."""
    warm(inputs)
    return timed_external(cmd, wait=COLD_PAGES_SECONDS)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=Path("bench-data"))
    ap.add_argument("--methods", default="", help="Comma-separated subset of the table's jobs.")
    ap.add_argument("--keep", action="store_true", help="Keep the set afterwards.")
    ap.add_argument(
        "--max-estimate",
        type=float,
        default=4.0,
        help="Skip a method whose estimated peak (merge validate's) is above this many GiB.",
    )
    ap.add_argument(
        "--mergekit",
        action="store_true",
        help="Also time mergekit-yaml on the same merges (peaks at ~22 GiB: a quiet machine "
        "with 24 GiB only).",
    )
    args = ap.parse_args()
    root = args.data / "llama3-8b-1layer"
    for i, n in enumerate(("base", "ft1", "ft2", "ft3")):
        print(f"building {root / n} ...", file=sys.stderr, flush=True)
        build(root / n, i)
    size = sum(f.stat().st_size for f in (root / "base").glob("*.safetensors"))
    inputs = [root / n for n in ("base", "ft1", "ft2", "ft3")]
    out = root / "out"
    rows = []
    theirs: dict[str, tuple[float, int]] = {}
    for name, text in recipes(root).items():
        if args.methods and name.split()[0] not in args.methods.split(","):
            continue
        recipe = root / f"{name.split()[0]}.yaml"
        recipe.write_text(text)
        # Safety on a shared machine: a method whose calls do not stream (whole-matrix) would
        # hold whole fp32 embeddings; report the planner's estimate instead of running it.
        from merge.api import plan_recipe
        from merge.execute import estimate_peak_bytes

        plan = plan_recipe(str(recipe))
        peak = estimate_peak_bytes(plan)
        plan.close()
        if peak > args.max_estimate * 2**30:
            print(f"{name}: skipped, estimated peak {peak / 2**30:.1f} GiB", file=sys.stderr)
            rows.append((name, float("nan"), peak))
            continue
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "merge", "run", str(recipe), "-o", str(out), "--force", "-q"]
        got = timed(cmd, inputs)
        if got is not None:
            print(f"{name}: {got[0]:.1f} s, {got[1] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
            rows.append((name, *got))
        if args.mergekit and shutil.which("mergekit-yaml"):
            config = root / f"mergekit-{name.split()[0]}.yaml"
            config.write_text(mergekit_configs(root)[name])
            shutil.rmtree(out, ignore_errors=True)
            mk = timed(["mergekit-yaml", str(config), str(out)], inputs)
            if mk is not None:
                print(f"  mergekit: {mk[0]:.1f} s, {mk[1] / 2**30:.2f} GiB", file=sys.stderr)
                theirs[name] = mk
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(root)
    print(f"\nLlama-3-8B one layer, bf16, {size / 1e9:.2f} GB per model, base + 3 fine-tunes\n")
    print(
        "| method | wall (s) | peak RSS (GiB) | mergekit wall (s) | mergekit RSS (GiB) | vs mergekit |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, rss in rows:
        mk_wall, mk_rss = theirs.get(name, (float("nan"), float("nan")))
        mk_cols = (
            f"{mk_wall:.1f} | {mk_rss / 2**30:.1f} | {wall / mk_wall:.2f}x"
            if mk_wall == mk_wall and wall == wall
            else "| |"
        )
        if wall != wall:  # skipped: the estimate stands in for the measurement
            print(f"| {name} | not run | estimated {rss / 2**30:.1f} | {mk_cols} |")
        else:
            print(f"| {name} | {wall:.1f} | {rss / 2**30:.2f} | {mk_cols} |")


if __name__ == "__main__":
    main()
