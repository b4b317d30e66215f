"""mergekit's own `tests/test_basic_merges.py` (arcee-ai/mergekit) as YAML configs, run with
`merge run` on tiny models built here: each runs, loads with transformers, passes the case's
check, and for deterministic methods equals mergekit 0.1.5's output within bf16 rounding.

mergekit (a test-only dependency, the `compare` extra) runs the same YAML in process; without
it the comparisons are skipped and the rest still runs.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from merge.cli import cli
from merge.errors import MergeWarning

try:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    HAVE_MERGEKIT = True
except ImportError:  # pragma: no cover - the compare extra is not installed
    HAVE_MERGEKIT = False


def _llama_cfg() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=2,
    )


def _make(kind: str, path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model: torch.nn.Module
    if kind == "llama":
        model = LlamaForCausalLM(_llama_cfg())
    elif kind == "granite":
        model = GraniteForCausalLM(
            GraniteConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=48,
                num_attention_heads=2,
                num_key_value_heads=2,
                num_hidden_layers=2,
            )
        )
    elif kind == "gpt2":
        # mergekit uses GPT-2 small (124M parameters); 12 narrow layers test the same stacking.
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_head=4, n_layer=12, vocab_size=256))
    else:
        vision = CLIPVisionConfig(
            image_size=32,
            patch_size=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_size=64,
            intermediate_size=128,
        )
        model = LlavaForConditionalGeneration(
            LlavaConfig(vision_config=vision, text_config=_llama_cfg(), image_seq_length=16)
        )
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mk-models")
    specs = {
        "model_a": ("llama", 1),
        "model_b": ("llama", 2),
        "model_c": ("llama", 3),
        "granite_a": ("granite", 4),
        "granite_b": ("granite", 5),
        "gpt2_like": ("gpt2", 6),
        "vlm_a": ("llava", 7),
        "vlm_b": ("llava", 8),
        "vlm_c": ("llava", 9),
    }
    return {name: _make(kind, root / name, seed) for name, (kind, seed) in specs.items()}


def two_model(a: str, b: str, method: str, base: str | None = None, **params: Any) -> str:
    """mergekit's `two_model_config`: weights 0.6 and 0.4, bf16, optional base and parameters."""
    cfg: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": f"{{{a}}}", "parameters": {"weight": 0.6}},
            {"model": f"{{{b}}}", "parameters": {"weight": 0.4}},
        ],
        "dtype": "bfloat16",
    }
    if base:
        cfg["base_model"] = f"{{{base}}}"
    if params:
        cfg["parameters"] = params
    return yaml.safe_dump(cfg, sort_keys=False)


def _nuslerp(a: str, b: str, base: str | None, row_wise: bool, flatten: bool) -> str:
    return two_model(a, b, "nuslerp", base, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)


def _nuslerp_zero_sum(a: str, b: str, base: str) -> str:
    cfg = yaml.safe_load(_nuslerp(a, b, base, False, False))
    cfg["models"][0]["parameters"]["weight"] = -0.5
    cfg["models"][1]["parameters"]["weight"] = 0.5
    return yaml.safe_dump(cfg, sort_keys=False)


@dataclass
class Case:
    config: str
    random: bool = False  # DARE/DELLA draw different masks than mergekit: not compared
    check: str | None = None  # the case's own check
    exit_code: int = 0
    vlm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    exact: bool = False  # bitwise equal to mergekit's tensors (cast to the dtype we write)


GPT2_STACK = """
merge_method: passthrough
slices:
  - sources: [{model: "{gpt2_like}", layer_range: [0, 12]}]
  - sources: [{model: "{gpt2_like}", layer_range: [0, 12]}]
dtype: bfloat16
"""
PASSTHROUGH_SCALE = """
merge_method: passthrough
models:
  - model: "{model_a}"
    parameters:
      scale:
        - {filter: o_proj, value: 0}
        - {value: 1}
"""

CASES: dict[str, Case] = {
    "granite_copy": Case(
        "merge_method: passthrough\nmodels: [{model: '{granite_a}'}]\ndtype: bfloat16\n",
        exact=True,
    ),
    "granite_linear": Case(two_model("granite_a", "granite_b", "linear"), exact=True),
    "granite_slerp": Case(two_model("granite_a", "granite_b", "slerp", "granite_a", t=0.5)),
    "gpt2_copy": Case(
        "merge_method: passthrough\nmodels: [{model: '{gpt2_like}'}]\ndtype: bfloat16\n",
        exact=True,
    ),
    "gpt2_stack": Case(GPT2_STACK, check="n_layer_24", exact=True),
    "passthrough_scale": Case(PASSTHROUGH_SCALE, check="o_proj_zero", exact=True),
    "linear": Case(two_model("model_a", "model_b", "linear"), exact=True),
    "slerp": Case(two_model("model_a", "model_b", "slerp", "model_a", t=0.35)),
    **{
        f"nuslerp_{'base' if base else 'nobase'}_{'row' if rw else 'col'}_{'flat' if fl else 'noflat'}": Case(
            _nuslerp("model_a", "model_b", base, rw, fl)
        )
        for base in (None, "model_c")
        for rw in (False, True)
        for fl in (False, True)
    },
    "nuslerp_zero_sum": Case(_nuslerp_zero_sum("model_a", "model_b", "model_c")),
    "task_arithmetic": Case(two_model("model_a", "model_b", "task_arithmetic", "model_c")),
    "breadcrumbs": Case(two_model("model_a", "model_b", "breadcrumbs", "model_c")),
    "ties": Case(two_model("model_a", "model_b", "ties", "model_c", density=0.3)),
    "sce": Case(two_model("model_a", "model_b", "sce", "model_c", select_topk=0.5)),
    "ram": Case(two_model("model_a", "model_b", "ram", "model_c")),
    "ramplus_tl": Case(two_model("model_a", "model_b", "ramplus_tl", "model_c", r=0.05, alpha=1.0)),
    "multislerp": Case(two_model("model_a", "model_b", "multislerp", "model_c")),
    "dare_ties": Case(
        two_model("model_a", "model_b", "dare_ties", "model_c", density=0.66), random=True
    ),
    "model_stock": Case(two_model("model_b", "model_c", "model_stock", "model_a")),
    "model_stock_filterwise": Case(
        two_model("model_b", "model_c", "model_stock", "model_a", filter_wise=True)
    ),
    "arcee_fusion": Case(two_model("model_a", "model_b", "arcee_fusion", "model_a"), exact=True),
    "nearswap": Case(two_model("model_a", "model_b", "nearswap", "model_a", t=0.0001)),
    "della": Case(
        two_model(
            "model_a", "model_b", "della", "model_c", density=0.66, epsilon=0.05, **{"lambda": 0.5}
        ),
        random=True,
    ),
    "della_invalid_epsilon": Case(
        two_model(
            "model_a", "model_b", "della", "model_c", density=0.66, epsilon=1.35, **{"lambda": 0.5}
        ),
        exit_code=2,
    ),
    "karcher": Case(two_model("model_a", "model_b", "karcher", "model_c", max_iter=5, tol=1e-5)),
    "vlm_linear": Case(two_model("vlm_a", "vlm_b", "linear"), vlm=True, exact=True),
    "vlm_slerp": Case(two_model("vlm_a", "vlm_b", "slerp", "vlm_a", t=0.35), vlm=True),
    **{
        f"vlm_nuslerp_{'base' if base else 'nobase'}_{'row' if rw else 'col'}_{'flat' if fl else 'noflat'}": Case(
            _nuslerp("vlm_a", "vlm_b", base, rw, fl), vlm=True
        )
        for base in (None, "vlm_c")
        for rw in (False, True)
        for fl in (False, True)
    },
    "vlm_nuslerp_zero_sum": Case(_nuslerp_zero_sum("vlm_a", "vlm_b", "vlm_c"), vlm=True),
    "vlm_task_arithmetic": Case(two_model("vlm_a", "vlm_b", "task_arithmetic", "vlm_c"), vlm=True),
    "vlm_breadcrumbs": Case(two_model("vlm_a", "vlm_b", "breadcrumbs", "vlm_c"), vlm=True),
    "vlm_ties": Case(two_model("vlm_a", "vlm_b", "ties", "vlm_c", density=0.3), vlm=True),
    "vlm_dare_ties": Case(
        two_model("vlm_a", "vlm_b", "dare_ties", "vlm_c", density=0.66), vlm=True, random=True
    ),
    "vlm_model_stock": Case(two_model("vlm_b", "vlm_c", "model_stock", "vlm_a"), vlm=True),
    "vlm_model_stock_filterwise": Case(
        two_model("vlm_b", "vlm_c", "model_stock", "vlm_a", filter_wise=True), vlm=True
    ),
}


def _fill(text: str, models: dict[str, str]) -> str:
    for name, path in models.items():
        text = text.replace(f"{{{name}}}", path)
    return text


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# transformers 5.23 saves LLaVA under its older names (`language_model.model.*`,
# `vision_tower.*`), which our output keeps; mergekit 0.1.5 writes the newer ones, and only the
# vision tower and projector: its LLaVA definition finds no language-model tensors under these
# names and drops all 21 of them (its output loads with a randomly initialised language model).
_LLAVA_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _old_llava_name(name: str) -> str:
    for old, new in _LLAVA_RENAMES:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def _check(case: Case, out: Path) -> None:
    if case.vlm:
        LlavaForConditionalGeneration.from_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        assert torch.isfinite(logits).all()
    got = _tensors(out)
    assert all(not t.isnan().any() for t in got.values())
    if case.check == "n_layer_24":
        assert json.loads((out / "config.json").read_text())["n_layer"] == 24
    if case.check == "o_proj_zero":
        o_proj = [k for k in got if "o_proj" in k]
        assert o_proj and all((got[k] == 0).all() for k in o_proj)
        assert got["lm_head.weight"].count_nonzero() > 0


@pytest.mark.parametrize("name", list(CASES))
def test_mergekit_basic_merge_case(name: str, models: dict[str, str], tmp_path: Path) -> None:
    case = CASES[name]
    config = _fill(case.config, models)
    (tmp_path / "config.yml").write_text(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MergeWarning)
        res = CliRunner().invoke(
            cli, ["run", str(tmp_path / "config.yml"), "-o", str(tmp_path / "ours"), "-q"]
        )
    assert res.exit_code == case.exit_code, res.output
    # mergekit ignores parameters a method does not take (`weight` for slerp...); we warn.
    for w in caught:
        if issubclass(w.category, MergeWarning):
            assert str(w.message).startswith("mergekit config: "), w.message
    if case.exit_code:
        assert "epsilon" in res.output
        return
    ours = tmp_path / "ours"
    _check(case, ours)
    if case.random or not HAVE_MERGEKIT:
        return
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(config)),
        out_path=str(tmp_path / "mergekit"),
        options=MergeOptions(quiet=True),
    )
    got = _tensors(ours)
    theirs = _tensors(tmp_path / "mergekit")
    if case.vlm:
        theirs = {_old_llava_name(k): v for k, v in theirs.items()}
        dropped = sorted(set(got) - set(theirs))
        assert len(dropped) == 21 and all(k.startswith("language_model.") for k in dropped)
    assert sorted(set(got) & set(theirs)) == sorted(theirs)
    for k, ref in theirs.items():
        # mergekit writes what its method returns when `out_dtype` is unset: ramplus_tl and
        # arcee_fusion promote to float32 (a float32 factor times bf16); we write `dtype`.
        want_dtype = torch.bfloat16 if name in ("ramplus_tl", "arcee_fusion") else ref.dtype
        assert got[k].dtype == want_dtype, k
        if case.exact:
            assert torch.equal(got[k], ref.to(want_dtype)), k
            continue
        # mergekit computes in bf16 (rounding after every operation), we in float32 rounding
        # once: entries agree within four bf16 steps of the tensor's largest magnitude.
        span = float(ref.float().abs().max())
        diff = float((got[k].float() - ref.float()).abs().max())
        assert diff <= 2**-5 * span + 1e-12, (
            f"{k}: max |ours - mergekit| = {diff:.3g} of {span:.3g}"
        )
