"""`merge moe`: Mixtral and Qwen2-MoE checkpoints from tiny dense models built here.

Each output loads with transformers and generates; expert weights equal the dense models' MLP
weights name by name; routers equal values computed in the tests from the base (its embedding
rows, its full forward pass) and, where mergekit 0.1.5 is installed (the `compare` extra), equal
mergekit-moe's own output on the same config bit for bit.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from merge.cli import cli
from merge.errors import MergeWarning, RecipeError
from merge.moe import build_moe, load_moe_config

try:
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build as mergekit_build

    HAVE_MERGEKIT = True
except ImportError:  # pragma: no cover - the compare extra is not installed
    HAVE_MERGEKIT = False

needs_mergekit = pytest.mark.skipif(
    not HAVE_MERGEKIT, reason="mergekit (the compare extra) is not installed"
)

# "wN" is token N + 3; the single characters after them let transformers' Qwen2Tokenizer, which
# AutoTokenizer picks for a qwen2 model whatever tokenizer it ships, read the prompts too.
WORDS = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(61)] + ["Ġ", "w", *"0123456789"]
LAYERS, HIDDEN, INTER = 3, 32, 48
PROJS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _ids(prompt: str) -> list[int]:
    """Hand tokenisation: BOS, then each word's index in WORDS (what mergekit's prefix gives)."""
    return [0] + [WORDS.index(w) for w in prompt.split()]


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _make(kind: str, path: Path, seed: int, **overrides: Any) -> Path:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    dims: dict[str, Any] = dict(
        vocab_size=len(WORDS),
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=LAYERS,
        bos_token_id=0,
        eos_token_id=1,
    )
    dims.update(overrides)
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**dims))
    with torch.no_grad():  # random init gives tiny norms and biases: make every tensor count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-models")
    specs: dict[str, tuple[str, int, dict[str, Any]]] = {
        "base": ("llama", 0, {}),
        "e0": ("llama", 1, {}),
        "e1": ("llama", 2, {}),
        "e2": ("llama", 3, {}),
        "wide": ("llama", 4, {"intermediate_size": 64}),
        "shallow": ("llama", 5, {"num_hidden_layers": 2}),
        "mistral": ("mistral", 6, {"sliding_window": 16}),
        "mistral_e": ("mistral", 7, {"sliding_window": 16}),
        "qwen": ("qwen2", 8, {}),
        "qwen_e": ("qwen2", 9, {}),
        "tied": ("llama", 10, {"tie_word_embeddings": True}),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {n: _make(kind, root / n, seed, **o) for n, (kind, seed, o) in specs.items()}


PROMPTS = [
    {"positive_prompts": ["w3 w4 w5", "w6"], "negative_prompts": ["w9 w10"]},
    {"positive_prompts": ["w20 w21"]},
    {"positive_prompts": ["w30 w31 w32 w33", "w40 w41"]},
]


def moe_config(
    world: dict[str, Path],
    gate_mode: str,
    experts: tuple[str, ...] = ("e0", "e1", "e2"),
    base: str = "base",
    **extra: Any,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base_model": str(world[base]),
        "gate_mode": gate_mode,
        "dtype": "float32",
        "experts": [
            {"source_model": str(world[e]), **PROMPTS[i % len(PROMPTS)]}
            for i, e in enumerate(experts)
        ],
    }
    cfg.update(extra)
    return cfg


def write_config(folder: Path, cfg: dict[str, Any], name: str = "moe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def text(r: Result) -> str:
    return r.output + (r.stderr if r.stderr_bytes is not None else "")


def run_moe(
    folder: Path, cfg: dict[str, Any], *args: str, out: str = "out"
) -> dict[str, torch.Tensor]:
    r = invoke("moe", str(write_config(folder, cfg)), "-o", str(folder / out), "-q", *args)
    assert r.exit_code == 0, text(r)
    return read_folder(folder / out)


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def dense(path: Path) -> dict[str, torch.Tensor]:
    return read_folder(path)


def run_mergekit(cfg: dict[str, Any], out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    options = MergeOptions(random_seed=seed, device="cpu", quiet=True)
    options.apply_global_options()
    mergekit_build(MoEMergeConfig.model_validate(cfg), str(out), options, device="cpu")
    return read_folder(out)


def as_mergekit_mixtral(ours: dict[str, torch.Tensor], experts: int) -> dict[str, torch.Tensor]:
    """Our Mixtral tensors in mergekit 0.1.5's layout (transformers 5's fused experts)."""
    out = {k: v for k, v in ours.items() if ".block_sparse_moe." not in k}
    for i in range(LAYERS):
        p = f"model.layers.{i}.block_sparse_moe"
        out[f"model.layers.{i}.mlp.gate.weight"] = ours[f"{p}.gate.weight"]
        w = {
            n: [ours[f"{p}.experts.{e}.{n}.weight"] for e in range(experts)]
            for n in ("w1", "w2", "w3")
        }
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([a, b]) for a, b in zip(w["w1"], w["w3"])]
        )
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(w["w2"])
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


# ---- the output loads, runs, and holds the dense weights ----------------------------------------


def test_mixtral_output_loads_and_generates(world: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run_moe(tmp_path, moe_config(world, "cheap_embed"))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    ids = torch.tensor([_ids("w3 w4 w5")])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    assert out.shape == (1, ids.shape[1] + 4)
    # the tokenizer files are the base's, and load
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("w3 w4", add_special_tokens=False)["input_ids"] == [6, 7]


def test_experts_are_the_dense_mlps_name_by_name(world: dict[str, Path], tmp_path: Path) -> None:
    out = run_moe(tmp_path, moe_config(world, "random"))
    base = dense(world["base"])
    for e, name in enumerate(("e0", "e1", "e2")):
        d = dense(world[name])
        for i in range(LAYERS):
            for proj in PROJS:
                got = out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{MIXTRAL_W[proj]}.weight"]
                assert torch.equal(got, d[f"model.layers.{i}.mlp.{proj}.weight"])
    kept = [k for k in base if ".mlp." not in k]
    assert {k for k in out if ".block_sparse_moe." not in k} == set(kept)
    for k in kept:
        assert torch.equal(out[k], base[k]), k
    assert len(out) == len(kept) + LAYERS * (1 + 3 * 3)


def test_cheap_embed_routers_are_the_prompts_summed_embeddings(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = run_moe(tmp_path, moe_config(world, "cheap_embed"))
    embed = dense(world["base"])["model.embed_tokens.weight"]

    def direction(prompts: list[str]) -> torch.Tensor:
        v = sum(embed[t] for p in prompts for t in _ids(p))
        assert isinstance(v, torch.Tensor)
        return v / v.norm()

    rows = []
    for spec in PROMPTS:
        v = direction(spec["positive_prompts"])
        if "negative_prompts" in spec:
            v = v - direction(spec["negative_prompts"])
        rows.append(v / v.norm())
    expected = torch.stack(rows)
    for i in range(LAYERS):  # the same rows in every layer
        assert torch.allclose(
            out[f"model.layers.{i}.block_sparse_moe.gate.weight"], expected, atol=1e-6
        )


def _hidden_reference(path: Path, specs: list[dict[str, Any]]) -> torch.Tensor:
    """(layers, gates, hidden) from the full model's forward pass, one prompt at a time (no
    padding): the state entering each layer at the last token, averaged over the prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)

    def mean_state(prompts: list[str]) -> torch.Tensor:
        states = []
        for p in prompts:
            ids = tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            states.append(torch.stack([h[0, -1] for h in hs[:-1]]))  # (layers, hidden)
        return torch.stack(states).mean(dim=0)

    rows = []
    for spec in specs:
        v = mean_state(spec["positive_prompts"])
        if spec.get("negative_prompts"):
            v = v - mean_state(spec["negative_prompts"])
        rows.append(v / v.norm(dim=-1, keepdim=True))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize(
    ("base", "experts", "extra"),
    [
        ("base", ("e0", "e1", "e2"), {}),
        ("mistral", ("mistral_e", "mistral"), {}),
        (
            "qwen",
            ("qwen_e", "qwen"),
            {"shared_experts": [{"source_model": "qwen_e", "positive_prompts": ["w50 w51"]}]},
        ),
    ],
    ids=["llama-mixtral", "mistral-mixtral", "qwen2-qwen_moe"],
)
def test_hidden_routers_are_the_base_hidden_states(
    world: dict[str, Path],
    tmp_path: Path,
    base: str,
    experts: tuple[str, ...],
    extra: dict[str, Any],
) -> None:
    cfg = moe_config(world, "hidden", experts, base=base)
    specs = [dict(e) for e in cfg["experts"]]
    if extra:
        shared = dict(extra["shared_experts"][0], source_model=str(world["qwen_e"]))
        cfg["shared_experts"] = [shared]
        specs.append(shared)
    out = run_moe(tmp_path, cfg)
    expected = _hidden_reference(world[base], specs)
    n = len(experts)
    block = "block_sparse_moe" if not extra else "mlp"
    for i in range(LAYERS):
        got = out[f"model.layers.{i}.{block}.gate.weight"]
        assert torch.allclose(got, expected[i, :n], atol=2e-5), (
            i,
            (got - expected[i, :n]).abs().max(),
        )
        if extra:
            shared_row = out[f"model.layers.{i}.mlp.shared_expert_gate.weight"]
            assert torch.allclose(shared_row, expected[i, n:], atol=2e-5)


def test_random_gates_are_seeded_and_deterministic(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = moe_config(world, "random")
    a = run_moe(tmp_path, cfg, "--random-seed", "5", out="a")
    run_moe(tmp_path, cfg, "--random-seed", "5", out="b")
    c = run_moe(tmp_path, cfg, "--random-seed", "6", out="c")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()
    torch.manual_seed(5)  # mergekit's `--random-seed 5`, then one draw of (layers, experts, hidden)
    expected = torch.randn((LAYERS, 3, HIDDEN))
    for i in range(LAYERS):
        router = f"model.layers.{i}.block_sparse_moe.gate.weight"
        assert torch.equal(a[router], expected[i])
        assert not torch.equal(a[router], c[router])


def test_uniform_random_gates(world: dict[str, Path], tmp_path: Path) -> None:
    out = run_moe(tmp_path, moe_config(world, "uniform_random"), "--random-seed", "3")
    bound = 1 / math.sqrt(HIDDEN)
    torch.manual_seed(3)
    expected = torch.rand((LAYERS, 3, HIDDEN)) * 2 * bound - bound
    for i in range(LAYERS):
        assert torch.equal(out[f"model.layers.{i}.block_sparse_moe.gate.weight"], expected[i])


def test_qwen_moe_output_with_a_shared_expert(world: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = moe_config(
        world,
        "cheap_embed",
        ("e0", "e1"),
        shared_experts=[{"source_model": str(world["e2"]), "positive_prompts": ["w50"]}],
    )
    out = run_moe(tmp_path, cfg)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([_ids("w3 w4")])
    assert model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
    ).shape == (1, 6)
    shared, base = dense(world["e2"]), dense(world["base"])
    embed = base["model.embed_tokens.weight"]
    row = embed[0] + embed[_ids("w50")[1]]
    for i in range(LAYERS):
        for proj in PROJS:
            dense_name = f"model.layers.{i}.mlp.{proj}.weight"
            assert torch.equal(
                out[f"model.layers.{i}.mlp.shared_expert.{proj}.weight"], shared[dense_name]
            )
            for e, name in enumerate(("e0", "e1")):
                assert torch.equal(
                    out[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"],
                    dense(world[name])[dense_name],
                )
        gate = out[f"model.layers.{i}.mlp.shared_expert_gate.weight"]
        assert gate.shape == (1, HIDDEN) and torch.allclose(gate[0], row / row.norm(), atol=1e-6)
        for proj in ("q_proj", "k_proj", "v_proj"):  # Llama has none; Qwen MoE's are zeros
            bias = out[f"model.layers.{i}.self_attn.{proj}.bias"]
            assert (
                not bias.any()
                and bias.shape == base[f"model.layers.{i}.self_attn.{proj}.weight"].shape[:1]
            )


def test_qwen2_base_keeps_its_attention_biases(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = moe_config(
        world,
        "random",
        ("qwen_e", "qwen"),
        base="qwen",
        shared_experts=[{"source_model": str(world["qwen_e"])}],
    )
    out = run_moe(tmp_path, cfg)
    base = dense(world["qwen"])
    for k in (k for k in base if k.endswith("_proj.bias")):
        assert torch.equal(out[k], base[k]) and base[k].any()
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_a_tied_base_gives_a_tied_moe(world: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = run_moe(tmp_path, moe_config(world, "random", base="tied"))
    assert "lm_head.weight" not in out
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, dense(world["tied"])["model.embed_tokens.weight"])


def test_noise_and_residual_scale(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = moe_config(world, "random")
    cfg["experts"][0]["residual_scale"] = 0.5
    cfg["experts"][1]["noise_scale"] = 0.01
    a = run_moe(tmp_path, cfg, out="a")
    b = run_moe(tmp_path, cfg, out="b")
    e0, e1 = dense(world["e0"]), dense(world["e1"])
    for i in range(LAYERS):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        assert torch.equal(
            a[f"{p}.0.w2.weight"], 0.5 * e0[f"model.layers.{i}.mlp.down_proj.weight"]
        )
        assert torch.equal(a[f"{p}.0.w1.weight"], e0[f"model.layers.{i}.mlp.gate_proj.weight"])
        noise = a[f"{p}.1.w1.weight"] - e1[f"model.layers.{i}.mlp.gate_proj.weight"]
        assert 0.005 < float(noise.std()) < 0.015  # N(0, 0.01²) over 1536 entries
        assert torch.equal(a[f"{p}.1.w1.weight"], b[f"{p}.1.w1.weight"])  # seeded


def test_dtype_config_json_and_sharding(world: dict[str, Path], tmp_path: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM

    cfg = moe_config(world, "random", dtype="bfloat16")
    path = build_moe(cfg, tmp_path / "out", shard_size=60_000, quiet=True)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    out = read_folder(path)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "mixtral"
    assert config["sliding_window"] is None and config["num_local_experts"] == 3
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16


def test_card_and_config_file_rebuild_the_same_bytes(
    world: dict[str, Path], tmp_path: Path
) -> None:
    cfg = moe_config(world, "cheap_embed")
    run_moe(tmp_path, cfg)
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["tags"] == ["merge", "mergewright", "moe"]
    assert front["base_model"] == [str(world[n].resolve()) for n in ("base", "e0", "e1", "e2")]
    assert "MixtralForCausalLM" in card and "w3 w4 w5; w6 (not: w9 w10)" in card
    r = invoke("moe", str(out / "merge-moe.yaml"), "-o", str(tmp_path / "again"), "-q")
    assert r.exit_code == 0, text(r)
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "again/model.safetensors"
    ).read_bytes()
    r = invoke(
        "moe", str(write_config(tmp_path, cfg)), "-o", str(tmp_path / "bare"), "-q", "--no-card"
    )
    assert r.exit_code == 0 and not (tmp_path / "bare/README.md").exists()


def test_progress_and_summary_unless_quiet(world: dict[str, Path], tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, moe_config(world, "hidden"))
    r = invoke("moe", str(cfg_path), str(tmp_path / "out"))  # the output as mergekit-moe takes it
    assert r.exit_code == 0, text(r)
    assert "gate hidden states: 100% (2 of 2 layers)" in r.stderr
    assert re.search(
        r"wrote .*out: \d+ tensors, .* in 1 file, .*copied from .*tokenizer.json", r.stderr
    )
    assert "note: 3 experts is not a power of two" in r.stderr
    r = invoke("moe", str(cfg_path), "-o", str(tmp_path / "quiet"), "-q")
    assert r.exit_code == 0 and r.stderr == "" and r.stdout == ""


def test_hidden_states_read_each_layer_once_and_nothing_else(world: dict[str, Path]) -> None:
    """Layer by layer: every weight of layers 0..L-2 read once, the last layer, the head and
    the MLP-free rest never, and of the embedding only the prompts' rows."""
    from merge.io import open_checkpoint
    from merge.moe.prompts import LayerwiseBase, load_tokenizer, tokenize

    src = open_checkpoint(world["base"])
    reads: list[tuple[str, int]] = []
    real = src.read_range

    def spy(name: str, start: int, stop: int, out: Any = None) -> Any:
        reads.append((name, stop - start))
        return real(name, start, stop, out)

    src.read_range = spy  # type: ignore[method-assign]
    tok = load_tokenizer(world["base"], "base_model")
    batch = tokenize(tok, ["w3 w4 w5", "w6"], "p")
    LayerwiseBase(world["base"], src, torch.float32).run([batch], average=False, quiet=True)
    names = [n for n, _ in reads]
    embed = [(n, k) for n, k in reads if n == "model.embed_tokens.weight"]
    assert len(embed) == len({0, 6, 7, 8, 9}) and all(k == HIDDEN for _, k in embed)
    layer_reads = [n for n in names if n.startswith("model.layers.")]
    assert len(layer_reads) == len(set(layer_reads))
    assert {n.split(".")[2] for n in layer_reads} == {str(i) for i in range(LAYERS - 1)}
    assert "lm_head.weight" not in names and "model.norm.weight" not in names


# ---- mergekit-moe 0.1.5 on the same config --------------------------------------------------------


@needs_mergekit
@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("cheap_embed", {}),
        ("hidden", {"gate_dtype": "bfloat16"}),
        ("hidden_avg", {"gate_dtype": "bfloat16"}),
        ("random", {}),
        ("uniform_random", {}),
    ],
)
def test_mixtral_equals_mergekit(
    world: dict[str, Path], tmp_path: Path, mode: str, extra: dict[str, Any]
) -> None:
    cfg = moe_config(world, mode, **extra)
    ours = run_moe(tmp_path, cfg, "--random-seed", "11")
    theirs = run_mergekit(
        {k: v for k, v in cfg.items() if k != "gate_dtype"}, tmp_path / "mk", seed=11
    )
    assert_same_tensors(as_mergekit_mixtral(ours, 3), theirs)


@needs_mergekit
def test_hidden_in_float32_is_mergekit_within_bfloat16_rounding(
    world: dict[str, Path], tmp_path: Path
) -> None:
    cfg = moe_config(world, "hidden")
    ours = as_mergekit_mixtral(run_moe(tmp_path, cfg), 3)
    theirs = run_mergekit(cfg, tmp_path / "mk")
    for i in range(LAYERS):
        router = f"model.layers.{i}.mlp.gate.weight"
        diff = (ours[router] - theirs[router]).abs().max()
        assert (
            0 < diff < 2e-2
        )  # unit rows: bf16 keeps 8 bits, and the forward pass rounds at each op


@needs_mergekit
def test_qwen_moe_equals_mergekit(world: dict[str, Path], tmp_path: Path) -> None:
    # mergekit 0.1.5 only finds a shared expert's weights when it is also the base or an expert
    cfg = moe_config(
        world,
        "cheap_embed",
        ("e0", "e1"),
        shared_experts=[{"source_model": str(world["base"]), "positive_prompts": ["w50"]}],
    )
    assert_same_tensors(run_moe(tmp_path, cfg), run_mergekit(cfg, tmp_path / "mk"))


# ---- bad configs: exit 2, naming the key -----------------------------------------------------------


def _drop_base(cfg: dict[str, Any]) -> None:
    del cfg["base_model"]


def _no_prompts(cfg: dict[str, Any]) -> None:
    del cfg["experts"][1]["positive_prompts"]


def _wide_expert(cfg: dict[str, Any]) -> None:
    cfg["experts"][1]["source_model"] = cfg["experts"][1]["source_model"].replace("e1", "wide")


def _shallow_expert(cfg: dict[str, Any]) -> None:
    cfg["experts"][2]["source_model"] = cfg["experts"][2]["source_model"].replace("e2", "shallow")


def _missing_expert(cfg: dict[str, Any]) -> None:
    cfg["experts"][0]["source_model"] = "/nonexistent/model"


BAD = {
    "missing base_model": (
        _drop_base,
        r"base_model: required key is missing; give the dense model",
    ),
    "unknown gate_mode": (
        lambda c: c.update(gate_mode="cheap_embeds"),
        r"gate_mode: unknown gate mode `cheap_embeds` \(did you mean `cheap_embed`\?\); choose one of hidden, cheap_embed",
    ),
    "prompts missing for hidden": (
        _no_prompts,
        r"experts\[1\]\.positive_prompts: gate_mode hidden builds each router row from its expert's prompts",
    ),
    "mismatched expert shapes": (
        _wide_expert,
        r"experts\[1\]\.source_model: `model\.layers\.0\.mlp\.gate_proj\.weight` of .*wide is \[64, 32\], "
        r"the base's MLP is \[48, 32\] \(hidden_size 32, intermediate_size 48\)",
    ),
    "layer count": (
        _shallow_expert,
        r"experts\[2\]\.source_model: .*shallow has 2 layers and the base 3",
    ),
    "missing expert": (
        _missing_expert,
        r"experts\[0\]\.source_model: input /nonexistent/model does not exist",
    ),
    "typo in a key": (
        lambda c: c.update(experts_per_tokn=2),
        r"experts_per_tokn: unknown key \(did you mean `experts_per_token`\?\)",
    ),
    "too many experts per token": (
        lambda c: c.update(experts_per_token=4),
        r"experts_per_token: 4 experts per token but only 3 experts",
    ),
    "unbuilt architecture": (
        lambda c: c.update(architecture="deepseek"),
        r"architecture: `deepseek` selects DeepSeek MoE, which merge moe does not build",
    ),
    "shared expert on mixtral": (
        lambda c: c.update(
            architecture="mixtral", shared_experts=[{"source_model": c["base_model"]}]
        ),
        r"shared_experts: Mixtral has no shared expert",
    ),
    "same prompts everywhere": (
        lambda c: [e.update(positive_prompts=["w1"], negative_prompts=[]) for e in c["experts"]],
        r"experts: every expert has the same positive and negative prompts",
    ),
    "bad dtype": (
        lambda c: c.update(dtype="fp8"),
        r"dtype: unknown dtype `fp8`; choose one of float32",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_exit_2_naming_the_key(
    world: dict[str, Path], tmp_path: Path, case: str
) -> None:
    edit, pattern = BAD[case]
    cfg = moe_config(world, "hidden")
    edit(cfg)
    r = invoke("moe", str(write_config(tmp_path, cfg)), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2, text(r)
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # a message, no traceback
    assert re.search(pattern, text(r)), text(r)
    assert not (tmp_path / "out").exists()


def test_every_config_problem_is_reported_at_once(world: dict[str, Path]) -> None:
    cfg = moe_config(world, "hidden", experts_per_token=0)
    del cfg["experts"][0]["positive_prompts"]
    cfg["experts"][2]["noise_scale"] = -1.0
    with pytest.raises(RecipeError) as e:
        load_moe_config(cfg)
    keys = [k for k, _ in e.value.problems]
    assert keys == ["experts_per_token", "experts[2].noise_scale", "experts[0].positive_prompts"]


def test_all_same_experts_need_the_flag(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = moe_config(world, "cheap_embed", ("e0", "e0"))
    path = write_config(tmp_path, cfg)
    r = invoke("moe", str(path), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and "--i-understand-this-is-not-useful-without-training" in text(r)
    r = invoke(
        "moe",
        str(path),
        "-o",
        str(tmp_path / "out"),
        "-q",
        "--i-understand-this-is-not-useful-without-training",
    )
    assert r.exit_code == 0, text(r)


def test_qwen2_base_cannot_make_mixtral(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = moe_config(world, "random", ("qwen_e", "qwen"), base="qwen")
    r = invoke("moe", str(write_config(tmp_path, cfg)), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    assert "base_model: " in text(
        r
    ) and "is a `qwen2` model; Mixtral output is built from llama, mistral models" in text(r)


def test_an_input_is_never_the_output(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = moe_config(world, "random")
    r = invoke("moe", str(write_config(tmp_path, cfg)), "-o", str(world["e1"]), "--force")
    assert r.exit_code == 1
    assert "refusing to write the output to" in text(
        r
    ) and "input `experts[1].source_model`" in text(r)


def test_prompts_longer_than_the_sliding_window_are_refused(
    world: dict[str, Path], tmp_path: Path
) -> None:
    cfg = moe_config(world, "hidden", ("mistral_e", "mistral"), base="mistral")
    cfg["experts"][1]["positive_prompts"] = [" ".join(f"w{i}" for i in range(20))]
    r = invoke("moe", str(write_config(tmp_path, cfg)), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2, text(r)
    assert "a prompt list is 21 tokens long (padded), past the base's sliding window of 16" in text(
        r
    )


def test_nearly_parallel_routers_warn(world: dict[str, Path], tmp_path: Path) -> None:
    shared = " ".join(f"w{i}" for i in range(30))
    cfg = moe_config(world, "cheap_embed", ("e0", "e1"))
    cfg["experts"][0] = {"source_model": str(world["e0"]), "positive_prompts": [shared + " w40"]}
    cfg["experts"][1] = {"source_model": str(world["e1"]), "positive_prompts": [shared + " w41"]}
    with pytest.warns(MergeWarning, match=r"the router rows of every layer are nearly parallel"):
        build_moe(cfg, tmp_path / "out", quiet=True)


def test_a_merge_config_is_pointed_to_merge_run(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": "a"}]})
    r = invoke("moe", str(path), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2 and "run it with `merge run`" in text(r)


def test_merge_run_points_a_moe_config_to_merge_moe(world: dict[str, Path], tmp_path: Path) -> None:
    r = invoke(
        "run", str(write_config(tmp_path, moe_config(world, "random"))), "-o", str(tmp_path / "out")
    )
    assert r.exit_code == 2
    assert (
        "this is a mergekit-moe config (`base_model:` and `experts:`); build it with `merge moe"
        in text(r)
    )


def test_model_paths_are_relative_to_the_config(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = moe_config(world, "random")
    cfg["base_model"] = "base"
    for e, name in zip(cfg["experts"], ("e0", "e1", "e2")):
        e["source_model"] = name
    folder = world["base"].parent  # the models' folder; the tests run elsewhere
    path = write_config(tmp_path, cfg)
    path = path.rename(folder / f"relative-{tmp_path.name}.yaml")
    try:
        r = invoke("moe", str(path), "-o", str(tmp_path / "out"), "-q")
    finally:
        path.unlink()
    assert r.exit_code == 0, text(r)
    assert torch.equal(
        read_folder(tmp_path / "out")["model.layers.0.block_sparse_moe.experts.1.w3.weight"],
        dense(world["e1"])["model.layers.0.mlp.up_proj.weight"],
    )
