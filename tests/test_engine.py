from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from core_fixtures import sha256_tree, tensors
from safetensors import safe_open

from merge.api import (
    evaluate_expression_in_memory,
    evaluate_recipe_in_memory,
    merge_expression,
    plan_recipe,
    run_recipe,
)
from merge.errors import ExecutionError, MergeWarning, PlanError
from merge.execute import Engine, form_calls
from merge.io import load_state_dict, save_state_dict
from merge.methods import register
from merge.methods.slerp import SlerpKernel


def test_hand_worked_task_arithmetic() -> None:
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    a = {"w": torch.tensor([2.0, 2.0, 2.0])}
    b = {"w": torch.tensor([0.0, 0.0, 0.0])}
    out = evaluate_expression_in_memory(
        "base + 0.5 * (a - base) - 0.5 * (b - base)", {"base": base, "a": a, "b": b}
    )
    # 1 + 0.5 - (-0.5) ... = [1 + 0.5, 2 + 0, 3 - 0.5] + [0.5, 1, 1.5] = [2, 3, 4]
    assert torch.equal(out["w"], torch.tensor([2.0, 3.0, 4.0]))
    neg = evaluate_expression_in_memory("base - (a - base)", {"base": base, "a": a})
    assert torch.equal(neg["w"], torch.tensor([0.0, 2.0, 4.0]))
    analogy = evaluate_expression_in_memory("a - b + base", {"base": base, "a": a, "b": b})
    assert torch.equal(analogy["w"], torch.tensor([3.0, 4.0, 5.0]))
    scaled = evaluate_expression_in_memory("base + 2 * (a - base) / 4", {"base": base, "a": a})
    assert torch.equal(scaled["w"], torch.tensor([1.5, 2.0, 2.5]))


def test_streamed_file_equals_in_memory_reference(
    three_models: dict[str, Path], tmp_path: Path
) -> None:
    expr = "base + 0.7 * (a - base) - 0.4 * (b - base)"
    out = merge_expression(expr, three_models, tmp_path / "out", shard_size="1KB")
    got = load_state_dict(out)
    t = {n: tensors(i) for i, n in enumerate(["base", "a", "b"])}
    for k, v in got.items():
        if not v.is_floating_point():
            assert torch.equal(v, t["base"][k])  # integer tensors pass through from the base
            continue
        ref = t["base"][k] + 0.7 * (t["a"][k] - t["base"][k]) - 0.4 * (t["b"][k] - t["base"][k])
        torch.testing.assert_close(v, ref, rtol=1e-6, atol=1e-6)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    # Support files follow the base, and the recipe and input fingerprints are in the metadata.
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    with safe_open(next(out.glob("model-00001-*.safetensors")), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["merge_recipe"])["steps"]["result"] == expr
    fps = json.loads(meta["merge_inputs"])
    assert set(fps) == {"base", "a", "b"} and len(fps["a"]["header_sha256"]) == 16


def test_chunked_streaming_equals_whole_tensors(three_models: dict[str, Path]) -> None:
    recipe = {
        "inputs": {k: str(v) for k, v in three_models.items()},
        "steps": {"r": "0.2 * base + 0.3 * a + 0.5 * b"},
    }
    whole = Engine(plan_recipe(recipe), chunk=1 << 20, quiet=True).to_memory()
    chunked = Engine(plan_recipe(recipe), chunk=7, quiet=True).to_memory()
    assert whole.keys() == chunked.keys()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_same_recipe_gives_the_same_bytes(three_models: dict[str, Path], tmp_path: Path) -> None:
    r = {
        "inputs": {k: str(v) for k, v in three_models.items()},
        "steps": {"r": "base + 0.3 * (a - base) + 0.3 * (b - base)"},
    }
    one = run_recipe(r, tmp_path / "one", quiet=True)
    two = run_recipe(r, tmp_path / "two", quiet=True)
    assert sha256_tree(one) == sha256_tree(two)


def test_output_dtype_policy(tmp_path: Path) -> None:
    save_state_dict(tensors(0, torch.bfloat16), tmp_path / "x")
    save_state_dict(tensors(1, torch.float16), tmp_path / "y")
    with pytest.warns(MergeWarning, match=r"mix float dtypes .*; the output is bfloat16, as in"):
        written = merge_expression(
            "0.5 * x + 0.5 * y", {"x": tmp_path / "x", "y": tmp_path / "y"}, tmp_path / "o"
        )
    out = load_state_dict(written)
    assert out["model.embed_tokens.weight"].dtype == torch.bfloat16  # the first checkpoint's dtype
    assert out["model.position_ids"].dtype == torch.int64
    ref = (
        0.5 * tensors(0, torch.bfloat16)["model.embed_tokens.weight"].float()
        + 0.5 * tensors(1, torch.float16)["model.embed_tokens.weight"].float()
    ).bfloat16()
    assert torch.equal(out["model.embed_tokens.weight"], ref)
    out32 = load_state_dict(
        merge_expression(
            "0.5 * x + 0.5 * y",
            {"x": tmp_path / "x", "y": tmp_path / "y"},
            tmp_path / "o32",
            dtype="float32",
        )
    )
    assert out32["model.embed_tokens.weight"].dtype == torch.float32


def test_key_and_shape_mismatches_are_listed_together() -> None:
    a = tensors(0)
    b = dict(tensors(1))
    b.pop("model.layers.0.mlp.up_proj.weight")
    b["extra.weight"] = torch.zeros(2)
    b["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(PlanError) as e:
        evaluate_expression_in_memory("0.5 * a + 0.5 * b", {"a": a, "b": b})
    text = str(e.value)
    assert (
        "`a` (<memory:a>) has 1 tensor(s) that other inputs lack: model.layers.0.mlp.up_proj.weight"
        in text
    )
    assert "`b` (<memory:b>) has 1 tensor(s) that other inputs lack: extra.weight" in text
    assert "use `options: {keys: intersection}`" in text
    inter = evaluate_expression_in_memory(
        "0.5 * a + 0.5 * b",
        {
            "a": a,
            "b": {k: v for k, v in b.items() if k != "model.layers.1.mlp.up_proj.weight"}
            | {"model.layers.1.mlp.up_proj.weight": a["model.layers.1.mlp.up_proj.weight"]},
        },
        keys="intersection",
    )
    assert "extra.weight" not in inter and "model.layers.0.mlp.up_proj.weight" not in inter
    with pytest.raises(
        PlanError,
        match=r"`model.layers.1.mlp.up_proj.weight` has different shapes: a \[12, 8\], b \[3, 3\]",
    ):
        evaluate_expression_in_memory("0.5 * a + 0.5 * b", {"a": a, "b": b}, keys="intersection")
    union = evaluate_expression_in_memory(
        "0.5 * a + 0.5 * b",
        {"a": a, "b": {k: v for k, v in b.items() if k != "model.layers.1.mlp.up_proj.weight"}},
        keys="union",
    )
    assert torch.equal(
        union["extra.weight"], b["extra.weight"]
    )  # passes through from the input that has it


def test_zero_sum_weights_are_an_error_not_nan() -> None:
    r = {
        "inputs": {"a": "<memory:a>", "b": "<memory:b>"},
        "steps": {
            "s": {"method": "linear", "models": {"a": {"weight": 1.0}, "b": {"weight": -1.0}}}
        },
    }
    from merge.io import open_checkpoint

    srcs = {"a": open_checkpoint(tensors(0)), "b": open_checkpoint(tensors(1))}
    with pytest.raises(
        PlanError,
        match=r"weights \[1.0, -1.0\] sum to zero, so they cannot be normalized; change a weight or set `normalize: false`",
    ):
        evaluate_recipe_in_memory(r, preopened=srcs)
    r["steps"]["s"]["normalize"] = False  # type: ignore[index]
    out = evaluate_recipe_in_memory(r, preopened=srcs)
    k = "model.embed_tokens.weight"
    assert torch.equal(out[k], tensors(0)[k] - tensors(1)[k])


def test_coefficients_not_summing_to_one_warn_naming_the_step() -> None:
    with pytest.warns(MergeWarning, match=r"step `result`: the checkpoints' coefficients sum to 2"):
        evaluate_expression_in_memory("a + b", {"a": tensors(0), "b": tensors(1)})


def test_overrides_and_layer_gradients() -> None:
    a, b = tensors(0), tensors(1)
    r = {
        "inputs": {"a": "<memory:a>", "b": "<memory:b>"},
        "steps": {
            "s": {
                "method": "linear",
                "models": {"a": {"weight": 1.0}, "b": {"weight": [0.0, 1.0]}},
                "normalize": False,
            }
        },
        "overrides": [{"glob": "*.q_proj.*", "input": "a", "weight": 0.0}],
    }
    from merge.io import open_checkpoint

    out = evaluate_recipe_in_memory(r, preopened={"a": open_checkpoint(a), "b": open_checkpoint(b)})
    for i, t in enumerate([0.0, 0.5, 1.0]):  # layers 0..2 -> t = i / 2
        k = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(out[k], a[k] + t * b[k])
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        torch.testing.assert_close(out[q], t * b[q])
    k = "model.embed_tokens.weight"  # outside the layers: the first anchor
    torch.testing.assert_close(out[k], a[k])


@register("_test_elementwise_max", reference="test only", properties={"idempotent"})
def _max(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max_i x_i (a non-linear method, to exercise whole-tensor jobs)."""
    return torch.stack(list(tensors)).amax(0)


def test_method_calls_inside_expressions() -> None:
    a, b, c = tensors(0), tensors(1), tensors(2)
    out = evaluate_expression_in_memory(
        "c + 0.5 * (_test_elementwise_max(a, b) - c)", {"a": a, "b": b, "c": c}
    )
    k = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(out[k], c[k] + 0.5 * (torch.maximum(a[k], b[k]) - c[k]))


def test_method_errors_name_the_tensor_and_step() -> None:
    @register("_test_fails", reference="test only")
    def fails(tensors: list[torch.Tensor]) -> torch.Tensor:
        """Always fails."""
        raise RuntimeError("boom")

    from merge.errors import ExecutionError

    with pytest.raises(
        ExecutionError,
        match=r"while merging tensor `model.embed_tokens.weight` in step `result` with `_test_fails`: RuntimeError: boom",
    ):
        evaluate_expression_in_memory("_test_fails(a)", {"a": tensors(0)})


def test_ties_scope_model_uses_one_threshold_per_model() -> None:
    """`scope: model` (the paper) trims with one threshold over all of a model's tensors."""
    from merge.io import open_checkpoint

    base, a, b = tensors(0), tensors(1), tensors(2)
    r = {
        "inputs": {"base": "<memory:base>", "a": "<memory:a>", "b": "<memory:b>"},
        "steps": {
            "s": {
                "method": "ties",
                "base": "base",
                "models": ["a", "b"],
                "density": 0.3,
                "scope": "model",
            }
        },
    }
    srcs = {n: open_checkpoint(d) for n, d in (("base", base), ("a", a), ("b", b))}
    out = evaluate_recipe_in_memory(r, preopened=srcs)
    floats = [k for k in base if base[k].is_floating_point()]
    # Reference: the paper's TIES written out, with each model's global top-30% threshold.
    taus = {n: {k: d[k] - base[k] for k in floats} for n, d in (("a", a), ("b", b))}
    kept = {}
    for n, t in taus.items():
        flat = torch.cat([v.reshape(-1).abs() for v in t.values()])
        k = int(0.3 * flat.numel())
        thr = flat.sort(descending=True).values[k - 1]
        kept[n] = {key: torch.where(v.abs() >= thr, v, torch.zeros_like(v)) for key, v in t.items()}
    for key in floats:
        stack = torch.stack([kept["a"][key], kept["b"][key]])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        mean = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(out[key], base[key] + mean, rtol=1e-6, atol=1e-6, msg=key)
    # Per-tensor scope differs on this model (thresholds differ across tensors).
    r["steps"]["s"]["scope"] = "tensor"  # type: ignore[index]
    per_tensor = evaluate_recipe_in_memory(r, preopened=srcs)
    assert any(not torch.equal(per_tensor[k], out[k]) for k in floats)


def test_top_level_api() -> None:
    import merge

    out = merge.evaluate_expression_in_memory(
        "0.5 * a + 0.5 * b", {"a": {"w": torch.ones(2)}, "b": {"w": torch.zeros(2)}}
    )
    assert torch.equal(out["w"], torch.full((2,), 0.5))
    assert merge.open_checkpoint({"w": torch.ones(1)}).keys() == ["w"]
    # What type checkers see (the TYPE_CHECKING re-exports) is what `merge.X` gives at run time.
    tree = ast.parse(Path(merge.__file__).read_text())
    typed = {
        alias.asname: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname
    }
    assert typed == merge._EXPORTS
    assert all(getattr(merge, name) is not None for name in merge.__all__)
    assert (Path(merge.__file__).parent / "py.typed").is_file()
    with pytest.raises(AttributeError, match="module `merge` has no attribute `nope`"):
        merge.nope  # noqa: B018


def test_weighted_sum_in_blocks_hand_worked() -> None:
    from merge.execute import combine_blocked

    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).to(torch.bfloat16)
    y = torch.tensor([4.0, 0.0, -2.0, 8.0, 1.0]).to(torch.bfloat16)
    out = torch.empty(5, dtype=torch.bfloat16)
    # Blocks of 2 (work holds accumulator + scratch): 0.5x + 0.25y = [1.5, 1, 1, 4, 2.75].
    combine_blocked([x, y], [0.5, 0.25], out, torch.empty(4))
    assert torch.equal(out, torch.tensor([1.5, 1.0, 1.0, 4.0, 2.75], dtype=torch.bfloat16))
    combine_blocked([], [], out, torch.empty(4))  # every term cancelled
    assert torch.equal(out, torch.zeros(5, dtype=torch.bfloat16))


def test_chained_steps_plan_in_linear_time() -> None:
    """Issue 15 item 9: each step reused twice by the next made planning 2^steps."""
    import time

    from merge.execute import describe_plan
    from merge.io.sources import MemorySource

    steps: dict[str, object] = {
        "s0": {"method": "ties", "base": "base", "models": ["a", "b"], "density": 0.5}
    }
    for i in range(1, 40):  # 2^40 calls as a tree; 40 as a DAG
        steps[f"s{i}"] = {
            "method": "ties",
            "base": f"s{i - 1}",
            "models": [f"s{i - 1}", "a"],
            "density": 0.5,
        }
    r = {"inputs": {n: f"<memory:{n}>" for n in ("base", "a", "b")}, "steps": steps}
    g = torch.Generator().manual_seed(0)
    srcs = {
        n: MemorySource({"w": torch.randn(4, 3, generator=g)}, f"<memory:{n}>")
        for n in ("base", "a", "b")
    }
    t0 = time.perf_counter()
    plan = plan_recipe(r, preopened=srcs)
    text = describe_plan(plan)
    out = Engine(plan, quiet=True).to_memory()
    assert time.perf_counter() - t0 < 20
    assert "s39 = ties(s38, a, base=s38)" in text and len(text) < 10_000
    # the DAG computes what the recipe says: s_i = ties([s_{i-1}, a], base=s_{i-1})
    from merge.methods.ties import ties

    x = srcs["base"].read("w")
    s = ties(
        [srcs["a"].read("w"), srcs["b"].read("w")], base=x, weight=[1.0, 1.0], density=[0.5] * 2
    )
    for _ in range(39):
        s = ties([s, srcs["a"].read("w")], base=s, weight=[1.0, 1.0], density=[0.5] * 2)
    assert torch.equal(out["w"], s)


def test_zero_sum_error_is_reported_once_not_per_tensor() -> None:
    r = {
        "inputs": {"a": "<memory:a>", "b": "<memory:b>"},
        "steps": {
            "s": {"method": "linear", "models": {"a": {"weight": 1.0}, "b": {"weight": -1.0}}}
        },
    }
    from merge.io import open_checkpoint

    srcs = {"a": open_checkpoint(tensors(0)), "b": open_checkpoint(tensors(1))}
    with pytest.raises(PlanError) as e:
        plan_recipe(r, preopened=srcs)
    msg = str(e.value)
    assert msg.count("sum to zero") == 1
    assert "cannot merge these inputs (1 problem)" in msg
    assert re.search(r"\(in \d+ tensors, e\.g\. `model\.", msg)


def test_coefficient_warning_is_one_clean_line_once_and_silent_with_q(tmp_path: Path) -> None:
    """Issue 14 item 23 (planner part): no internal path, once in validate, nothing with -q."""
    from click.testing import CliRunner

    from merge.cli import cli

    for i, n in enumerate(("a", "b")):
        save_state_dict(tensors(i), tmp_path / n)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"inputs: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\nsteps:\n  s: a + b\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output
    assert res.output.count("coefficients sum to 2") == 1
    assert "MergeWarning" not in res.output and ".py:" not in res.output
    res = runner.invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "o1")])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "coefficients" in ln]
    assert lines == [
        "warning: step `s`: the checkpoints' coefficients sum to 2, not 1, so its result is "
        "scaled away from the models (did you mean a task vector such as `a - base`?)"
    ]
    res = runner.invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "o2"), "-q"])
    assert res.exit_code == 0 and "coefficients" not in res.output


@pytest.mark.parametrize(
    "step",
    [
        "ties(a, b, base=base, density=0.5)",  # streamed: statistics then apply
        "dare_linear(a, b, base=base, density=0.5)",  # streamed: elementwise
        "slerp(a, base=base, t=0.3)",  # whole tensor
    ],
)
def test_methods_refuse_non_finite_inputs_naming_the_tensor(tmp_path: Path, step: str) -> None:
    """One rule in the engine for every method: NaN/inf inputs are refused with the tensor name
    (weighted sums only warn, from the reader, since NaN there stays where it was)."""
    bad = tensors(1)
    bad["model.layers.1.mlp.up_proj.weight"][3, 2] = float("nan")
    paths = {
        "base": save_state_dict(tensors(0), tmp_path / "base"),
        "a": save_state_dict(bad, tmp_path / "a"),
        "b": save_state_dict(tensors(2), tmp_path / "b"),
    }
    with (
        warnings.catch_warnings(),  # whole-tensor reads also warn, before the refusal
        pytest.raises(
            ExecutionError,
            match=r"model 1 has 1 NaN and 0 inf value in tensor `model.layers.1.mlp.up_proj.weight`",
        ),
    ):
        warnings.simplefilter("ignore", MergeWarning)
        merge_expression(step, paths, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weighted_sums_and_copies_warn_once_about_non_finite_inputs(tmp_path: Path) -> None:
    """The engine reads into its buffers unchecked and checks the sums it computes instead: a NaN
    input still gets one warning naming its file and tensor, and its output stays NaN there."""
    bad = tensors(1)
    bad["model.layers.0.mlp.up_proj.weight"][1, 1] = float("nan")
    a = save_state_dict(bad, tmp_path / "a")
    b = save_state_dict(tensors(2), tmp_path / "b")
    with pytest.warns(MergeWarning) as record:
        out = merge_expression("0.5 * a + 0.5 * b", {"a": a, "b": b}, tmp_path / "sum")
    got = [str(r.message) for r in record if "NaN or Inf" in str(r.message)]
    assert len(got) == 1 and "tensor `model.layers.0.mlp.up_proj.weight` holds 1 NaN" in got[0]
    assert str(a) in got[0]
    with pytest.warns(MergeWarning, match="holds 1 NaN"):  # reading the output warns too
        merged = load_state_dict(out)
    assert torch.isnan(merged["model.layers.0.mlp.up_proj.weight"][1, 1])
    with pytest.warns(MergeWarning, match=r"tensor `model.layers.0.mlp.up_proj.weight` holds 1"):
        merge_expression("a", {"a": a}, tmp_path / "copy")  # a copy job


@pytest.mark.parametrize("reader_converts", [True, False])
def test_streamed_calls_give_the_same_bytes_whichever_thread_converts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader_converts: bool
) -> None:
    """The engine hands the bf16 → float32 conversion (and the NaN check) of streamed chunks to
    the reader or to the main thread, whichever has time to spare: the bytes are the same, and a
    NaN is refused either way."""
    paths = {
        n: save_state_dict(
            {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors(i).items()},
            tmp_path / n,
        )
        for i, n in enumerate(["base", "a", "b"])
    }
    recipe = {
        "inputs": {k: str(v) for k, v in paths.items()},
        "steps": {"r": "ties(a, b, base=base, density=0.3) + slerp(a, base=base, t=0.3) - base"},
    }
    want = Engine(plan_recipe(recipe), chunk=1 << 20, quiet=True).to_memory()

    def fixed(self: Engine, item: object, computing: float) -> None:
        self._reader_converts = reader_converts

    monkeypatch.setattr(Engine, "_balance", fixed)
    engine = Engine(plan_recipe(recipe), chunk=37, quiet=True)
    engine._reader_converts = reader_converts
    got = engine.to_memory()
    assert all(torch.equal(want[k], got[k]) for k in want)

    bad = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors(1).items()}
    bad["model.layers.1.mlp.up_proj.weight"][3, 2] = float("nan")
    save_state_dict(bad, tmp_path / "a2")
    recipe["inputs"]["a"] = str(tmp_path / "a2")
    engine = Engine(plan_recipe(recipe), chunk=37, quiet=True)
    engine._reader_converts = reader_converts
    with pytest.raises(ExecutionError, match="model 1 has 1 NaN"):
        engine.to_memory()


@pytest.mark.parametrize(
    "step",
    [
        "ties(a, b, base=base, density=0.3)",
        "slerp(a, base=base, t=0.3)",
        "ties(a, b, base=base, density=[0.3, 1.0], weight=[0.7, 0.5])",
        "model_stock(a, b, base=base)",
    ],
)
@pytest.mark.filterwarnings("ignore:model_stock.*pointing apart")  # random task vectors
def test_bfloat16_chunks_go_to_widening_kernels_as_read_with_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A job that is one TIES, SLERP or Model Stock call on bfloat16 inputs hands the kernel the chunks as
    read (the loops widen them), with no float32 copy: the bytes equal those of the converted
    path, whatever the chunking, and a NaN is still refused by tensor and model."""
    paths = {
        n: save_state_dict(
            {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors(i).items()},
            tmp_path / n,
        )
        for i, n in enumerate(["base", "a", "b"])
    }
    recipe = {"inputs": {k: str(v) for k, v in paths.items()}, "steps": {"r": step}}
    fed: list[bool] = []
    feeds = Engine._feeds_bfloat16

    def spy(self: Engine, *args: Any) -> bool:
        fed.append(feeds(self, *args))
        return fed[-1]

    monkeypatch.setattr(Engine, "_feeds_bfloat16", spy)
    got = Engine(plan_recipe(recipe), chunk=37, quiet=True).to_memory()
    assert fed and all(fed)
    monkeypatch.setattr(Engine, "_feeds_bfloat16", lambda self, *args: False)
    want = Engine(plan_recipe(recipe), chunk=1 << 20, quiet=True).to_memory()
    assert all(torch.equal(want[k], got[k]) for k in want)

    monkeypatch.setattr(Engine, "_feeds_bfloat16", spy)
    bad = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors(2).items()}
    bad["model.layers.1.mlp.up_proj.weight"][3, 2] = float("inf")
    save_state_dict(bad, tmp_path / "b2")
    recipe["inputs"]["a"] = str(tmp_path / "b2")
    method = step.split("(")[0]
    with pytest.raises(
        ExecutionError,
        match=rf"method `{method}`: model 1 has 0 NaN and 1 inf value in tensor "
        r"`model.layers.1.mlp.up_proj.weight`",
    ):
        Engine(plan_recipe(recipe), chunk=37, quiet=True).to_memory()


def test_bfloat16_chunks_are_converted_when_the_call_is_not_the_whole_job(tmp_path: Path) -> None:
    """`0.5 * slerp(...) + 0.5 * a` and float32 inputs keep the float32 copy: the kernel is
    not told to widen, so the feed stays off."""
    paths = {
        n: save_state_dict(
            {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors(i).items()},
            tmp_path / n,
        )
        for i, n in enumerate(["base", "a"])
    }
    plan = plan_recipe(
        {
            "inputs": {k: str(v) for k, v in paths.items()},
            "steps": {"r": "0.5 * slerp(a, base=base, t=0.3) + 0.5 * a"},
        }
    )
    engine = Engine(plan, quiet=True)
    job = next(j for j in plan.jobs if j.mode == "graph")
    calls = form_calls(job.form)
    assert not engine._feeds_bfloat16(job, calls, {id(calls[0]): SlerpKernel(job.shape, {})})
