"""Build an MoE checkpoint from a dense base and dense experts: check, gates, plan, stream out.

1. The config is validated (`merge.moe.config`), then every model's config.json and tensor
   headers are checked together: architecture, layer count, each expert's MLP shapes.
2. The output path is checked before any work (`merge.io.output.check_output`).
3. The gates are computed (`merge.moe.gates`, `merge.moe.prompts`): small, (layers, gates, hidden).
4. Every output tensor is planned from headers (name, shape, where its bytes come from), then
   written in order through a staged folder: copies stream in chunks, so memory stays a chunk
   whatever the model's size. config.json, the base's tokenizer files and the model card are
   written beside the weights, and the folder is swapped into place only when complete.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merge.errors import MergeWarning, RecipeError, UsageError
from merge.io.sources import TensorSource
from merge.moe.config import DTYPES, HIDDEN_MODES, LoadedConfig, Model, load_moe_config
from merge.moe.layout import LAYOUTS, MLP_PROJS, QKV_BIAS, MoELayout, dense_mlp, split_base
from merge.version import __version__

CHUNK = 1 << 22  # elements per read of a copied tensor (16 MB of float32)
DEGENERATE_COND = 5.0  # mergekit's threshold for warning about near-parallel router rows


@dataclass(frozen=True)
class Entry:
    """One output tensor: copied from `source_name` of `source` (noised, scaled), or `value`."""

    name: str
    shape: tuple[int, ...]
    source: TensorSource | None = None
    source_name: str = ""
    value: Tensor | None = None
    noise: float | None = None
    scale: float | None = None


def build_moe(
    config: str | Path | dict[str, Any],
    output: str | Path,
    *,
    force: bool = False,
    dtype: str | None = None,
    shard_size: str | int | None = None,
    seed: int = 0,
    quiet: bool = False,
    card: bool = True,
    allow_all_same: bool = False,
) -> Path:
    """Write the MoE a mergekit-moe config describes to the folder `output`; returns its path."""
    from merge.io.output import check_output

    started = time.monotonic()
    loaded = load_moe_config(config, allow_all_same=allow_all_same)
    layout = LAYOUTS[loaded.arch]
    if Path(output).suffix == ".safetensors":
        raise UsageError(
            "-o: an MoE checkpoint is a folder (weights, config.json, tokenizer); give a folder name"
        )
    models = open_models(loaded)
    try:
        base = models["base_model"]
        problems = check_models(loaded, layout, models)
        if problems:
            raise RecipeError(problems, loaded.source)
        inputs = _input_paths(models)
        check_output(output, inputs, force=force)
        out_dtype = output_dtype(dtype, loaded, base)
        gates = compute_gates(loaded, models, seed=seed, quiet=quiet)
        warn_degenerate(gates)
        entries = plan_tensors(loaded, layout, models, gates)
        cfg = layout.config(
            base.config,
            num_experts=len(loaded.config.experts),
            experts_per_token=loaded.config.experts_per_token,
            dtype=str(out_dtype).removeprefix("torch."),
        )
        path, nbytes, files, copied = write_moe(
            entries,
            output,
            cfg,
            loaded=loaded,
            models=models,
            out_dtype=out_dtype,
            seed=seed,
            force=force,
            shard_size=shard_size,
            quiet=quiet,
            card=card,
            inputs=inputs,
        )
    finally:
        for m in {id(m.source): m for m in models.values()}.values():
            m.source.close()
    if not quiet:
        from merge.progress import write_summary

        n = len(loaded.config.experts)
        print(
            write_summary(
                path,
                tensors=len(entries),
                nbytes=nbytes,
                files=files,
                seconds=time.monotonic() - started,
                copied=copied,
                source=base.path,
            ),
            file=sys.stderr,
        )
        if n & (n - 1):
            print(
                f"note: {n} experts is not a power of two; llama.cpp cannot load this model",
                file=sys.stderr,
            )
    return path


# ---- the models ---------------------------------------------------------------------------------


def open_models(loaded: LoadedConfig) -> dict[str, Model]:
    """Every model of the config by its key, each distinct path opened once."""
    from merge.io.detect import open_checkpoint

    opened: dict[str, Model] = {}
    by_path: dict[str, TensorSource] = {}
    try:
        for key, path in loaded.models():
            if path not in by_path:
                by_path[path] = _open(key, path, open_checkpoint)
            source = by_path[path]
            opened[key] = Model(key, path, source, _read_config(key, source, path))
    except BaseException:
        for s in by_path.values():
            s.close()
        raise
    return opened


def _open(key: str, path: str, open_checkpoint: Any) -> TensorSource:
    if "+" in path and not Path(path).exists():
        raise UsageError(
            f"{key}: `{path}` does not exist; mergekit's `model+lora` form is not read by merge "
            "moe: bake the LoRA into the model first with `merge lora bake`"
        )
    try:
        return open_checkpoint(path)  # type: ignore[no-any-return]
    except UsageError as e:
        raise UsageError(f"{key}: {e}") from None


def _read_config(key: str, source: TensorSource, path: str) -> dict[str, Any]:
    root = source.root()
    file = (root if root is not None and root.is_dir() else Path(path)) / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(
            f"{key}: {path} has no readable config.json ({type(e).__name__}); an MoE is built "
            "from Hugging Face model folders"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{key}: {file} is not a JSON object")
    return data


def _input_paths(models: dict[str, Model]) -> list[tuple[str, str | Path]]:
    out: list[tuple[str, str | Path]] = [(k, m.path) for k, m in models.items()]
    return out + [(k, f) for k, m in models.items() for f in m.source.files()]


def _shape(t: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(x) for x in t) + "]"


def check_models(
    loaded: LoadedConfig, layout: MoELayout, models: dict[str, Model]
) -> list[tuple[str, str]]:
    """Every problem of the models together, each under the config key naming the model."""
    base = models["base_model"]
    cfg = base.config
    problems: list[tuple[str, str]] = []
    mt = cfg.get("model_type")
    if mt not in layout.accepts:
        problems.append(
            (
                "base_model",
                f"{base.path} is a `{mt}` model; {layout.name} output is built from "
                f"{', '.join(layout.accepts)} models",
            )
        )
        return problems
    try:
        layers, hidden, inter = (
            int(cfg["num_hidden_layers"]),
            int(cfg["hidden_size"]),
            int(cfg["intermediate_size"]),
        )
    except (KeyError, TypeError, ValueError):
        return [
            (
                "base_model",
                f"{base.path}/config.json lacks num_hidden_layers, hidden_size or intermediate_size",
            )
        ]
    names = base.source.keys()
    if "model.embed_tokens.weight" not in base.source:
        problems.append(("base_model", f"{base.path} has no `model.embed_tokens.weight`"))
    if cfg.get("mlp_bias"):
        problems.append(
            ("base_model", f"{base.path} has MLP biases (mlp_bias), which no MoE expert holds")
        )
    biases = sorted(n for n in names if n.endswith("_proj.bias") and ".self_attn." in n)
    allowed = () if layout.model_type == "mixtral" else QKV_BIAS
    extra = [n for n in biases if n.rsplit(".", 2)[-2] not in allowed]
    if extra:
        fix = (
            "use architecture: qwen (Qwen MoE holds q/k/v biases)"
            if layout.model_type == "mixtral" and all(".o_proj." not in n for n in extra)
            else "choose a base without them"
        )
        problems.append(
            (
                "base_model",
                f"{base.path} has attention biases {layout.name} cannot hold (`{extra[0]}`"
                + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
                + f"); {fix}",
            )
        )
    want = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for key, m in models.items():
        if key == "base_model":
            continue
        owner = key.removesuffix(".source_model")
        other = m.config.get("model_type")
        if other != mt:
            problems.append(
                (
                    key,
                    f"{m.path} is a `{other}` model and the base a `{mt}` one; every expert must have the base's architecture",
                )
            )
            continue
        n_layers = m.config.get("num_hidden_layers")
        if n_layers != layers:
            problems.append(
                (
                    key,
                    f"{m.path} has {n_layers} layers and the base {layers}; every expert needs the base's layer count",
                )
            )
            continue
        for i in range(layers):
            for proj in MLP_PROJS:
                name = dense_mlp(i, proj)
                if name not in m.source:
                    problems.append(
                        (
                            key,
                            f"{m.path} has no tensor `{name}`; {owner} must be a dense model like the base",
                        )
                    )
                    break
                got = m.source.meta(name).shape
                if tuple(got) != want[proj]:
                    problems.append(
                        (
                            key,
                            f"`{name}` of {m.path} is {_shape(got)}, the base's MLP is "
                            f"{_shape(want[proj])} (hidden_size {hidden}, intermediate_size "
                            f"{inter}); every expert needs the base's MLP shapes",
                        )
                    )
                    break
            else:
                continue
            break
    return problems


def output_dtype(flag: str | None, loaded: LoadedConfig, base: Model) -> torch.dtype:
    """--dtype, else the config's `dtype`, else the base's config.json dtype, else its embedding's."""
    name = flag or loaded.config.dtype
    if name is None:
        spelled = base.config.get("dtype", base.config.get("torch_dtype"))
        name = spelled if spelled in DTYPES else None
    if name is None:
        return base.source.meta("model.embed_tokens.weight").dtype
    return getattr(torch, name)  # type: ignore[no-any-return]


# ---- gates ---------------------------------------------------------------------------------------


def compute_gates(
    loaded: LoadedConfig, models: dict[str, Model], *, seed: int, quiet: bool
) -> Tensor:
    """(layers, experts + shared experts, hidden) gate vectors, float32 (or `gate_dtype`)."""
    from merge.moe import gates as G

    c = loaded.config
    base = models["base_model"]
    layers, hidden = int(base.config["num_hidden_layers"]), int(base.config["hidden_size"])
    gated = [(f"experts[{i}]", e) for i, e in enumerate(c.experts)]
    gated += [(f"shared_experts[{i}]", e) for i, e in enumerate(c.shared_experts or [])]
    if c.gate_mode == "random":
        return G.random_gates(layers, len(gated), hidden, seed)
    if c.gate_mode == "uniform_random":
        return G.uniform_gates(layers, len(gated), hidden, seed)
    from merge.moe.prompts import LayerwiseBase, embed_rows, load_tokenizer, tokenize

    tok = load_tokenizer(base.folder, "base_model")
    batches = []  # (positive, negative or None) per gate
    for key, e in gated:
        pos = tokenize(tok, e.positive_prompts or [], f"{key}.positive_prompts")
        neg = (
            tokenize(tok, e.negative_prompts, f"{key}.negative_prompts")
            if e.negative_prompts
            else None
        )
        batches.append((pos, neg))
    flat = [b for pair in batches for b in pair if b is not None]
    if c.gate_mode == "cheap_embed":
        vectors = [
            G.cheap_embed_vector(
                embed_rows(base.source, b.input_ids, torch.float32), b.attention_mask
            )
            .unsqueeze(0)
            .repeat(layers, 1)
            for b in flat
        ]
    else:
        assert c.gate_mode in HIDDEN_MODES
        dtype = getattr(torch, c.gate_dtype)
        runner = LayerwiseBase(base.folder, base.source, dtype)
        vectors = runner.run(flat, average=c.gate_mode == "hidden_avg", quiet=quiet)
    it = iter(vectors)
    rows = []
    for _, neg in batches:
        p = next(it)
        n = next(it) if neg is not None else None
        rows.append(G.gate_direction(p, n))
    return torch.stack(rows, dim=0).permute(
        1, 0, 2
    )  # (gates, layers, hidden) -> (layers, gates, hidden)


def warn_degenerate(gates: Tensor) -> None:
    """Warn, as mergekit does, about layers whose router rows are nearly parallel."""
    from merge.moe.gates import condition_numbers

    if gates.shape[1] < 2:
        return
    bad = [i for i, c in enumerate(condition_numbers(gates)) if c > DEGENERATE_COND]
    if bad:
        where = (
            "every layer" if len(bad) == gates.shape[0] else "layers " + ", ".join(map(str, bad))
        )
        warnings.warn(
            f"the router rows of {where} are nearly parallel (condition number above "
            f"{DEGENERATE_COND:g}): the prompts of different experts look alike to the base, "
            "so some experts will rarely be chosen; give each expert more distinct prompts",
            MergeWarning,
            stacklevel=2,
        )


# ---- the output -------------------------------------------------------------------------------


def plan_tensors(
    loaded: LoadedConfig, layout: MoELayout, models: dict[str, Model], gates: Tensor
) -> list[Entry]:
    """Every output tensor in write order: embeddings, each layer (attention and norms from the
    base, router, experts), final norm and head."""
    c = loaded.config
    base = models["base_model"]
    src = base.source
    layers = int(base.config["num_hidden_layers"])
    before, kept, after, dropped = split_base(src.keys())
    if dropped:
        warnings.warn(
            f"base_model: {len(dropped)} tensor(s) have no place in a {layout.name} checkpoint and "
            f"are left out: {', '.join(dropped[:5])}" + (" ..." if len(dropped) > 5 else ""),
            MergeWarning,
            stacklevel=2,
        )

    def copy(name: str) -> Entry:
        return Entry(name, tuple(src.meta(name).shape), src, name)

    n = len(c.experts)
    experts = [(models[f"experts[{e}].source_model"], x) for e, x in enumerate(c.experts)]
    entries = [copy(name) for name in before]
    for i in range(layers):
        entries += [copy(name) for name in kept.get(i, [])]
        if layout.shared_expert:
            for proj in QKV_BIAS:
                bias = f"model.layers.{i}.self_attn.{proj}.bias"
                if bias not in src:  # Qwen MoE's attention always has them: zeros change nothing
                    rows = src.meta(f"model.layers.{i}.self_attn.{proj}.weight").shape[0]
                    entries.append(Entry(bias, (rows,), value=torch.zeros(rows)))
        entries.append(Entry(layout.router(i), tuple(gates[i, :n].shape), value=gates[i, :n]))
        if layout.shared_expert:
            row = gates[i, n:]
            entries.append(Entry(layout.shared_router(i), tuple(row.shape), value=row))
        mlp = [(e, m, x) for e, (m, x) in enumerate(experts)]
        for e, m, x in mlp:
            for proj in MLP_PROJS:
                entries.append(_expert_entry(layout.expert(i, e, proj), m, x, i, proj))
        if layout.shared_expert:
            m = models["shared_experts[0].source_model"]
            x = (c.shared_experts or [])[0]
            for proj in MLP_PROJS:
                entries.append(_expert_entry(layout.shared(i, proj), m, x, i, proj))
    return entries + [copy(name) for name in after]


def _expert_entry(name: str, model: Model, expert: Any, i: int, proj: str) -> Entry:
    dense = dense_mlp(i, proj)
    return Entry(
        name,
        tuple(model.source.meta(dense).shape),
        model.source,
        dense,
        noise=expert.noise_scale or None,
        scale=expert.residual_scale if proj == "down_proj" else None,
    )


def produce(
    entry: Entry, dtype: torch.dtype, seed: int, buffers: dict[torch.dtype, Tensor] | None = None
) -> Iterator[Tensor]:
    """The bytes of one output tensor, in `dtype`, as one or more flat chunks in order.

    Copies are read in chunks into `buffers` (one reused buffer per input dtype: no fresh memory
    to touch per chunk), so a chunk is only valid until the next one is produced.
    """
    if entry.value is not None:
        yield entry.value.reshape(-1).to(dtype)
        return
    assert entry.source is not None
    if entry.noise:
        from merge.execute import tensor_seed

        # mergekit draws from the global generator in file order; here each tensor has its own
        # stream from (seed, name), so the output does not depend on order.
        x = entry.source.read(entry.source_name).float()
        g = torch.Generator().manual_seed(tensor_seed(seed, entry.name))
        x = x + torch.randn(x.shape, generator=g) * entry.noise
        if entry.scale is not None:
            x = x * entry.scale
        yield x.reshape(-1).to(dtype)
        return
    meta = entry.source.meta(entry.source_name)
    buffers = {} if buffers is None else buffers
    if meta.dtype not in buffers:
        buffers[meta.dtype] = torch.empty(CHUNK, dtype=meta.dtype)
    buf = buffers[meta.dtype]
    for start in range(0, meta.numel, CHUNK):
        stop = min(meta.numel, start + CHUNK)
        x = entry.source.read_range(entry.source_name, start, stop, out=buf[: stop - start])
        if entry.scale is not None:
            x = x.float() * entry.scale
        yield x.to(dtype)


def write_moe(
    entries: list[Entry],
    output: str | Path,
    config_json: dict[str, Any],
    *,
    loaded: LoadedConfig,
    models: dict[str, Model],
    out_dtype: torch.dtype,
    seed: int,
    force: bool,
    shard_size: str | int | None,
    quiet: bool,
    card: bool,
    inputs: list[tuple[str, str | Path]],
) -> tuple[Path, int, int, list[str]]:
    """Stream `entries` into a staged folder with config.json, tokenizer files and card; swap it in.

    Returns (path, bytes of tensors, tensor files, support files copied).
    """
    import shutil

    from merge.dtypes import check_float16_range
    from merge.io.output import StagedOutput
    from merge.io.writer import (
        DEFAULT_SHARD_SIZE,
        OutputTensor,
        TensorFileWriter,
        check_free_space,
        parse_size,
        plan_files,
        write_json,
    )
    from merge.progress import byte_progress

    size = parse_size(shard_size) if shard_size is not None else DEFAULT_SHARD_SIZE
    tensors = [OutputTensor(e.name, e.shape, out_dtype) for e in entries]
    plans, index = plan_files(
        tensors, shard_size=size, metadata=output_metadata(loaded, models, seed)
    )
    nbytes = sum(p.data_bytes for p in plans)
    base = models["base_model"]
    support = [(rel, src) for rel, src in base.source.support_files() if rel != "config.json"]
    with StagedOutput(Path(output), is_dir=True, force=force, inputs=inputs) as staged:
        check_free_space(Path(output), nbytes)
        bar = byte_progress(nbytes, "moe", quiet=quiet)
        buffers: dict[torch.dtype, Tensor] = {}
        try:
            with TensorFileWriter(staged.path(), plans) as writer:
                for e in entries:
                    for chunk in produce(e, out_dtype, seed, buffers):
                        check_float16_range(e.name, chunk)
                        writer.write(e.name, chunk)
                        bar.update(chunk.numel() * chunk.element_size())
                writer.finish()
        finally:
            bar.close()
        if index is not None:
            write_json(staged.path("model.safetensors.index.json"), index)
        write_json(staged.path("config.json"), config_json)
        for rel, src in support:
            target = staged.path(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        if card:
            from merge.moe.card import write_moe_card

            write_moe_card(loaded, models, staged.path(), seed=seed)
        path = staged.commit()
    return path, nbytes, len(plans), [rel for rel, _ in support]


def output_metadata(loaded: LoadedConfig, models: dict[str, Model], seed: int) -> dict[str, str]:
    """The config and each input's identity (header hash and sizes), never paths as spelled."""
    config = loaded.config.model_dump(mode="json", exclude_none=True)
    config["base_model"] = "base_model"
    for group in ("experts", "shared_experts"):
        for i, e in enumerate(config.get(group, [])):
            e["source_model"] = f"{group}[{i}].source_model"
    identities = {}
    for key, m in models.items():
        fp = dict(m.source.fingerprint())
        fp.pop("path", None)
        identities[key] = fp
    meta = {
        "format": "pt",
        "merge_version": __version__,
        "merge_moe_config": json.dumps(config, sort_keys=True, separators=(",", ":")),
        "merge_inputs": json.dumps(identities, sort_keys=True, separators=(",", ":")),
    }
    if loaded.config.gate_mode in ("random", "uniform_random") or any(
        e.noise_scale for e in [*loaded.config.experts, *(loaded.config.shared_experts or [])]
    ):
        meta["merge_seed"] = str(seed)
    return meta
