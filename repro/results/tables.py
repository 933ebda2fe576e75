"""Run records -> pandas: one tidy frame of all runs, and per-setting mean ± std over seeds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from repro.errors import UserError
from repro.results.chance import best_top1_before_divergence, is_collapsed

RUN_FIELDS = ("wall_time_s", "cpu_time_s", "images_per_s", "peak_memory_mb")
#: a diverged run's best test top-1 before it diverged (chance.best_top1_before_divergence), for the check; a
#: column of the frame, not a metric of the tables
BEST_BEFORE_DIVERGENCE = "best_top1_before_divergence"


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run, or per row of a run's ``rows`` (tasks that produce tables, e.g. corruption × severity)."""
    rows = []
    for record in records:
        base = {"suite": record["suite"], "suite_version": record["suite_version"], "tier": record["tier"],
                "run_id": record["run_id"], "status": record["status"], "collapsed": is_collapsed(record),
                "shared_from": record.get("shared_from"), **record["setting"]}
        scalars = {k: v for k, v in record.get("metrics", {}).items() if v is None or isinstance(v, int | float)}
        scalars.update({k: record.get(k) for k in RUN_FIELDS})
        if record["status"] == "diverged":
            scalars[BEST_BEFORE_DIVERGENCE] = best_top1_before_divergence(record)
        if record.get("rows"):
            rows.extend({**base, **row} for row in record["rows"])
        else:
            rows.append({**base, **scalars})
    return pd.DataFrame(rows)


def metric_columns(frame: pd.DataFrame, setting_columns: list[str]) -> list[str]:
    fixed = {"suite", "suite_version", "tier", "run_id", "status", "collapsed", "shared_from", "seed",
             BEST_BEFORE_DIVERGENCE, *setting_columns}
    return [c for c in frame.columns if c not in fixed and pd.api.types.is_numeric_dtype(frame[c])]


def summarize(frame: pd.DataFrame, setting_columns: list[str]) -> pd.DataFrame:
    """Mean, std and n over seeds for every metric, per tier and setting; diverged and collapsed runs counted."""
    if frame.empty:
        return frame
    keys = ["tier", *[c for c in setting_columns if c in frame.columns]]
    metrics = metric_columns(frame, setting_columns)
    grouped = frame.groupby(keys, dropna=False, sort=False)
    summary = grouped[metrics].agg(["mean", "std", "count"])
    for metric in metrics:  # the standard error of the mean over seeds, next to the std
        summary[metric, "se"] = summary[metric, "std"] / summary[metric, "count"] ** 0.5
    summary = summary.drop(columns=[(metric, "count") for metric in metrics])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary["n"] = grouped["run_id"].nunique()
    summary["n_diverged"] = grouped["status"].agg(lambda s: int((s == "diverged").sum()))
    summary["n_collapsed"] = grouped.apply(lambda part: part.loc[part["collapsed"], "run_id"].nunique(),
                                           include_groups=False) if "collapsed" in frame else 0
    return summary.reset_index()


def mean_std_text(mean: float, std: float, se: float) -> str:
    """'mean ± std (SE se)' over seeds; the mean alone for a single seed, — for none."""
    if pd.isna(mean):
        return "—"
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f} (SE {se:.2f})"


def markdown(frame: pd.DataFrame) -> str:
    """``frame`` as a markdown table; pandas draws those with the optional ``tabulate`` package."""
    try:
        return frame.to_markdown(index=False)
    except ImportError:
        raise UserError("markdown tables and check reports need the `tabulate` package: pip install tabulate "
                        "(`repro bundle` includes it)") from None


def to_markdown(summary: pd.DataFrame, setting_columns: list[str], metrics: list[str]) -> str:
    """A readable table: setting columns, then 'mean ± std (SE)' per metric, then n."""
    keys = ["tier", *[c for c in setting_columns if c in summary.columns]]
    shown = pd.DataFrame({k: summary[k] for k in keys})
    for metric in metrics:
        if f"{metric}_mean" in summary:
            shown[metric] = [mean_std_text(*stats) for stats in zip(
                summary[f"{metric}_mean"], summary[f"{metric}_std"], summary[f"{metric}_se"], strict=True)]
    shown["n"] = summary["n"]
    for count in ("diverged", "collapsed"):
        if summary[f"n_{count}"].any():
            shown[count] = summary[f"n_{count}"]
    return markdown(shown)


def select(frame: pd.DataFrame, setting: dict[str, Any]) -> pd.DataFrame:
    """Rows matching every ``column: value`` of a reference's setting (numbers compared as numbers)."""
    mask = np.ones(len(frame), dtype=bool)
    for column, value in setting.items():
        if column not in frame.columns:
            return frame.iloc[0:0]
        values = frame[column]
        if isinstance(value, int | float) and not isinstance(value, bool):
            mask &= pd.to_numeric(values, errors="coerce").to_numpy() == value
        else:
            mask &= (values.astype(str) == str(value)).to_numpy()
    return frame[mask]
