"""`merge moe` against mergekit-moe 0.1.5 and a plain copy: wall time and peak memory, CPU.

    python benchmarks/bench_moe.py                      # Llama 1024/4096 × 8 layers, 4 experts, bf16
    python benchmarks/bench_moe.py --layers 16 --experts 8

Builds a random bf16 Llama base and N dense experts (same shapes) in a temporary folder, then
runs each gate mode once with `merge moe` and with `mergekit-moe` (when installed), each in its
own process, and reports wall time, CPU time (user + system: steadier than wall time on a
shared machine) and peak resident memory (the process's maxrss). `copy`
is `cp` of the output's weight bytes: the floor for writing the same output. The hidden-state
prompts are eight short sentences per expert. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PROMPTS = [
    "Write a function that sorts a list",
    "Prove that the square root of two is irrational",
    "Translate this sentence into French",
    "Summarise the following article",
    "What is the capital of Peru",
    "Explain how a transistor works",
    "Compose a short poem about rain",
    "Fix the bug in this Python code",
]


def build_models(
    root: Path, n: int, hidden: int, inter: int, layers: int, vocab: int
) -> list[Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {w for p in PROMPTS for w in p.split()}
    vocab_words = ["<s>", "</s>", "<unk>", *sorted(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        bos_token_id=0,
        eos_token_id=1,
        dtype="bfloat16",
    )
    paths = []
    for i in range(n + 1):
        torch.manual_seed(i)
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        path = root / ("base" if i == 0 else f"expert{i}")
        model.save_pretrained(path)
        fast.save_pretrained(path)
        paths.append(path)
        del model
    return paths


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in GB) of one command in its own process."""
    t0 = time.perf_counter()
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%M %U %S", *cmd], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rss, user, sys_ = out.stderr.strip().splitlines()[-1].split()
    return seconds, float(user) + float(sys_), int(rss) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--modes", nargs="*", default=["random", "cheap_embed", "hidden"])
    args = ap.parse_args()
    mergekit = shutil.which("mergekit-moe") or str(Path(sys.executable).parent / "mergekit-moe")
    have_mergekit = Path(mergekit).exists()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        paths = build_models(root, args.experts, args.hidden, args.inter, args.layers, args.vocab)
        in_bytes = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
        rows = []
        for mode in args.modes:
            cfg = {
                "base_model": str(paths[0]),
                "gate_mode": mode,
                "dtype": "bfloat16",
                "experts": [  # two distinct prompts per expert
                    {
                        "source_model": str(p),
                        "positive_prompts": [PROMPTS[(2 * i + j) % 8] for j in range(2)],
                    }
                    for i, p in enumerate(paths[1:])
                ],
            }
            config = root / f"{mode}.yaml"
            config.write_text(yaml.safe_dump(cfg))
            out = root / f"ours-{mode}"
            s, cpu, rss = measure(
                [sys.executable, "-m", "merge", "moe", str(config), "-o", str(out), "-q"]
            )
            out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            rows.append(("merge moe", mode, s, cpu, rss))
            if have_mergekit:
                mk = root / f"mk-{mode}"
                s, cpu, rss = measure(
                    [
                        mergekit,
                        str(config),
                        str(mk),
                        "--random-seed",
                        "0",
                        "--device",
                        "cpu",
                        "--quiet",
                    ]
                )
                rows.append(("mergekit-moe 0.1.5", mode, s, cpu, rss))
                shutil.rmtree(mk)
            copy_to = root / "copy"
            copy_to.mkdir()
            s, cpu, rss = measure(["cp", *map(str, out.glob("*.safetensors")), str(copy_to)])
            shutil.rmtree(copy_to)
            rows.append(("cp (output bytes)", mode, s, cpu, rss))
            shutil.rmtree(out)
    print(
        f"\nLlama hidden {args.hidden}, intermediate {args.inter}, {args.layers} layers, vocab "
        f"{args.vocab}, bf16; {args.experts} experts; inputs {in_bytes / 1e9:.2f} GB, output "
        f"{out_bytes / 1e9:.2f} GB; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores\n"
    )
    print("| tool | gate_mode | wall s | CPU s | peak RSS GB |")
    print("| --- | --- | ---: | ---: | ---: |")
    for tool, mode, s, cpu, rss in rows:
        print(f"| {tool} | {mode} | {s:.1f} | {cpu:.1f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
