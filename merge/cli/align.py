"""`merge align`: permute checkpoint B into checkpoint A's unit order (Git Re-Basin, activations)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from merge.cli.options import (
    data_option,
    device_option,
    force_option,
    model_option,
    output_option,
    quiet_option,
    seed_option,
    unsafe_pickle_option,
)
from merge.errors import PlanError, UsageError


def report_path(output: Path) -> Path:
    """The JSON report beside the output: `b.safetensors` -> `b.align.json`, `b/` -> `b.align.json`."""
    output = Path(output)
    stem = (
        output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    )
    return output.with_name(f"{stem}.align.json")


@click.command("align")
@click.argument("checkpoints", nargs=-1, metavar="A B")
@model_option("make_model() -> nn.Module matching both checkpoints.", required=True)
@click.option(
    "--method",
    type=click.Choice(["weight", "activation"]),
    default="weight",
    show_default=True,
    help="Weight matching (no data) or activation matching (needs --data).",
)
@data_option(
    "make_data() -> batches; the first batch is also the example input for tracing and checks."
)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Hand-written permutation spec (YAML or JSON) instead of inferring one.",
)
@click.option(
    "--show-spec",
    is_flag=True,
    help="Print the permutation groups (members, sizes) and the fixed axes with reasons.",
)
@click.option(
    "--heads",
    is_flag=True,
    help="Also permute attention heads (whole heads; RoPE- and GQA-safe).",
)
@seed_option("Seed of the sweep order and restarts.")
@click.option(
    "--restarts",
    type=int,
    default=3,
    show_default=True,
    help="Weight-matching runs; the best objective is kept.",
)
@device_option(
    "cpu",
    "Where the matching runs: cpu, cuda, cuda:N or auto (the checks stay on the CPU in float64).",
)
@output_option(
    "Aligned B: a .safetensors file or a folder; the report goes to <name>.align.json beside it."
)
@force_option("Replace an existing output and report.")
@unsafe_pickle_option("Allow PyTorch pickles with arbitrary objects (trusted files only).")
@quiet_option("Print nothing but errors.")
def align_cmd(
    checkpoints: tuple[str, ...],
    model: str,
    method: str,
    data: str | None,
    spec_path: Path | None,
    show_spec: bool,
    heads: bool,
    seed: int,
    restarts: int,
    device: str,
    output: Path | None,
    force: bool,
    unsafe_pickle: bool,
    quiet: bool,
) -> None:
    """Permute B's hidden units into A's order; B's function is unchanged (verified).

    \b
      merge align a.safetensors b.safetensors --model pkg.models:make_mlp -o b_aligned.safetensors
      merge align a/ b/ --model pkg.models:resnet20 --method activation --data pkg.data:loader -o b_aligned/
      merge align --model pkg.models:make_mlp --show-spec
    """
    from merge import entrypoints
    from merge.align import align_state_dicts, infer_spec, load_spec
    from merge.align.trace import replayable
    from merge.execute import pick_device
    from merge.io import load_state_dict, open_checkpoint
    from merge.io.writer import write_tensors

    say = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    dev = pick_device(device)
    if not show_spec or output is not None or checkpoints:
        if len(checkpoints) != 2:
            raise UsageError(f"merge align takes two checkpoints, A and B (got {len(checkpoints)})")
        if output is None:
            raise UsageError(
                "merge align needs -o/--output for the aligned checkpoint (or use --show-spec alone)"
            )
        if method == "activation" and data is None:
            raise UsageError("--method activation needs --data MODULE:FN")
        report_file = report_path(output)
        if report_file.exists() and not force:
            raise PlanError(f"the report {report_file} already exists; pass --force to replace it")
        from merge.io.output import check_output

        check_output(output, checkpoints, force=force)
    net = entrypoints.make_model(model)
    batches = replayable(entrypoints.make_data(data)) if data else None
    spec = load_spec(spec_path) if spec_path else None
    if show_spec:
        if spec is None:
            spec = infer_spec(net, data=batches, heads=heads)  # reused below: inferred once
        click.echo(spec.format())
        if output is None:
            return
    state_a = load_state_dict(checkpoints[0], unsafe_pickle=unsafe_pickle)
    state_b = load_state_dict(checkpoints[1], unsafe_pickle=unsafe_pickle)
    aligned, report = align_state_dicts(
        net,
        state_a,
        state_b,
        method=method,
        data=batches,
        seed=seed,
        spec=spec,
        restarts=restarts,
        heads=heads,
        device=dev,
        progress=say,
    )
    assert output is not None
    doc: dict[str, Any] = {
        "a": checkpoints[0],
        "b": checkpoints[1],
        "model": model,
        **report.to_dict(),
    }
    # A folder output is a loadable model folder: B's config, tokenizer and generation files
    # (the files an `output: copy_files_from` would copy) are copied beside the weights.
    extra = (
        open_checkpoint(checkpoints[1], unsafe_pickle=unsafe_pickle).support_files()
        if output.suffix != ".safetensors"
        else []
    )
    written = write_tensors(
        output,
        aligned,
        force=force,
        metadata={
            "merge.align": json.dumps(
                {"a": checkpoints[0], "b": checkpoints[1], "method": method, "seed": seed}
            )
        },
        extra_files=extra,
    )
    report_file = report_path(output)
    report_file.write_text(json.dumps(doc, indent=1, default=str))
    say(
        f"{method} matching: objective {report.objective_before:.6g} -> {report.objective_after:.6g}"
        + (f" in {report.sweeps} sweeps" if report.sweeps else "")
        + f"; {sum(g.moved for g in report.groups.values())} units moved in {len(report.groups)} groups"
    )
    say(
        f"wrote {written}"
        + (f" (with {', '.join(rel for rel, _ in extra)} from B)" if extra else "")
        + f" and {report_file}"
    )


def register(cli: click.Group) -> None:
    cli.add_command(align_cmd)
