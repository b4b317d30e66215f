"""Vocabulary alignment cost: a linear merge of two models whose tokenizers differ, CPU.

    python benchmarks/bench_vocab.py                       # 32k tokens, hidden 1024, 25% differ
    python benchmarks/bench_vocab.py --vocab 128000 --hidden 2048 --differ 0.1

Each model is a tied embedding (vocab x hidden, bf16) with a WordLevel tokenizer of `vocab`
words; the second model replaces a fraction `differ` of the first's words with its own, spread
through the vocabulary, so the union is (1 + differ) x vocab tokens and a model lacks the
other's words (their rows are the owner's: mergekit's rule). Reports the planning time (loading
tokenizers, building the union, planning the rows), the merge time and the merging process's
RSS before planning and at its peak, against the same merge of two models that share one
tokenizer (views pass their rows through), as a table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from merge.api import plan_recipe
from merge.execute import write_plan


def make(path: Path, words: list[str], hidden: int, seed: int) -> str:
    path.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0]).save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(words), hidden, generator=g).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": emb}, str(path / "model.safetensors"))
    (path / "config.json").write_text(f'{{"model_type": "llama", "vocab_size": {len(words)}}}')
    return str(path)


def _child(root: str, a: str, b: str, label: str, queue: Any) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(a)  # import and warm up transformers outside the timing
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recipe = {
        "inputs": {"base": a, "b": b},
        "steps": {
            "m": {"method": "linear", "models": {"base": {"weight": 0.5}, "b": {"weight": 0.5}}}
        },
        "tokenizer": {"source": "union", "base": "base"},
    }
    t0 = time.perf_counter()
    plan = plan_recipe(recipe)
    t1 = time.perf_counter()
    write_plan(plan, Path(root) / f"out-{label}", quiet=True, card=False)
    t2 = time.perf_counter()
    rows = plan.jobs[0].shape[0]
    plan.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {
            "case": label,
            "output rows": rows,
            "plan s": f"{t1 - t0:.2f}",
            "merge s": f"{t2 - t1:.2f}",
            "RSS before MiB": f"{before:.0f}",
            "peak RSS MiB": f"{peak:.0f}",
        }
    )


def run(root: Path, a: str, b: str, label: str) -> dict[str, object]:
    """One merge in a fresh process, so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(root), a, b, label, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--differ", type=float, default=0.25)
    args = ap.parse_args()
    words = [f"w{i}" for i in range(args.vocab)]
    step = max(1, round(1 / args.differ)) if args.differ > 0 else args.vocab + 1
    other = [f"v{i}" if i % step == step - 1 else w for i, w in enumerate(words)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = make(root / "a", words, args.hidden, 0)
        b = make(root / "b", other, args.hidden, 1)
        same = make(root / "same", words, args.hidden, 2)
        rows = [run(root, a, same, "shared tokenizer"), run(root, a, b, "union")]
    cols = list(rows[0])
    print(f"vocab {args.vocab}, hidden {args.hidden}, bf16, {args.differ:.0%} of words differ")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"one input embedding is {args.vocab * args.hidden * 2 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
