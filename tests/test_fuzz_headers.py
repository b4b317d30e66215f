"""Seeded fuzzing of safetensors headers: every mutant opens, or fails with a MergeError.

1,200 mutants of a valid file (JSON-level edits of entries, fields, metadata and names, and
byte-level edits of the length prefix and header text) go through `merge inspect`'s
describe_checkpoint; every mutant that opens is then merged (`linear` with a valid file).
Asserted: no exception outside the MergeError family (no traceback), no case over a time bound
(an alarm turns a hang into a failure), and bounded peak memory. Runs in-process, seconds.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from merge.api import merge_expression
from merge.errors import MergeError
from merge.inspect import describe_checkpoint

SEED = 20261130
N_MUTANTS = 1200
CASE_SECONDS = 5  # per mutant; the slowest real case takes milliseconds


class Hang(Exception):
    pass


@contextmanager
def time_bound(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def valid_file(path: Path) -> bytes:
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "model.embed.weight": torch.randn(4, 3, generator=g),
            "model.layers.0.w": torch.randn(3, 3, generator=g).to(torch.bfloat16),
            "model.layers.0.b": torch.randn(3, generator=g).to(torch.float16),
            "model.norm": torch.ones(3),
            "step": torch.tensor(7, dtype=torch.int64),
        },
        path,
        metadata={"format": "pt"},
    )
    return path.read_bytes()


ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**64,
    -(2**70),
    1.5,
    float("nan"),
    "F32",
    "",
    "\ud800",
    [],
    [0],
    [0, 1, 2],
    [-8, 8],
    ["0", "4"],
    [None],
    [[1]],
    {},
    {"dtype": "F32"},
    [2**62, 2**62],
    [1e30],
    "x" * 1000,
]
FIELDS = ["dtype", "shape", "data_offsets"]
DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4_K", "f32", "F64", "I4", ""]


def mutate_json(rng: random.Random, header: dict[str, Any]) -> bytes | None:
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    op = rng.randrange(16)
    if op == 0:  # an entry replaced by an odd value
        h[name] = rng.choice(ODD_VALUES)
    elif op == 1:  # a field removed
        h[name].pop(rng.choice(FIELDS), None)
    elif op == 2:  # a field replaced by an odd value
        h[name][rng.choice(FIELDS)] = rng.choice(ODD_VALUES)
    elif op == 3:  # offsets shifted, widened or swapped
        b, e = h[name]["data_offsets"]
        d = rng.choice([-9, -4, -2, -1, 1, 2, 4, 8, 1000, 2**40])
        h[name]["data_offsets"] = rng.choice([[b + d, e + d], [b, e + d], [b + d, e], [e, b]])
    elif op == 4:  # another dtype
        h[name]["dtype"] = rng.choice(DTYPES)
    elif op == 5:  # another shape
        h[name]["shape"] = rng.choice([[], [0], [1], [2, 2], [3, 4], [12], [-1, 3], [2**31, 0]])
    elif op == 6:  # metadata variants
        h["__metadata__"] = rng.choice(
            [None, [], "x", {"a": 1}, {"a": None}, {"a": {"b": "c"}}, {"\ud800": "x"}, {}]
        )
    elif op == 7:  # a name with surrogates, controls, or very long
        h[rng.choice(["\ud83d", "a\x00b", "\n", "x" * 5000, "é€😀", ""])] = h.pop(name)
    elif op == 8:  # a whole extra entry
        h[f"extra{rng.randrange(9)}"] = {
            "dtype": "F32",
            "shape": [rng.randrange(4)],
            "data_offsets": [rng.randrange(100), rng.randrange(100)],
        }
    elif op == 9:  # deep nesting somewhere
        depth = rng.choice([50, 500, 1000, 5000])
        return (
            json.dumps(h)
            .replace(
                json.dumps(name),
                json.dumps(name) + ": " + "[" * depth + "]" * depth + ", " + json.dumps(name + "_"),
                1,
            )
            .encode()
        )
    elif op == 10:  # the header is not an object
        return json.dumps(rng.choice([[], [h], "s", 1, None, True])).encode()
    elif op == 11:  # two entries share offsets
        other = rng.choice(names)
        h[name]["data_offsets"] = list(h[other]["data_offsets"])
    elif op == 12:  # a JSON constant or big number
        text = json.dumps(h)
        return text.replace(
            "0", rng.choice(["NaN", "Infinity", "-0", "1e999", "1" * 400]), 1
        ).encode()
    elif op == 13:  # duplicate key in the text
        text = json.dumps(h)
        entry = json.dumps(h[name])
        return text.replace("{", "{" + json.dumps(name) + ": " + entry + ", ", 1).encode()
    elif op == 14:  # extra fields
        h[name][rng.choice(["x", "dtype2", "offsets"])] = rng.choice(ODD_VALUES)
    else:  # entry removed (leaves a gap or changes the data size)
        h.pop(name)
    return json.dumps(h).encode()


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    op = rng.randrange(6)
    if op == 0:  # length prefix
        new = rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(data), 2**63, 100 * 2**20, 30 * 2**20])
        return struct.pack("<Q", new % 2**64) + data[8:]
    if op == 1:  # truncated anywhere
        return data[: rng.randrange(len(data))]
    if op == 2:  # random bytes flipped in the header
        b = bytearray(data)
        for _ in range(rng.randrange(1, 5)):
            i = rng.randrange(8, 8 + n)
            b[i] = rng.randrange(256)
        return bytes(b)
    if op == 3:  # bytes appended
        return data + bytes(rng.randrange(1, 64))
    if op == 4:  # a non-UTF-8 byte in the header
        i = rng.randrange(8, 8 + n)
        return data[:i] + b"\xff" + data[i + 1 :]
    # the header text replaced by a random prefix of itself (padded back)
    cut = rng.randrange(1, n)
    return data[:8] + data[8 : 8 + cut] + b" " * (n - cut) + data[8 + n :]


def mutants(rng: random.Random, data: bytes) -> Iterator[tuple[str, bytes]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    for _ in range(N_MUTANTS):
        if rng.random() < 0.7:
            text = mutate_json(rng, header)
            assert text is not None
            yield "json", struct.pack("<Q", len(text)) + text + body
        else:
            yield "bytes", mutate_bytes(rng, data)


def classify(fn: Callable[[], object]) -> str:
    """'ok', 'error' (a MergeError) or 'hang'; anything else propagates (the test fails)."""
    try:
        with time_bound(CASE_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NaN payloads warn; that is not the point here
            fn()
    except Hang:
        return "hang"
    except MergeError:
        return "error"
    return "ok"


def test_fuzzed_headers_give_only_merge_errors(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    good = tmp_path / "good.safetensors"
    data = valid_file(good)
    case = tmp_path / "case.safetensors"
    outcomes: Counter[str] = Counter()
    merged: Counter[str] = Counter()
    failures: list[str] = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for i, (kind, blob) in enumerate(mutants(rng, data)):
        case.write_bytes(blob)
        try:
            result = classify(lambda: describe_checkpoint(str(case)))
        except Exception as e:  # a traceback a user would see
            failures.append(f"mutant {i} ({kind}), inspect: {type(e).__name__}: {e}"[:300])
            continue
        outcomes[f"inspect {result}"] += 1
        if result == "hang":
            failures.append(f"mutant {i} ({kind}): inspect took over {CASE_SECONDS} s")
        if result != "ok":
            continue
        out = tmp_path / f"out{i}"
        try:
            result = classify(
                lambda out=out: merge_expression(
                    "0.5 * a + 0.5 * b", {"a": str(good), "b": str(case)}, out, quiet=True
                )
            )
        except Exception as e:
            failures.append(f"mutant {i} ({kind}), linear: {type(e).__name__}: {e}"[:300])
            continue
        merged[f"linear {result}"] += 1
        if result == "hang":
            failures.append(f"mutant {i} ({kind}): linear took over {CASE_SECONDS} s")
    elapsed = time.perf_counter() - t0
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(
        f"\n{N_MUTANTS} header mutants in {elapsed:.1f} s: {dict(outcomes)}; merged: {dict(merged)}; "
        f"peak RSS growth {rss_growth_mb:.0f} MB"
    )
    assert failures == []
    assert sum(outcomes.values()) == N_MUTANTS
    assert outcomes["inspect error"] > N_MUTANTS // 2  # the mutants do reach the checks
    assert merged["linear ok"] + merged["linear error"] == outcomes["inspect ok"]
    assert rss_growth_mb < 300
