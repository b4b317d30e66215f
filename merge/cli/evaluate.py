"""Evaluation commands: `merge path`, `sweep`, `plane`, `negate`, `greedy-soup`, `probe linearity|disentanglement`.

Each writes `<verb>.json` (schema in docs/evaluate.md), `<verb>.csv` (one row per point) and
`<verb>.png`/`.svg` into `-o`, and prints a summary table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from merge.cli.options import (
    Decorator,
    compose,
    data_option,
    device_option,
    grid_option,
    metric_option,
    model_option,
    no_plot_option,
    output_option,
    quiet_option,
    range_option,
    save_option,
    seed_option,
)
from merge.errors import ExecutionError, UsageError

# What to evaluate with: a dataset for the built-in evaluator, the user's function, or a text.
data_options = compose(
    data_option(
        "make_data() -> iterable of (inputs, targets) or dict batches; scored by the built-in evaluator."
    ),
    click.option(
        "--eval",
        "eval_fn",
        metavar="MODULE:FN",
        help="evaluate(model) -> dict with at least `loss` (replaces the built-in evaluator).",
    ),
    click.option(
        "--lm-text",
        type=click.Path(dir_okay=False),
        help="Causal-LM perplexity on this local text file.",
    ),
    click.option(
        "--tokenizer",
        type=click.Path(file_okay=False),
        help="Local tokenizer folder for --lm-text (default: the first checkpoint folder that has one).",
    ),
    click.option(
        "--seq-len",
        type=int,
        default=128,
        show_default=True,
        help="Tokens per block for --lm-text.",
    ),
)

# How the points run (`merge.evaluate.executors.RunOptions`) and what is written.
run_options = compose(
    model_option(
        "make_model() -> nn.Module whose state_dict matches the checkpoints (optional for Hugging Face LM folders)."
    ),
    device_option("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)."),
    click.option(
        "--device-map",
        metavar="auto",
        help="For a model too big for one GPU: build it on the meta device and spread it over the GPUs with accelerate.",
    ),
    click.option(
        "--cache",
        type=click.Choice(["auto", "device", "cpu", "stream"]),
        default="auto",
        show_default=True,
        help="Where the checkpoints' tensors live between points: beside the model, in CPU memory, or read from the files at every point (memory-mapped; for models too big to hold twice).",
    ),
    click.option(
        "--executor",
        type=click.Choice(["sequential", "pool", "ray"]),
        default="sequential",
        show_default=True,
        help="Run points in this process, on a local process pool, or on Ray.",
    ),
    click.option(
        "--workers",
        type=int,
        default=None,
        help="Workers for --executor pool/ray (default: the CPU count).",
    ),
    output_option(
        "Folder for the JSON, CSV and plots (default: ./merge-<command>).", file_okay=False
    ),
    click.option(
        "--higher-is-better",
        "higher_is_better",
        multiple=True,
        metavar="METRIC",
        help="A metric whose larger values are better (repeatable); overrides the evaluator's declaration. Needed for metrics the evaluator does not declare and merge does not know.",
    ),
    click.option(
        "--lower-is-better",
        "lower_is_better",
        multiple=True,
        metavar="METRIC",
        help="A metric whose smaller values are better (repeatable).",
    ),
    no_plot_option("Skip the PNG/SVG plots."),
    quiet_option("No per-point progress."),
)

# --model, --data, --eval, --lm-text and friends, --device, --executor, --workers, -o, --no-plot, -q.
eval_options = compose(run_options, data_options)

# The probes run one model on one device, in this process.
probe_output_options = compose(
    device_option("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)."),
    output_option(
        "Folder for the JSON, CSV and plots (default: ./merge-<command>).", file_okay=False
    ),
    no_plot_option("Skip the PNG/SVG plots."),
)


def bn_reset_option(help: str) -> Decorator:
    return click.option("--bn-reset", is_flag=True, help=help)


def bn_data_option(help: str) -> Decorator:
    return click.option("--bn-data", metavar="MODULE:FN", help=help)


def model_spec(model: str | None, folders: list[str]) -> Any:
    if model:
        return model
    from merge.evaluate.lm import HFCausalLM, is_hf_folder

    for f in folders:
        if is_hf_folder(f):
            return HFCausalLM(f)
    raise UsageError(
        "--model is required: `module:function` (or `file.py:function`) returning the nn.Module the checkpoints were saved from"
    )


def evaluator_from(
    opts: dict[str, Any], folders: list[str], *, data_key: str = "data", eval_key: str = "eval_fn"
) -> Any:
    from merge.evaluate.evaluators import set_directions

    return set_directions(
        _evaluator_from(opts, folders, data_key=data_key, eval_key=eval_key),
        higher=_names(opts.get("higher_is_better")),
        lower=_names(opts.get("lower_is_better")),
    )


def _names(values: Any) -> list[str]:
    """Repeatable and comma-separated: `--higher-is-better bleu,mcc --higher-is-better f1`."""
    return [n.strip() for v in values or () for n in str(v).split(",") if n.strip()]


def _evaluator_from(
    opts: dict[str, Any], folders: list[str], *, data_key: str = "data", eval_key: str = "eval_fn"
) -> Any:
    from merge.evaluate.evaluators import (
        Batches,
        CallableEvaluator,
        CausalLMEvaluator,
        builtin_evaluator,
    )

    if opts.get(eval_key):
        return CallableEvaluator(opts[eval_key])
    if opts.get("lm_text"):
        from merge.evaluate.lm import TextBatches, has_tokenizer

        tok = opts.get("tokenizer") or next((f for f in folders if has_tokenizer(f)), None)
        if tok is None:
            raise UsageError(
                "--lm-text needs a tokenizer: pass --tokenizer DIR (no checkpoint folder holds tokenizer files)"
            )
        return CausalLMEvaluator(
            Batches(
                TextBatches(opts["lm_text"], tok, seq_len=opts.get("seq_len") or 128),
                what="--lm-text",
            )
        )
    if opts.get(data_key):
        flag = "--" + data_key.replace("_", "-")
        return builtin_evaluator(Batches(opts[data_key], what=flag))
    raise UsageError(
        "nothing to evaluate with: give --data (built-in evaluator), --eval (your function) or --lm-text (perplexity)"
    )


def _check_inputs(*paths: str) -> None:
    for p in paths:
        if not Path(p).exists():
            raise UsageError(f"input {p} does not exist; check the path")


def _progress(quiet: bool) -> Any:
    if quiet:
        return None

    def show(i: int, point: Any, r: dict[str, Any]) -> None:
        coords = " ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.coords.items()
        )
        metrics = " ".join(f"{k}={v:.4g}" for k, v in list(r["metrics"].items())[:4])
        click.echo(f"  [{i + 1}] {point.curve} {coords}: {metrics} ({r['seconds']:.2f}s)", err=True)

    return show


def _finish(result: Any, output: str | None, verb: str, no_plot: bool) -> None:
    from merge.evaluate.report import summary_table, write_result

    write_result(result, output or f"merge-{verb}", plots=not no_plot, stem=verb)
    click.echo(summary_table(result))
    if not result.ok:
        bad = [k for k, e in result.endpoints.items() if not e["ok"]]
        raise ExecutionError(
            f"endpoint check failed for {', '.join(bad)}: the path does not reproduce the checkpoints' metrics "
            "(see `endpoints` in the JSON); barriers were withheld. Is the evaluation deterministic (dropout off, "
            "no random augmentation)?"
        )


def _run_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """The command's run options as `RunKwargs` for the evaluation functions."""
    from merge.evaluate.runner import resolve_device

    resolve_device(opts["device"])  # before any work: a bad --device is a clean error
    return {
        "device": opts["device"],
        "cache": opts["cache"],
        "device_map": opts["device_map"],
        "executor": opts["executor"],
        "workers": opts["workers"],
        "progress": _progress(opts["quiet"]),
    }


def _maybe_data(spec: str | None, what: str) -> Any:
    from merge.evaluate.evaluators import Batches

    return Batches(spec, what=what) if spec else None


def _check_save(save: str | None, inputs: Sequence[str]) -> None:
    """--save refused now, not after the evaluations."""
    if save:
        from merge.io.output import check_output

        check_output(save, inputs)


def _save_weighted(states: dict[str, str], weights: dict[str, float], save: str) -> str:
    from merge.evaluate.weights import weighted_state
    from merge.io import save_state_dict

    return str(save_state_dict(weighted_state(states, weights), save))


def _parse_span(text: str, flag: str, example: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"{flag} `{text}` must look like START:STOP, e.g. {example}") from None
    return lo, hi


# -- merge path --------------------------------------------------------------------------------


@click.command("path")
@click.argument("a")
@click.argument("b")
@eval_options
@click.option(
    "--steps",
    type=int,
    default=25,
    show_default=True,
    help="Points on the α grid (α = ½ is always included).",
)
@click.option(
    "--scales",
    metavar="START:STOP:NUM",
    help="Instead of A→B, the task-vector path θ_A + λ(θ_B − θ_A) over these λ (extrapolation allowed).",
)
@click.option(
    "--align",
    type=click.Choice(["weight", "activation"]),
    help="Also evaluate B permuted onto A (merge.align).",
)
@click.option(
    "--align-data", metavar="MODULE:FN", help="Data for activation matching (default: --data)."
)
@bn_reset_option("Also recompute BatchNorm statistics at every α (its own curve).")
@click.option("--repair", is_flag=True, help="Also apply REPAIR at every α (merge.align).")
@bn_data_option("Data for --bn-reset/--repair statistics (default: --data); training data is best.")
@click.option("--bn-batches", type=int, help="Use only this many batches for the statistics.")
@seed_option("Seed for the alignment.")
def path_cmd(a: str, b: str, **opts: Any) -> None:
    """Loss and accuracy along the linear path from checkpoint A to B, with barriers under every definition.

    \b
    merge path a/ b/ --model mypkg:make_model --data mypkg:test_loader --steps 25 -o report/
    merge path a/ b/ ... --align weight --bn-reset --repair -o report/
    merge path llm-a/ llm-b/ --lm-text corpus.txt -o report/
    """
    from merge.evaluate.grids import parse_values
    from merge.evaluate.paths import interpolation_path, task_vector_path

    _check_inputs(a, b)
    model = model_spec(opts["model"], [a, b])
    ev = evaluator_from(opts, [a, b])
    bn_data = _maybe_data(opts["bn_data"], "--bn-data") or ev_data(ev)
    if opts["scales"]:
        if opts["align"] or opts["repair"]:
            raise UsageError(
                "--scales draws a task-vector path; --align and --repair apply to A→B paths only"
            )
        result = task_vector_path(
            model,
            a,
            b,
            scales=parse_values(opts["scales"], what="--scales"),
            evaluator=ev,
            bn_reset=opts["bn_reset"],
            bn_data=bn_data,
            bn_batches=opts["bn_batches"],
            **_run_kwargs(opts),
        )
    else:
        result = interpolation_path(
            model,
            a,
            b,
            evaluator=ev,
            steps=opts["steps"],
            align=opts["align"],
            align_data=_maybe_data(opts["align_data"], "--align-data") or ev_data(ev),
            seed=opts["seed"],
            bn_reset=opts["bn_reset"],
            repair=opts["repair"],
            bn_data=bn_data,
            bn_batches=opts["bn_batches"],
            **_run_kwargs(opts),
        )
    _finish(result, opts["output"], "path", opts["no_plot"])


# -- merge sweep -------------------------------------------------------------------------------


@click.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--param",
    "params",
    multiple=True,
    required=True,
    metavar="NAME=START:STOP:NUM",
    help="A range over `vars.NAME` or a step path (steps.STEP.PARAM); repeat for a grid. `NAME=v1,v2` lists values.",
)
@metric_option("loss", "Metric that picks the best point.")
@eval_options
def sweep_cmd(recipe: str, params: tuple[str, ...], metric: str, **opts: Any) -> None:
    """Evaluate a recipe's merge over a grid of coefficients (in memory, nothing written per point).

    \b
    merge sweep recipe.yaml --param vars.lam=0:1.5:16 --model mypkg:make_model --eval mypkg:val_score -o sweep/
    """
    from merge.evaluate.grids import parse_range
    from merge.evaluate.sweep import RecipeBuilder, sweep_recipe

    _check_inputs(recipe)
    ranges = [parse_range(p) for p in params]
    folders = _recipe_folders(RecipeBuilder(recipe))
    result = sweep_recipe(
        recipe,
        ranges,
        model_spec(opts["model"], folders),
        evaluator=evaluator_from(opts, folders),
        metric=metric,
        **_run_kwargs(opts),
    )
    _finish(result, opts["output"], "sweep", opts["no_plot"])


# -- merge plane -------------------------------------------------------------------------------


@click.command("plane")
@click.argument("base")
@click.argument("task1")
@click.argument("task2")
@eval_options
@grid_option(21)
@range_option("0:1", "λ range on both axes.", dest="lam_range")
@bn_reset_option("Recompute BatchNorm statistics at every point.")
@bn_data_option("Data for --bn-reset (default: --data).")
def plane_cmd(base: str, task1: str, task2: str, grid: int, lam_range: str, **opts: Any) -> None:
    """Metrics over the plane θ0 + λ1 τ1 + λ2 τ2 spanned by two task vectors.

    \b
    merge plane base/ ft1/ ft2/ --model mypkg:make_model --data mypkg:val --grid 21 -o plane/
    """
    from merge.evaluate.paths import plane

    _check_inputs(base, task1, task2)
    lo, hi = _parse_span(lam_range, "--range", "-0.5:1.5")
    ev = evaluator_from(opts, [base, task1, task2])
    result = plane(
        model_spec(opts["model"], [base]),
        base,
        task1,
        task2,
        grid=grid,
        lam_range=(lo, hi),
        evaluator=ev,
        bn_reset=opts["bn_reset"],
        bn_data=_maybe_data(opts["bn_data"], "--bn-data") or ev_data(ev),
        **_run_kwargs(opts),
    )
    _finish(result, opts["output"], "plane", opts["no_plot"])


# -- merge negate ------------------------------------------------------------------------------


@click.command("negate")
@click.argument("base")
@click.argument("finetuned")
@run_options
@click.option("--target-data", metavar="MODULE:FN", help="Data of the task to forget.")
@click.option("--control-data", metavar="MODULE:FN", help="Data of the task to keep.")
@click.option("--target-eval", metavar="MODULE:FN", help="Own evaluate(model) for the target task.")
@click.option(
    "--control-eval", metavar="MODULE:FN", help="Own evaluate(model) for the control task."
)
@click.option(
    "--lambdas",
    default="0:1:21",
    show_default=True,
    metavar="START:STOP:NUM",
    help="λ grid for θ0 − λτ.",
)
@click.option(
    "--threshold",
    type=float,
    default=0.95,
    show_default=True,
    help="Control must stay ≥ this fraction of the base's.",
)
@metric_option("accuracy", "Score compared (accuracy: higher is better; loss: lower).")
@click.option(
    "--random-baseline/--no-random-baseline",
    default=True,
    show_default=True,
    help="Evaluate a random vector of τ's norm at the chosen λ.",
)
@seed_option()
@save_option("Also write the negated model at the chosen λ here.")
def negate_cmd(base: str, finetuned: str, **opts: Any) -> None:
    """Forget a task: θ0 − λτ, with λ the lowest target score whose control stays ≥ 95% of the base's.

    \b
    merge negate base/ ft/ --model mypkg:make_model --target-data mypkg:toxic --control-data mypkg:wiki -o forget/
    """
    from merge.evaluate.grids import parse_values
    from merge.evaluate.negation import negation

    _check_inputs(base, finetuned)
    _check_save(opts["save"], [base, finetuned])
    folders = [base, finetuned]
    target = (
        evaluator_from(opts, folders, data_key="target_data", eval_key="target_eval")
        if (opts["target_data"] or opts["target_eval"])
        else None
    )
    control = (
        evaluator_from(opts, folders, data_key="control_data", eval_key="control_eval")
        if (opts["control_data"] or opts["control_eval"])
        else None
    )
    if target is None or control is None:
        raise UsageError(
            "negate needs the task to forget and the task to keep: --target-data/--target-eval and --control-data/--control-eval"
        )
    result = negation(
        model_spec(opts["model"], folders),
        base,
        finetuned,
        target_eval=target,
        control_eval=control,
        lambdas=parse_values(opts["lambdas"], what="--lambdas"),
        threshold=opts["threshold"],
        metric=opts["metric"],
        random_baseline=opts["random_baseline"],
        seed=opts["seed"],
        **_run_kwargs(opts),
    )
    if opts["save"] and result.selection.get("lambda") is not None:
        lam = result.selection["lambda"]
        result.selection["saved"] = _save_weighted(
            {"base": base, "task": finetuned}, {"base": 1.0 + lam, "task": -lam}, opts["save"]
        )
    _finish(result, opts["output"], "negate", opts["no_plot"])


# -- merge greedy-soup -------------------------------------------------------------------------


@click.command("greedy-soup")
@click.argument("ingredients", nargs=-1, required=True)
@eval_options
@metric_option("accuracy", "Validation metric the soup must improve.")
@save_option("Also write the soup here.")
def soup_cmd(ingredients: tuple[str, ...], metric: str, **opts: Any) -> None:
    """Greedy soup: add each fine-tuned model (best first) only if the validation score improves."""
    from merge.evaluate.soup import greedy_soup

    _check_inputs(*ingredients)
    _check_save(opts["save"], ingredients)
    states = dict(zip(_unique_names(ingredients), ingredients))
    result = greedy_soup(
        model_spec(opts["model"], list(ingredients)),
        states,
        evaluator=evaluator_from(opts, list(ingredients)),
        metric=metric,
        **_run_kwargs(opts),
    )
    if opts["save"]:
        result.selection["saved"] = _save_weighted(
            states, result.selection["weights"], opts["save"]
        )
    _finish(result, opts["output"], "greedy-soup", opts["no_plot"])


# -- merge probe linearity | disentanglement ---------------------------------------------------


@click.group("probe")
def probe_group() -> None:
    """Probes of how linear a network is, in function space and in weight space."""


@probe_group.command("linearity")
@model_option("make_model() -> nn.Module.", required=True)
@data_option("Batches whose inputs are probed (float tensors).", required=True)
@click.option("--weights", type=click.Path(), help="Checkpoint to load into the model first.")
@click.option(
    "--layer",
    "layers",
    multiple=True,
    metavar="NAME",
    help="Also probe this module's output (repeatable).",
)
@click.option(
    "--k",
    "ks",
    default="-2,-1,-0.5,0.5,2",
    show_default=True,
    help="Scales for homogeneity (include negative ones).",
)
@click.option(
    "--origin",
    type=click.Choice(["affine", "zero"]),
    default="affine",
    show_default=True,
    help="affine: measure f − f(0) (an affine map scores 0); zero: the textbook f(kx) = k f(x).",
)
@click.option(
    "--pairs",
    type=int,
    default=512,
    show_default=True,
    help="Input pairs (x, y) to average over.",
)
@click.option("--base", type=click.Path(), help="Weight-space probes: the base checkpoint θ0 ...")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    type=click.Path(),
    help="... and one or two fine-tuned checkpoints (τ = θ − θ0).",
)
@seed_option()
@probe_output_options
def linearity_cmd(**opts: Any) -> None:
    """Homogeneity |f(kx) − k f(x)| and additivity |f(x+y) − f(x) − f(y)|, relative to |f(x) − f(y)|.

    \b
    merge probe linearity --model mypkg:make_model --data mypkg:val --layer layers.1
    merge probe linearity --model ... --data ... --base base/ --task ft1/ --task ft2/   # along task vectors
    """
    from merge.evaluate.evaluators import Batches
    from merge.evaluate.grids import parse_values
    from merge.evaluate.probes import linearity_probe, weight_linearity

    ks = parse_values(opts["ks"], what="--k")
    data = Batches(opts["data"], what="--data")
    if opts["tasks"] or opts["base"]:
        if not opts["base"] or not 1 <= len(opts["tasks"]) <= 2:
            raise UsageError("weight-space probes need --base and one or two --task checkpoints")
        _check_inputs(opts["base"], *opts["tasks"])
        result = weight_linearity(
            opts["model"],
            opts["base"],
            opts["tasks"][0],
            data,
            task2=opts["tasks"][1] if len(opts["tasks"]) > 1 else None,
            layers=opts["layers"],
            ks=ks,
            max_examples=opts["pairs"],
            device=opts["device"],
        )
    else:
        if opts["weights"]:
            _check_inputs(opts["weights"])
        result = linearity_probe(
            opts["model"],
            data,
            weights=opts["weights"],
            layers=opts["layers"],
            ks=ks,
            origin=opts["origin"],
            max_pairs=opts["pairs"],
            seed=opts["seed"],
            device=opts["device"],
        )
    _finish(result, opts["output"], "linearity", opts["no_plot"])


@probe_group.command("disentanglement")
@click.argument("base")
@click.argument("task1")
@click.argument("task2")
@model_option("make_model() -> nn.Module.", required=True)
@click.option("--data1", required=True, metavar="MODULE:FN", help="Inputs of task 1.")
@click.option("--data2", required=True, metavar="MODULE:FN", help="Inputs of task 2.")
@grid_option(13)
@range_option("-3:3", "α range on both axes.", dest="a_range")
@click.option("--examples", type=int, default=1024, show_default=True, help="Examples per task.")
@probe_output_options
def disentanglement_cmd(base: str, task1: str, task2: str, **opts: Any) -> None:
    """Weight disentanglement error ξ(α1, α2) of two task vectors (prediction disagreement)."""
    from merge.evaluate.evaluators import Batches
    from merge.evaluate.grids import linspace
    from merge.evaluate.probes import disentanglement

    _check_inputs(base, task1, task2)
    lo, hi = _parse_span(opts["a_range"], "--range", "-3:3")
    result = disentanglement(
        opts["model"],
        base,
        task1,
        task2,
        Batches(opts["data1"], what="--data1"),
        Batches(opts["data2"], what="--data2"),
        alphas=linspace(lo, hi, opts["grid"]),
        max_examples=opts["examples"],
        device=opts["device"],
    )
    _finish(result, opts["output"], "disentanglement", opts["no_plot"])


COMMANDS = (path_cmd, sweep_cmd, plane_cmd, negate_cmd, soup_cmd, probe_group)


def register(cli: click.Group) -> None:
    for command in COMMANDS:
        cli.add_command(command)


def ev_data(ev: Any) -> Any:
    """The data an evaluator reads (reused for BatchNorm statistics when no --bn-data is given)."""
    return getattr(ev, "data", None)


def _unique_names(paths: tuple[str, ...]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem = Path(p.rstrip("/")).name or p
        name, i = stem, 2
        while name in names:
            name, i = f"{stem}-{i}", i + 1
        names.append(name)
    return names


def _recipe_folders(builder: Any) -> list[str]:
    try:
        return [v for v in (builder.data().get("inputs") or {}).values() if isinstance(v, str)]
    except Exception:
        return []
