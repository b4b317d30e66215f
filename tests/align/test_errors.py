"""Bad input gives one clear message: mismatched factories, untraceable models, wrong specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from align_entry import DataDependent, make_deeper_model, make_model, make_narrow_model

from merge.align import (
    SpecError,
    TraceError,
    VerificationError,
    align_state_dicts,
    apply_permutation,
    infer_spec,
    load_spec,
    spec_from_dict,
    verify_spec,
    weight_matching,
)
from merge.errors import FormatError, UsageError


def states(factory=make_model) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return factory().state_dict(), factory().state_dict()


def test_factory_with_other_tensor_names() -> None:
    a, b = states()
    with pytest.raises(FormatError) as e:
        align_state_dicts(make_deeper_model, a, b)
    msg = str(e.value)
    assert msg.startswith("the model from --model does not match checkpoint A:")
    assert "missing from checkpoint A (2): layers.3.bias, layers.3.weight" in msg
    assert "check that --model builds the architecture the checkpoint was saved from" in msg


def test_factory_with_other_shapes() -> None:
    a, b = states()
    with pytest.raises(
        FormatError,
        match=r"shape mismatches: layers.0.bias: model \(64,\) vs checkpoint A \(128,\)",
    ):
        align_state_dicts(make_narrow_model, a, b)


def test_checkpoint_b_is_checked_too() -> None:
    a, _ = states()
    _, b = states(make_narrow_model)
    with pytest.raises(FormatError, match="does not match checkpoint B"):
        align_state_dicts(make_model, a, b)


def test_untraceable_model_without_a_spec() -> None:
    model = DataDependent()
    with pytest.raises(TraceError) as e:
        infer_spec(model, torch.randn(2, 16))
    msg = str(e.value)
    assert msg.startswith("cannot trace DataDependent to infer a permutation spec:")
    assert (
        "torch.fx.symbolic_trace: TraceError: symbolically traced variables cannot be used as inputs to control flow"
        in msg
    )
    assert "torch.export:" in msg
    assert (
        "write the spec by hand (YAML or JSON, see docs/align.md) and pass it with --spec / spec="
        in msg
    )
    # ... and with a hand-written spec the same model aligns fine
    spec = spec_from_dict(
        {
            "groups": {
                "hidden": {
                    "size": 8,
                    "members": [["l1.weight", 0], ["l1.bias", 0], ["l2.weight", 1]],
                }
            }
        }
    )
    a, b = DataDependent().state_dict(), DataDependent().state_dict()
    _, report = align_state_dicts(model, a, b, spec=spec, example_input=torch.randn(4, 16).abs())
    assert report.groups["hidden"].size == 8


def test_spec_naming_missing_tensors(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "groups:\n  P_0:\n    size: 128\n    members: [[layers.0.weigth, 0], [layers.0.bias, 0], [layers.9.weight, 1]]\n"
    )
    spec = load_spec(path)
    a, b = states()
    with pytest.raises(SpecError) as e:
        weight_matching(spec, a, b)
    assert str(e.value) == (
        f"the permutation spec ({path}) does not fit model A's checkpoint (2 problems):\n"
        "  group `P_0`: tensor `layers.0.weigth` is not in model A's checkpoint (did you mean `layers.0.weight`?)\n"
        "  group `P_0`: tensor `layers.9.weight` is not in model A's checkpoint (did you mean `layers.2.weight`?)"
    )
    with pytest.raises(SpecError, match="does not fit the model"):
        align_state_dicts(make_model, a, b, spec=spec)


def test_spec_with_wrong_sizes_and_malformed_entries(tmp_path: Path) -> None:
    a, _ = states()
    spec = spec_from_dict({"groups": {"P_0": {"size": 100, "members": [["layers.0.weight", 0]]}}})
    with pytest.raises(
        SpecError,
        match=r"`layers.0.weight` axis 0 has 50 entries, but size 100 x block 1 \+ offset 0 needs 100",
    ):
        spec.check({"layers.0.weight": a["layers.0.weight"][:50]})
    with pytest.raises(SpecError) as e:
        spec_from_dict(
            {
                "groups": {"P_0": {"size": 0, "members": [["x", "a"]]}, "P_1": {"members": []}},
                "extra": 1,
            }
        )
    assert "unknown top-level keys: extra" in str(e.value)
    assert "groups.P_0.size: expected a positive integer, got 0" in str(e.value)
    assert "groups.P_1: expected a mapping with `size` and `members`" in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="is not valid JSON"):
        load_spec(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_spec_that_is_not_a_symmetry_names_the_group() -> None:
    """layers.1's output permuted without the next layer's input: the outputs change."""
    spec = spec_from_dict(
        {
            "groups": {
                "good": {
                    "size": 128,
                    "members": [
                        ["layers.0.weight", 0],
                        ["layers.0.bias", 0],
                        ["layers.1.weight", 1],
                    ],
                },
                "broken": {"size": 128, "members": [["layers.1.weight", 0], ["layers.1.bias", 0]]},
            }
        }
    )
    a, b = states()
    with pytest.raises(VerificationError) as e:
        align_state_dicts(make_model, a, b, spec=spec)
    msg = str(e.value)
    assert "permutation group `broken` is not a symmetry of the model" in msg
    assert "members: layers.1.weight[axis 0], layers.1.bias[axis 0]" in msg
    assert "`good`" not in msg
    assert msg.endswith("nothing was written; fix the spec (or leave these tensors out of it)")


def test_bad_permutations_and_methods() -> None:
    a, b = states()
    spec = infer_spec(make_model())
    with pytest.raises(
        SpecError, match="the permutation for group `P_layers.0` is not a permutation of range"
    ):
        apply_permutation(spec, {"P_layers.0": [*range(127), 0]}, a)
    with pytest.raises(SpecError, match="permutations given for groups not in the spec: P_nope"):
        apply_permutation(spec, {"P_nope": [0]}, a)
    with pytest.raises(
        UsageError, match="unknown alignment method `sinkhorn`: use one of weight, activation"
    ):
        align_state_dicts(make_model, a, b, method="sinkhorn")
    with pytest.raises(UsageError, match="activation matching needs data"):
        align_state_dicts(make_model, a, b, method="activation")


def test_a_small_missed_bias_fails_the_float64_check() -> None:
    """A hand spec without layers.0.bias, on a model whose bias is tiny: the change (~1e-7) is
    far above float64's 1e-9, and no op computes in float32, so the tolerance stays 1e-9."""
    model = make_model().eval()
    with torch.no_grad():
        model.layers[0].bias.mul_(1e-6)
    spec = spec_from_dict(
        {
            "groups": {
                "P_layers.0": {
                    "size": 128,
                    "members": [["layers.0.weight", 0], ["layers.1.weight", 1]],
                },
            }
        }
    )
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerificationError) as e:
        verify_spec(model, spec, ((x,), {}))
    assert "permutation group `P_layers.0` is not a symmetry of the model" in str(e.value)
    assert "> 1e-09" in str(e.value)


def test_float32_islands_in_a_float64_run_get_the_float32_tolerance() -> None:
    class Upcast(torch.nn.Module):  # an RMSNorm that computes in float32, as Llama's does
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 256), torch.nn.Linear(256, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            hf = h.float()
            hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.b(hf.to(h.dtype))

    spec = spec_from_dict(
        {
            "groups": {
                "h": {"size": 256, "members": [["a.weight", 0], ["a.bias", 0], ["b.weight", 1]]}
            }
        }
    )
    torch.manual_seed(0)
    report = verify_spec(Upcast(), spec, ((torch.randn(64, 8),), {}))
    assert report.rtol == 1e-5 and 1e-9 < max(report.max_change) <= 1e-5
    assert report.notes[0].startswith("the model computes parts in float32 (_to_copy")
