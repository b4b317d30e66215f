"""The path engine: exact endpoints, in-place weights, buffers, BatchNorm, task-vector paths, planes."""

from __future__ import annotations

import evaluate_entry as entry
import pytest
import torch
from torch import nn

from merge.errors import FormatError, UsageError
from merge.evaluate import interpolation_path, plane, task_vector_path
from merge.evaluate.evaluators import ClassificationEvaluator
from merge.evaluate.weights import StateSpace
from merge.toy import evaluate_loss, make_transformer


def test_endpoints_equal_the_endpoint_models_metrics_exactly(mlp_pair) -> None:
    r = interpolation_path(
        entry.make_model, mlp_pair.path_a, mlp_pair.path_b, data=entry.test_data(), steps=5
    )
    naive = r.curve("naive")
    assert naive.coords("alpha") == [0.0, 0.25, 0.5, 0.75, 1.0]
    for model, point in ((mlp_pair.a, naive.points[0]), (mlp_pair.b, naive.points[-1])):
        loss, acc = evaluate_loss(
            model, entry.test_data()
        )  # an independent evaluation of the original
        assert point["metrics"] == {"loss": loss, "accuracy": acc}
    assert r.endpoints["a"]["ok"] and r.endpoints["b"]["ok"]
    assert r.endpoints["a"]["max_abs_diff"] == 0.0 and r.endpoints["a"]["tolerance"] == 0.0
    # two seeds: a clear bump in the middle, reported under every definition
    loss = naive.barriers["loss"]
    assert loss["max_minus_mean"]["value"] > 0.1 and loss["midpoint"]["value"] > 0.1
    assert naive.barriers["accuracy"]["direction"] == "higher_is_better"
    assert r.settings["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r.selection["naive"]["loss"]["max_minus_mean"] == loss["max_minus_mean"]["value"]


def test_interior_points_equal_a_model_built_from_interpolated_weights(mlp_pair) -> None:
    r = interpolation_path(
        entry.make_model,
        mlp_pair.a.state_dict(),
        mlp_pair.b.state_dict(),
        data=entry.test_data(),
        alphas=[0.3],
    )
    sa, sb = mlp_pair.a.state_dict(), mlp_pair.b.state_dict()
    m = entry.make_model()
    m.load_state_dict({k: 0.7 * sa[k] + 0.3 * sb[k] for k in sa})
    loss, acc = evaluate_loss(m, entry.test_data())
    got = next(p for p in r.curve("naive").points if p["coords"]["alpha"] == 0.3)["metrics"]
    assert got["loss"] == pytest.approx(loss, rel=1e-5) and got["accuracy"] == pytest.approx(
        acc, abs=2e-3
    )


def test_weights_are_written_in_place_into_one_model(mlp_pair) -> None:
    model = entry.make_model()
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    space = StateSpace(model, {"a": mlp_pair.a.state_dict(), "b": mlp_pair.b.state_dict()})
    for w in (0.0, 0.4, 1.0, 1.7, -0.5):
        space.apply({"a": 1 - w, "b": w})
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
    space.apply({"a": 1.0, "b": 0.0})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in mlp_pair.a.state_dict().items())
    space.apply({"a": 0.25, "b": 0.75})
    for k, v in model.state_dict().items():
        torch.testing.assert_close(
            v, torch.lerp(mlp_pair.a.state_dict()[k], mlp_pair.b.state_dict()[k], 0.75)
        )


def test_integer_buffers_are_never_interpolated() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: (v + 1 if v.is_floating_point() else v + 7) for k, v in a.items()}
    a["1.num_batches_tracked"] = torch.tensor(5)
    b["1.num_batches_tracked"] = torch.tensor(12)
    space = StateSpace(model, {"a": a, "b": b})
    space.apply({"a": 0.7, "b": 0.3})
    assert (
        int(model[1].num_batches_tracked) == 5 and model[1].num_batches_tracked.dtype == torch.long
    )
    torch.testing.assert_close(model[1].running_mean, a["1.running_mean"] + 0.3)
    space.apply({"a": 0.2, "b": 0.8})
    assert int(model[1].num_batches_tracked) == 12


def test_half_precision_models_get_exact_endpoints(mlp_pair) -> None:
    model = entry.make_model().to(torch.bfloat16)
    space = StateSpace(model, {"a": mlp_pair.a.state_dict(), "b": mlp_pair.b.state_dict()})
    space.apply({"a": 0.0, "b": 1.0})
    for k, v in mlp_pair.b.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16))
    space.apply({"a": 0.5, "b": 0.5})
    k = "layers.0.weight"
    expected = (0.5 * mlp_pair.a.state_dict()[k] + 0.5 * mlp_pair.b.state_dict()[k]).to(
        torch.bfloat16
    )
    assert torch.equal(model.state_dict()[k], expected)


def test_tied_weights_left_out_of_a_checkpoint_are_filled_from_their_twin() -> None:
    lm = make_transformer(seed=0)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    space = StateSpace(make_transformer(seed=1), {"a": state, "b": state})
    space.apply({"a": 0.5, "b": 0.5})
    assert torch.equal(space.model.lm_head.weight, lm.wte.weight)


def test_a_model_that_does_not_accept_the_checkpoint_is_a_clear_error(mlp_pair) -> None:
    with pytest.raises(
        FormatError,
        match=r"mlp0/a: the model from --model does not match a:\n  shape mismatches: .*layers\.0\.weight: model \(64, 16\) vs a \(32, 16\)",
    ):
        interpolation_path(
            entry.make_wide_model, mlp_pair.path_a, mlp_pair.path_b, data=entry.test_data(), steps=3
        )


def test_batchnorm_note_and_reset_curve(cnn_pair) -> None:
    data = entry.image_data()
    plain = interpolation_path(entry.make_cnn, cnn_pair.path_a, cnn_pair.path_b, data=data, steps=3)
    assert any("BatchNorm" in n and "interpolated" in n for n in plain.notes)
    r = interpolation_path(
        entry.make_cnn, cnn_pair.path_a, cnn_pair.path_b, data=data, steps=3, bn_reset=True
    )
    assert [c.name for c in r.curves] == ["naive", "naive+bn_reset"]
    assert not any("BatchNorm" in n for n in r.notes)
    assert r.curve("naive+bn_reset").info["statistics"] == "bn_reset"
    assert r.curve("naive+bn_reset").barriers["loss"]["max_minus_mean"] is not None
    # the stored-statistics curve is the one whose endpoints are checked
    assert r.endpoints["a"]["ok"] and r.endpoints["b"]["ok"]
    # the reset endpoint uses recomputed statistics, hence (slightly) other numbers
    assert r.curve("naive+bn_reset").points[0]["metrics"] != r.curve("naive").points[0]["metrics"]


def test_task_vector_path_and_plane_check_their_checkpoints(mlp_pair) -> None:
    base, t1, t2 = mlp_pair.a.state_dict(), mlp_pair.b.state_dict(), mlp_pair.b.state_dict()
    r = task_vector_path(
        entry.make_model, base, t1, scales=[-1.0, 0.0, 0.5, 1.0, 2.0], data=entry.test_data()
    )
    assert r.kind == "task_vector_path" and r.axes == ["lambda"]
    assert set(r.endpoints) == {"base", "task"} and r.ok
    p = plane(entry.make_model, base, t1, t2, grid=3, lam_range=(0.0, 1.0), data=entry.test_data())
    assert len(p.curves[0].points) == 9 and p.axes == ["lambda1", "lambda2"]
    assert set(p.endpoints) == {"base", "task1", "task2"} and p.ok
    corner = next(
        pt for pt in p.curves[0].points if pt["coords"] == {"lambda1": 0.5, "lambda2": 0.5}
    )
    end = next(pt for pt in p.curves[0].points if pt["coords"] == {"lambda1": 1.0, "lambda2": 0.0})
    assert corner["metrics"] == pytest.approx(end["metrics"], rel=1e-5)  # τ1 = τ2 here


def test_data_that_yields_nothing_is_a_clear_error(mlp_pair) -> None:
    with pytest.raises(UsageError, match=r"--data `empty_data` yielded no batches"):
        interpolation_path(
            entry.make_model, mlp_pair.path_a, mlp_pair.path_b, data=entry.empty_data, steps=3
        )
    spent = iter(entry.test_data())
    ev = ClassificationEvaluator(spent)
    ev(mlp_pair.a)
    with pytest.raises(UsageError, match="one-shot iterator that was already used up"):
        ev(mlp_pair.a)


def test_a_generator_factory_is_called_again_for_every_pass(mlp_pair) -> None:
    ev = ClassificationEvaluator(entry.test_data_generator)
    assert ev(mlp_pair.a) == ev(mlp_pair.a)


def test_aligned_path_lowers_the_barrier_and_its_endpoints_reproduce_b(mlp_pair) -> None:
    r = interpolation_path(
        entry.make_model,
        mlp_pair.path_a,
        mlp_pair.path_b,
        data=entry.test_data(),
        steps=5,
        align="weight",
    )
    assert [c.name for c in r.curves] == ["naive", "aligned"]
    assert (
        r.endpoints["b@aligned"]["ok"] and r.endpoints["b@aligned"]["tolerance"] > 0
    )  # a permuted B: same function
    naive = r.curve("naive").barriers["loss"]["max_minus_mean"]["value"]
    aligned = r.curve("aligned").barriers["loss"]["max_minus_mean"]["value"]
    assert aligned < 0.6 * naive
    assert r.selection["aligned"]["loss"]["reduction_vs_naive"] == pytest.approx(
        1 - aligned / naive
    )
    assert r.settings["alignment"]["method"] == "weight"


def test_repair_curve_on_the_aligned_path(mlp_pair) -> None:
    r = interpolation_path(
        entry.make_model,
        mlp_pair.path_a,
        mlp_pair.path_b,
        data=entry.test_data(),
        steps=3,
        align="weight",
        repair=True,
        bn_data=entry.train_data(),
    )
    assert [c.name for c in r.curves] == ["naive", "aligned", "aligned+repair"]
    assert r.curve("aligned+repair").info["statistics"] == "repair"
    mid = r.curve("aligned+repair").points[1]["metrics"]["loss"]
    assert mid < r.curve("naive").points[1]["metrics"]["loss"]


@pytest.mark.parametrize("cache", ["cpu", "stream"])
def test_cache_modes_give_the_same_points(mlp_pair, cache: str) -> None:
    kwargs = {"data": entry.test_data(), "steps": 5}
    ref = interpolation_path(
        entry.make_model, mlp_pair.path_a, mlp_pair.path_b, cache="device", **kwargs
    )
    r = interpolation_path(
        entry.make_model, mlp_pair.path_a, mlp_pair.path_b, cache=cache, **kwargs
    )
    assert r.settings["cache"] == cache and r.ok and r.endpoints["a"]["tolerance"] == 0.0
    assert [p["metrics"] for p in r.curve("naive").points] == [
        p["metrics"] for p in ref.curve("naive").points
    ]


def test_stream_cache_holds_no_copy_of_a_checkpoint_on_disk(mlp_pair) -> None:
    from merge.evaluate.weights import SourceTensors

    space = StateSpace(
        entry.make_model(), {"a": mlp_pair.path_a, "b": mlp_pair.b.state_dict()}, cache="stream"
    )
    assert isinstance(space.state("a"), SourceTensors)
    assert isinstance(space.state("b"), dict) and all(
        t.device.type == "cpu" for t in space.state("b").values()
    )
    space.apply({"a": 0.5, "b": 0.5})
    for k, v in space.model.state_dict().items():
        torch.testing.assert_close(
            v, torch.lerp(mlp_pair.a.state_dict()[k], mlp_pair.b.state_dict()[k], 0.5)
        )
    with pytest.raises(UsageError, match=r"unknown cache `strem` \(did you mean `stream`\?\)"):
        StateSpace(entry.make_model(), cache="strem")


def test_auto_cache_keeps_small_states_beside_the_model(mlp_pair) -> None:
    space = StateSpace(entry.make_model(), {"a": mlp_pair.path_a}, cache="auto")
    assert space.cache == "device"


def test_a_device_map_builds_the_model_on_the_meta_device(mlp_pair) -> None:
    from merge.evaluate.runner import build_model

    r = interpolation_path(
        entry.make_model,
        mlp_pair.path_a,
        mlp_pair.path_b,
        data=entry.test_data(),
        steps=3,
        device_map={"layers.0": "cpu", "layers.1": "cpu", "layers.2": "cpu"},
    )
    ref = interpolation_path(
        entry.make_model, mlp_pair.path_a, mlp_pair.path_b, data=entry.test_data(), steps=3
    )
    assert r.ok and [p["metrics"] for p in r.curves[0].points] == [
        p["metrics"] for p in ref.curves[0].points
    ]
    lm = build_model(lambda: make_transformer(seed=0), "cpu", {"": "cpu"})
    assert lm.lm_head.weight is lm.wte.weight  # ties survive the meta build
    with pytest.raises(UsageError, match="places no module that holds `layers.2.weight`"):
        build_model(entry.make_model, "cpu", {"layers.0": "cpu", "layers.1": "cpu"})
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="none is visible"):
            build_model(entry.make_model, "cpu", "auto")
