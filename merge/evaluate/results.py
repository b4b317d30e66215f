"""Results of every evaluation command, in one JSON schema (documented in docs/evaluate.md).

A result is a list of curves; a curve is a list of points; a point has `coords` (α, λ1, k...),
`metrics` (what the evaluator returned) and `seconds`. Paths add barriers per curve, and every
kind may add `endpoints` (the reproduction check), `selection` (the chosen coefficient) and
`notes`. The CSV has one row per point: `curve`, the coordinates, then the metrics.
`merge.evaluate.report.write_result` writes both files and the plots.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.errors import UsageError
from merge.version import __version__

SCHEMA = "merge.evaluate/1"
KINDS = (
    "path",
    "task_vector_path",
    "plane",
    "sweep",
    "negation",
    "soup",
    "linearity",
    "disentanglement",
)


@dataclass
class Curve:
    name: str
    points: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    barriers: dict[str, Any] | None = None

    def values(self, metric: str) -> list[float]:
        return [float(p["metrics"].get(metric, math.nan)) for p in self.points]

    def coords(self, axis: str) -> list[float]:
        return [float(p["coords"][axis]) for p in self.points]

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for p in self.points:
            names.update(dict.fromkeys(p["metrics"]))
        return list(names)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "info": self.info, "points": self.points}
        if self.barriers is not None:
            out["barriers"] = self.barriers
        return out


@dataclass
class Result:
    kind: str
    axes: list[str]
    curves: list[Curve] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    endpoints: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown result kind {self.kind!r}; one of {', '.join(KINDS)}")

    def curve(self, name: str) -> Curve:
        for c in self.curves:
            if c.name == name:
                return c
        raise KeyError(f"no curve {name!r}; curves: {', '.join(c.name for c in self.curves)}")

    @property
    def ok(self) -> bool:
        """False when an endpoint check failed (the barriers are then withheld)."""
        return all(e.get("ok", True) for e in self.endpoints.values())

    def to_json(self) -> dict[str, Any]:
        return _finite(
            {
                "schema": SCHEMA,
                "kind": self.kind,
                "merge_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "inputs": self.inputs,
                "settings": self.settings,
                "axes": self.axes,
                "curves": [c.to_json() for c in self.curves],
                "endpoints": self.endpoints,
                "selection": self.selection,
                "notes": self.notes,
                "files": self.files,
            }
        )

    def csv_text(self) -> str:
        metrics: dict[str, None] = {}
        for c in self.curves:
            metrics.update(dict.fromkeys(c.metric_names()))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["curve", *self.axes, *metrics, "seconds"])
        for c in self.curves:
            for p in c.points:
                w.writerow(
                    [
                        c.name,
                        *(_cell(p["coords"].get(a)) for a in self.axes),
                        *(_cell(p["metrics"].get(m)) for m in metrics),
                        _cell(p.get("seconds")),
                    ]
                )
        return buf.getvalue()


def _cell(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x) if math.isfinite(x) else ""
    return x


def _finite(x: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def load_result(path: str | Path) -> dict[str, Any]:
    """A result JSON back as a dict, checked to be of this schema."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise UsageError(
            f"{path}: not a merge evaluation result (schema {data.get('schema')!r}, expected {SCHEMA!r})"
        )
    return data  # type: ignore[no-any-return]
