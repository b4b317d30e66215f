"""The two MoE checkpoints merge moe writes: tensor names and config.json, from the dense base's.

Both use the names of the released checkpoints (Mixtral-8x7B, Qwen1.5-MoE-A2.7B), which every
transformers version since 4.36 / 4.40 loads, as do vLLM and llama.cpp's converter:

    Mixtral    model.layers.{i}.block_sparse_moe.gate.weight               (experts, hidden)
               model.layers.{i}.block_sparse_moe.experts.{e}.w1|w2|w3.weight  gate|down|up_proj
    Qwen MoE   model.layers.{i}.mlp.gate.weight                            (experts, hidden)
               model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight
               model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight
               model.layers.{i}.mlp.shared_expert_gate.weight              (1, hidden)

(mergekit 0.1.5 writes Mixtral's experts fused, `experts.gate_up_proj`, as transformers 5 holds
them in memory; transformers 5 converts the per-expert names on load.) Everything outside the
MLPs (embeddings, attention, norms, head) comes from the base unchanged; Qwen MoE's attention
always has q/k/v biases, so a base without them gets zeros, as mergekit gives it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

TOP_BEFORE = ("model.embed_tokens.weight",)
TOP_AFTER = ("model.norm.weight", "lm_head.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# What a decoder layer keeps from the base; its MLP is replaced by the experts.
_LAYER_KEPT = re.compile(
    r"^(self_attn\.[qkvo]_proj\.(weight|bias)|input_layernorm\.weight|post_attention_layernorm\.weight)$"
)
QKV_BIAS = ("q_proj", "k_proj", "v_proj")

# config.json keys of the dense base that mean nothing (or something wrong) in the MoE's.
_DROPPED = (
    "architectures",
    "model_type",
    "attention_bias",
    "mlp_bias",
    "pretraining_tp",
    "layer_types",
    "use_sliding_window",
    "max_window_layers",
    "transformers_version",
    "_name_or_path",
    "auto_map",
)


@dataclass(frozen=True)
class MoELayout:
    name: str  # mergekit's name for it
    model_type: str
    class_name: str
    accepts: tuple[str, ...]  # base model types it is built from (mergekit's)
    shared_expert: bool

    def router(self, i: int) -> str:
        block = "block_sparse_moe" if self.model_type == "mixtral" else "mlp"
        return f"model.layers.{i}.{block}.gate.weight"

    def expert(self, i: int, e: int, proj: str) -> str:
        if self.model_type == "mixtral":
            return f"model.layers.{i}.block_sparse_moe.experts.{e}.{_MIXTRAL_W[proj]}.weight"
        return f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"

    def shared_router(self, i: int) -> str:
        return f"model.layers.{i}.mlp.shared_expert_gate.weight"

    def shared(self, i: int, proj: str) -> str:
        return f"model.layers.{i}.mlp.shared_expert.{proj}.weight"

    def config(
        self,
        base: Mapping[str, Any],
        *,
        num_experts: int,
        experts_per_token: int,
        dtype: str,
    ) -> dict[str, Any]:
        """config.json of the MoE: the base's, with the MoE keys (mergekit's values) added."""
        out = {k: v for k, v in base.items() if k not in _DROPPED}
        out = {"architectures": [self.class_name], "model_type": self.model_type, **out}
        out["sliding_window"] = None  # mergekit turns the window off in both outputs
        out["num_experts_per_tok"] = experts_per_token
        out["output_router_logits"] = False
        out["router_aux_loss_coef"] = 0.001
        if self.model_type == "mixtral":
            out["num_local_experts"] = num_experts
            out["router_jitter_noise"] = 0.0
        else:
            inter = base["intermediate_size"]
            out |= {
                "num_experts": num_experts,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "norm_topk_prob": True,
                "moe_intermediate_size": inter,
                "shared_expert_intermediate_size": inter,
                "use_sliding_window": False,
                "qkv_bias": True,
            }
        # transformers 5 writes `dtype`, earlier ones `torch_dtype`: keep the base's spelling.
        key = "dtype" if "dtype" in base else "torch_dtype"
        out.pop("dtype", None)
        out.pop("torch_dtype", None)
        out[key] = dtype
        return out


MIXTRAL = MoELayout("Mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), False)
QWEN_MOE = MoELayout(
    "Qwen MoE", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), True
)
LAYOUTS = {"mixtral": MIXTRAL, "qwen2_moe": QWEN_MOE}


def dense_mlp(i: int, proj: str) -> str:
    """A dense Llama/Mistral/Qwen2 model's MLP weight of layer i."""
    return f"model.layers.{i}.mlp.{proj}.weight"


def split_base(names: list[str]) -> tuple[list[str], dict[int, list[str]], list[str], list[str]]:
    """Base tensors as (before the layers, per-layer kept ones, after the layers, dropped).

    The MLP of each layer is dropped (the experts replace it), as is anything the MoE model
    has no place for (a rotary `inv_freq` buffer saved by old checkpoints, say).
    """
    before = [n for n in TOP_BEFORE if n in names]
    after = [n for n in TOP_AFTER if n in names]
    layers: dict[int, list[str]] = {}
    dropped = []
    for n in names:
        if n in before or n in after:
            continue
        m = _LAYER.match(n)
        if m and _LAYER_KEPT.match(m.group(2)):
            layers.setdefault(int(m.group(1)), []).append(n)
        elif not (m and m.group(2).startswith("mlp.")):
            dropped.append(n)
    return before, layers, after, dropped
