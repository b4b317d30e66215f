"""A result reported: its files (JSON, CSV, plots) and its terminal summary (one small table
per kind, then endpoint checks and notes)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merge.evaluate.plots import headline_metrics, plot_result
from merge.evaluate.results import Result

MAX_ROWS = 40


def write_result(
    result: Result, outdir: str | Path, *, plots: bool = True, stem: str | None = None
) -> dict[str, Any]:
    """Write `<stem>.json`, `<stem>.csv` and the plots (PNG and SVG) into `outdir` (`stem`: the
    result's kind by default); returns the paths, also kept in `result.files`."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or result.kind
    files: dict[str, Any] = {
        "json": str(out / f"{stem}.json"),
        "csv": str(out / f"{stem}.csv"),
        "plots": [],
    }
    if plots:
        files["plots"] = [str(p) for p in plot_result(result, out, stem)]
    result.files = files
    (out / f"{stem}.csv").write_text(result.csv_text())
    (out / f"{stem}.json").write_text(
        json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n"
    )
    return files


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (numbers right-aligned, 4 significant decimals)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [all(_is_number(row[i]) for row in rows) and rows for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))
        ).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(x: Any) -> bool:
    return x is None or (isinstance(x, int | float) and not isinstance(x, bool))


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.4f}"
    return str(x)


def summary_table(result: Result) -> str:
    body = {
        "path": _path,
        "negation": _negation,
        "linearity": _linearity,
        "soup": _soup,
    }.get(result.kind, _grid)(result)
    tail = []
    for key, e in result.endpoints.items():
        status = "ok" if e["ok"] else "MISMATCH"
        tail.append(
            f"endpoint {key} ({e['curve']} at {_coords(e['coords'])}): {status}, max |Δ| = {e['max_abs_diff']:.3g}"
        )
    tail += [f"note: {n}" for n in result.notes]
    if result.files:
        written = [
            result.files.get("json"),
            result.files.get("csv"),
            *result.files.get("plots", []),
        ]
        tail.append("wrote " + ", ".join(str(w) for w in written if w))
    return "\n".join([body, *tail])


def _coords(c: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in c.items())


def _path(result: Result) -> str:
    headers = [
        "curve",
        "loss α=0",
        "loss α=½",
        "loss α=1",
        "barrier max−mean",
        "at α",
        "max−linear",
        "midpoint",
    ]
    acc = any("accuracy" in c.metric_names() for c in result.curves)
    if acc:
        headers += ["acc α=½", "acc barrier"]
    rows = []
    for c in result.curves:
        by_alpha = {p["coords"]["alpha"]: p["metrics"] for p in c.points}
        b = (c.barriers or {}).get("loss") or {}
        row: list[Any] = [
            c.name,
            by_alpha.get(0.0, {}).get("loss"),
            by_alpha.get(0.5, {}).get("loss"),
            by_alpha.get(1.0, {}).get("loss"),
            (b.get("max_minus_mean") or {}).get("value"),
            (b.get("max_minus_mean") or {}).get("alpha"),
            (b.get("max_minus_linear") or {}).get("value"),
            (b.get("midpoint") or {}).get("value"),
        ]
        if acc:
            ab = (c.barriers or {}).get("accuracy") or {}
            row += [
                by_alpha.get(0.5, {}).get("accuracy"),
                (ab.get("max_minus_mean") or {}).get("value"),
            ]
        rows.append(row)
    out = format_table(headers, rows)
    reductions = [
        f"{name}: loss barrier {100 * v['loss']['reduction_vs_naive']:.1f}% lower than naive"
        for name, v in result.selection.items()
        if isinstance(v, dict) and "reduction_vs_naive" in v.get("loss", {})
    ]
    return "\n".join([out, *reductions])


def _grid(result: Result) -> str:
    metrics = headline_metrics(result)
    rows = []
    for c in result.curves:
        for p in c.points:
            rows.append(
                [
                    *(p["coords"].get(a) for a in result.axes),
                    *(p["metrics"].get(m) for m in metrics),
                ]
                + ([c.name] if len(result.curves) > 1 else [])
            )
    headers = [*result.axes, *metrics] + (["curve"] if len(result.curves) > 1 else [])
    lines = []
    if len(rows) > MAX_ROWS:
        key = metrics[0]
        sign = -1.0 if key.endswith("accuracy") else 1.0
        idx = len(result.axes) + metrics.index(key)
        best = sorted(rows, key=lambda r: sign * (r[idx] if r[idx] is not None else math.inf))[:10]
        lines.append(f"{len(rows)} points; the 10 best by {key}:")
        rows = best
    lines.append(format_table(headers, rows))
    if result.kind == "disentanglement":
        sel = result.selection
        lines.append(
            f"ξ over the grid: max {_fmt(sel['max_xi'])}, mean {_fmt(sel['mean_xi'])}; "
            f"mean over α ∈ [0, 1]²: {_fmt(sel['mean_xi_unit_square'])} (0 = fully disentangled)"
        )
    best_sel = result.selection.get("best")
    if best_sel:
        lines.append(
            f"best by {result.selection.get('metric')}: {_coords(best_sel['coords'])} -> {_fmt(best_sel['value'])}"
        )
    return "\n".join(lines)


def _negation(result: Result) -> str:
    sel = result.selection
    m = sel.get("metric", "accuracy")
    c = result.curve("negation")
    rows = []
    for p in c.points:
        lam = p["coords"]["lambda"]
        rows.append(
            [
                lam,
                p["metrics"].get(f"target_{m}"),
                p["metrics"].get(f"control_{m}"),
                p.get("feasible"),
                "<-" if sel.get("lambda") == lam else "",
            ]
        )
    out = [format_table(["λ", f"target {m}", f"control {m}", "control ok", "chosen"], rows)]
    if sel.get("lambda") is not None:
        out.append(
            f"chosen λ = {sel['lambda']:g}: target {m} {_fmt(sel['base_target'])} -> {_fmt(sel['target'])}"
            f" (drop {_fmt(sel['target_drop'])}), control {_fmt(sel['control'])}"
            f" = {100 * sel['control_ratio']:.1f}% of the base's (limit {100 * sel['threshold']:.0f}%)"
        )
        rnd = sel.get("random_baseline")
        if rnd:
            out.append(
                f"random vector of the same norm at λ = {sel['lambda']:g}: target {m} {_fmt(rnd['metrics'].get(f'target_{m}'))}, "
                f"control {_fmt(rnd['metrics'].get(f'control_{m}'))}"
            )
    else:
        out.append("no λ keeps the control score within the threshold")
    return "\n".join(out)


def _linearity(result: Result) -> str:
    rows = []
    for c in result.curves:
        for p in c.points:
            rows.append(
                [
                    c.name,
                    p["coords"]["test"],
                    p["coords"].get("k"),
                    p["metrics"]["mean"],
                    p["metrics"]["median"],
                    p["metrics"]["max"],
                ]
            )
    return format_table(["where", "test", "k", "mean ratio", "median", "max"], rows)


def _soup(result: Result) -> str:
    sel = result.selection
    rows = [
        [p["coords"]["step"], p.get("ingredient"), p["metrics"].get(sel["metric"]), p.get("kept")]
        for p in result.curve("greedy").points
    ]
    out = [format_table(["step", "ingredient tried", sel["metric"], "kept"], rows)]
    out.append(
        f"greedy soup of {len(sel['kept'])}: {', '.join(sel['kept'])} -> {sel['metric']} {_fmt(sel['score'])}"
        f" (best single: {sel['best_single']} {_fmt(sel['best_single_score'])})"
    )
    return "\n".join(out)
