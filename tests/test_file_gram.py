"""Passes read straight from the files (`merge.file_gram`): Gram sums and ordered sums with the
same bits as `BlockGram.add`, the kernels' loops and the engine's chunks; NaN and truncated
inputs refused by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merge.api import plan_recipe
from merge.errors import ExecutionError, FormatError
from merge.execute import Engine
from merge.file_gram import RANGE_ELEMENTS, GramFiles, fill_gram, fill_sum
from merge.io.safetensors import SafetensorsSource
from merge.methods._fused import NO_FLOAT32, loops
from merge.methods._gram import BlockGram
from merge.methods.model_stock import model_stock
from merge.methods.slerp import slerp

# Four whole ranges (the least the engine reads this way), a partial one whose last block is
# partial too.
NUMEL = 4 * RANGE_ELEMENTS + 70001


def write_inputs(tmp_path: Path, count: int, numel: int = NUMEL) -> list[Path]:
    """`count` bfloat16 checkpoints with a large tensor `w` and a small one `b`."""
    g = torch.Generator().manual_seed(count)
    base = torch.randn(numel, generator=g)
    paths = []
    for i in range(count):
        w = base + 0.3 * torch.randn(numel, generator=g)
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": w.bfloat16(), "b": torch.randn(7, generator=g).bfloat16()}, path)
        paths.append(path)
    return paths


def spans(paths: list[Path]) -> tuple[list[SafetensorsSource], list[tuple[int, int]]]:
    sources = [SafetensorsSource([p]) for p in paths]
    found = [s.file_span("w") for s in sources]
    assert all(f is not None for f in found)
    return sources, found  # type: ignore[return-value]


def never(start: int, stop: int) -> None:
    raise AssertionError(f"range [{start}, {stop}) reported")


@pytest.mark.parametrize("k,minus_base", [(2, False), (3, True)])
def test_fill_gram_gives_block_grams_bits(tmp_path: Path, k: int, minus_base: bool):
    paths = write_inputs(tmp_path, k + minus_base)
    sources, found = spans(paths)
    tensors = [s.read("w") for s in sources]
    expected = BlockGram(k)
    for s in range(0, NUMEL, 100_003):  # chunks cut anywhere
        vectors = [t[s : s + 100_003] for t in tensors[minus_base:]]
        if minus_base:
            expected.add_differences(vectors, tensors[0][s : s + 100_003])
        else:
            expected.add(vectors)
    got = BlockGram(k)
    files = GramFiles(found[minus_base:], found[0] if minus_base else None, NUMEL)
    with ThreadPoolExecutor(1) as helper:
        fill_gram(got, files, helper, never)
    assert torch.equal(got.total(), expected.total())
    # and the float64 sums are what they say they are
    vecs = [t.double() - (tensors[0].double() if minus_base else 0) for t in tensors[minus_base:]]
    reference = torch.stack([vecs[i] @ vecs[j] for i, j in got.pairs]).reshape(-1, 1)
    assert torch.allclose(got.total(), reference, rtol=1e-12)


def test_a_nan_range_is_handed_back_with_its_elements(tmp_path: Path):
    paths = write_inputs(tmp_path, 2)
    bad = SafetensorsSource([paths[1]]).read("w").clone()
    bad[2 * RANGE_ELEMENTS + 5] = float("nan")
    save_file({"w": bad, "b": torch.zeros(7, dtype=torch.bfloat16)}, paths[1])
    _, found = spans(paths)
    reported: list[tuple[int, int]] = []

    def report(start: int, stop: int) -> None:
        reported.append((start, stop))
        raise ExecutionError("refused")

    with ThreadPoolExecutor(1) as helper, pytest.raises(ExecutionError, match="refused"):
        fill_gram(BlockGram(2), GramFiles(found, None, NUMEL), helper, report)
    assert reported == [(2 * RANGE_ELEMENTS, 3 * RANGE_ELEMENTS)]


def test_a_file_truncated_after_opening_is_a_read_error_naming_it(tmp_path: Path):
    paths = write_inputs(tmp_path, 2)
    sources, found = spans(paths)
    os.truncate(paths[1], os.path.getsize(paths[1]) - 2 * RANGE_ELEMENTS)

    def reread(start: int, stop: int) -> None:
        sources[1].read_range("w", start, stop)

    with ThreadPoolExecutor(1) as helper, pytest.raises(FormatError, match="the file ended"):
        fill_gram(BlockGram(2), GramFiles(found, None, NUMEL), helper, reread)


def test_fill_sum_gives_the_kernels_loops_bits(tmp_path: Path):
    paths = write_inputs(tmp_path, 4)
    sources, found = spans(paths)
    xs = [s.read("w").view(torch.int16).numpy().view(np.uint16) for s in sources]
    start, stop = 70_001, NUMEL - 3  # ranges cut off the blocks and the tensor's ends
    with ThreadPoolExecutor(1) as helper:
        two = np.empty(stop - start, dtype=np.uint16)
        assert fill_sum(found[:2], (0.75, -0.25), start, stop, two, helper, never)
        four = np.empty(stop - start, dtype=np.uint16)
        assert fill_sum(found, (0.4, 0.2, 0.2, 0.2), start, stop, four, helper, never)
    cut = [x[start:stop] for x in xs]
    expected = np.empty(stop - start, dtype=np.uint16)
    f32 = np.float32
    loops().combine_two(cut[0], cut[1], f32(0.75), f32(-0.25), NO_FLOAT32, expected)
    assert np.array_equal(two, expected)
    loops().scaled_sum(tuple(cut[1:]), cut[0], f32(0.4), f32(0.2), NO_FLOAT32, expected)
    assert np.array_equal(four, expected)


def test_fill_sum_of_a_truncated_file_is_a_read_error_naming_it(tmp_path: Path):
    paths = write_inputs(tmp_path, 2)
    sources, found = spans(paths)
    os.truncate(paths[0], os.path.getsize(paths[0]) - RANGE_ELEMENTS)

    def reread(start: int, stop: int) -> None:
        sources[0].read_range("w", start, stop)

    out = np.empty(NUMEL, dtype=np.uint16)
    with ThreadPoolExecutor(1) as helper, pytest.raises(FormatError, match="the file ended"):
        fill_sum(found, (0.5, 0.5), 0, NUMEL, out, helper, reread)


def run_engine(recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch, files: bool) -> dict:
    calls: list[str] = []

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls.append(name)
            return real(*args)

        return call

    monkeypatch.setattr("merge.execute.fill_gram", counted("gram", fill_gram))
    monkeypatch.setattr("merge.execute.fill_sum", counted("sum", fill_sum))
    if not files:
        monkeypatch.setattr(Engine, "_gram_files", lambda self, run, call: None)
        monkeypatch.setattr(Engine, "_sum_files", lambda self, run: None)
    # apply chunks of 200k elements: starts off the ranges and blocks
    out = Engine(plan_recipe(recipe), chunk=200_000, quiet=True).to_memory()
    # `w` only (`b` is too small to be worth it): one statistics pass, three apply chunks
    assert calls == (["gram", "sum", "sum", "sum"] if files else [])
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_engine_merges_from_the_files_as_from_its_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
):
    paths = write_inputs(tmp_path, 3)
    inputs = {"base": str(paths[0]), "a": str(paths[1]), "b": str(paths[2])}
    models = ["a"] if method == "slerp" else ["a", "b"]
    step = {"method": method, "base": "base", "models": models}
    if method == "slerp":
        step["t"] = 0.3
    recipe = {"version": 1, "inputs": inputs, "steps": {"out": step}}
    from_files = run_engine(recipe, monkeypatch, files=True)
    from_chunks = run_engine(recipe, monkeypatch, files=False)
    assert from_files["w"].dtype == torch.bfloat16
    assert all(torch.equal(from_files[k], from_chunks[k]) for k in ("w", "b"))
    ws = {k: SafetensorsSource([Path(v)]).read("w") for k, v in inputs.items()}
    if method == "slerp":
        whole = slerp([ws["a"].float()], base=ws["base"].float(), t=0.3)
    else:
        whole = model_stock([ws["a"].float(), ws["b"].float()], base=ws["base"].float())
    assert torch.equal(from_files["w"], whole.bfloat16())


def test_engine_refuses_a_nan_read_from_the_files_naming_input_and_tensor(tmp_path: Path):
    paths = write_inputs(tmp_path, 2)
    bad = SafetensorsSource([paths[1]]).read("w").clone()
    bad[NUMEL - 3] = float("nan")  # in the last, partial range
    save_file({"w": bad, "b": torch.zeros(7, dtype=torch.bfloat16)}, paths[1])
    recipe = {
        "version": 1,
        "inputs": {"base": str(paths[0]), "a": str(paths[1])},
        "steps": {"out": {"method": "slerp", "base": "base", "models": ["a"]}},
    }
    with pytest.raises(ExecutionError, match="method `slerp`: model 1 has 1 NaN and 0 inf .*`w`"):
        Engine(plan_recipe(recipe), quiet=True).to_memory()
