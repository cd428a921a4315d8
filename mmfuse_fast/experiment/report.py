"""The report of a sweep: DIR/results.csv (one row per cell and metric), DIR/report.md (every table of the spec with
the paper's numbers beside ours, mean ± std over seeds, the scale, data and budget behind each number, "no data"
where a dataset is not configured) and PNG plots (one bar chart per table, the pretraining loss curves of all
methods on one figure). It reads whatever has finished, so it can run while a sweep is still going."""

from __future__ import annotations

import csv
import datetime
import json
import math
from pathlib import Path

from mmfuse_fast.engine.logging import read_metrics
from mmfuse_fast.engine.rundir import eval_metrics_path
from mmfuse_fast.experiment.plan import Cell, Plan
from mmfuse_fast.experiment.runner import read_plan, read_status, run_finished
from mmfuse_fast.experiment.spec import (ExperimentSpec, column_label, column_labels, modalities_label, row_label,
                                         row_labels)

__all__ = ["RESULTS_NAME", "REPORT_NAME", "SPEC_NAME", "collect_results", "write_report"]

RESULTS_NAME, REPORT_NAME, SPEC_NAME = "results.csv", "report.md", "spec.yaml"
RESULT_COLUMNS = ("table", "method", "modalities", "label_fraction", "variant", "seed", "metric", "value")


def _cells(plan: Plan, spec: ExperimentSpec) -> list[Cell]:
    """The cells of the tables the spec still has (a sweep directory keeps the cells of earlier invocations)."""
    return [c for c in plan.cells if c.table in spec.tables]


def _cell_metrics(cell: Cell, plan: Plan, out: Path) -> dict | None:
    if cell.run is None:
        return None
    run = plan.runs[cell.run]
    if not run_finished(run, out):
        return None
    path = eval_metrics_path(run.run_dir(out), run.config["eval_split"])
    return json.loads(path.read_text())


def collect_results(plan: Plan, spec: ExperimentSpec, out: Path) -> list[dict]:
    """One row per finished cell and metric of its table (values as the evaluation writes them: fractions)."""
    rows = []
    for cell in _cells(plan, spec):
        metrics = _cell_metrics(cell, plan, out)
        if metrics is None:
            continue
        for metric in spec.tables[cell.table].metrics:
            value = metrics.get(metric)
            if isinstance(value, (int, float)):
                rows.append({"table": cell.table, "method": cell.method, "modalities": modalities_label(cell.modalities),
                             "label_fraction": cell.label_fraction, "variant": cell.variant, "seed": cell.seed,
                             "metric": metric, "value": float(value)})
    return rows


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _table_grid(spec: ExperimentSpec, plan: Plan, out: Path, name: str) -> dict:
    """{(row, column, metric): {"values": [...], "states": {...}}} of one table over seeds."""
    table = spec.tables[name]
    grid: dict = {}
    for cell in plan.cells:
        if cell.table != name:
            continue
        row = row_label(spec, table, cell.method, cell.variant)
        metrics = _cell_metrics(cell, plan, out)
        for metric in table.metrics:
            entry = grid.setdefault((row, column_label(table, cell.modalities, cell.label_fraction, metric), metric),
                                    {"values": [], "states": set()})
            if cell.status == "no data":
                entry["states"].add("no data")
            elif metrics is None:
                entry["states"].add("pending")
            elif isinstance(metrics.get(metric), (int, float)):
                entry["values"].append(float(metrics[metric]))
    return grid


def _render(entry: dict | None, paper: float | None) -> str:
    if entry is None:
        ours = "—"
    elif entry["values"]:
        ours = _mean_std(entry["values"])
        if "pending" in entry["states"]:
            ours += " (some seeds pending)"
    elif "no data" in entry["states"]:
        ours = "no data"
    else:
        ours = "pending"
    return ours if paper is None else f"{ours} (paper {paper:g})"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _table_section(spec: ExperimentSpec, plan: Plan, out: Path, name: str, plots: list[Path]) -> list[str]:
    table = spec.tables[name]
    grid = _table_grid(spec, plan, out, name)
    rows, columns = row_labels(spec, table), column_labels(table)
    lines = [f"## {table.title or name}", ""]
    if table.paper_note:
        lines += [table.paper_note, ""]
    single_column = all(c in table.metrics for c in columns)
    if single_column:  # rows x metrics
        body = [[r] + [_render(grid.get((r, m, m)), table.paper.get(r, {}).get(m)) for m in table.metrics]
                for r in rows]
        lines += _markdown_table([""] + table.metrics, body)
    else:  # rows x (modalities, fraction), one table per metric; the paper's numbers beside the first metric
        for i, metric in enumerate(table.metrics):
            body = [[r] + [_render(grid.get((r, c, metric)), table.paper.get(r, {}).get(c) if i == 0 else None)
                           for c in columns] for r in rows]
            lines += [f"{metric}:", ""] + _markdown_table([""] + columns, body) + [""]
    lines.append("")
    for plot in plots:
        lines += [f"![{name}]({plot.name})", ""]
    return lines


def _bar_chart(spec: ExperimentSpec, plan: Plan, out: Path, name: str) -> Path | None:
    """Grouped bars of the table's first metric (ours, mean over seeds) with the paper's numbers as markers."""
    from mmfuse_fast.engine.plots import pyplot

    table = spec.tables[name]
    metric = table.metrics[0]
    grid = _table_grid(spec, plan, out, name)
    rows = row_labels(spec, table)
    columns = [c for c in column_labels(table) if c not in table.metrics or c == metric]
    if not any(grid.get((r, c, metric), {}).get("values") for r in rows for c in columns):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(columns) * max(1, len(rows)) / 3), 3.6))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(columns))]
        ours = [100 * sum(v) / len(v) if (v := grid.get((r, c, metric), {}).get("values")) else 0.0 for c in columns]
        ax.bar(xs, ours, width, label=r)
        paper = [table.paper.get(r, {}).get(c) for c in columns]
        px = [x for x, p in zip(xs, paper) if p is not None]
        if px:
            ax.scatter(px, [p for p in paper if p is not None], marker="_", s=200, color="black", zorder=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))], columns)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{name}: ours (bars), the paper (black marks)", fontsize=9)
    ax.legend(fontsize=7)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _loss_curves(spec: ExperimentSpec, plan: Plan, out: Path) -> Path | None:
    """The pretraining loss of each method (its first run of seed 0), one panel per method, on one figure."""
    from mmfuse_fast.engine.plots import pyplot

    chosen: dict[str, str] = {}
    for cell in plan.cells:
        if cell.pretrain and cell.seed == 0 and cell.method not in chosen:
            chosen[cell.method] = cell.pretrain
    curves = {m: read_metrics(plan.runs[r].run_dir(out)) for m, r in chosen.items()}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, (method, records) in zip(axes[0], curves.items()):
        ax.plot([r["step"] for r in records], [r["loss"] for r in records])
        ax.set_title(spec.method_label(method), fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("pretraining loss")
    path = out / "pretraining_loss.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _describe_data(data: dict) -> str:
    if data["root"]:
        return f"{data['dataset']} at {data['root']} (splits {', '.join(data['splits'])})"
    if data["dataset"] == "bigearthnet_v2":
        return f"the 24-scene BigEarthNet v2 sample (splits {', '.join(data['splits'])})"
    return f"{data['dataset']}: not configured"


def _budget_lines(spec: ExperimentSpec, plan: Plan, out: Path) -> list[str]:
    status = read_status(out)
    lines = ["| run | method | model | data | steps | batch | seed | status | wall time |", "|---|---|---|---|---|---|---|---|---|"]
    methods = {c.pretrain: c.method for c in plan.cells if c.pretrain}
    for run in plan.ordered_runs():
        if run.kind != "pretrain":
            continue
        cfg = run.config
        state = "finished" if run_finished(run, out) else status.get(run.id, {}).get("status", "not run")
        wall = status.get(run.id, {}).get("wall_s")
        lines.append(f"| {run.id} | {spec.method_label(methods.get(run.id, '?'))} | {cfg['model']['name']} "
                     f"(width {cfg['model']['embed_dim']}) | {_describe_data(cfg['data'])} | {cfg['train']['steps']} "
                     f"| {cfg['train']['batch_size']} | {cfg['train']['seed']} | {state} | "
                     f"{'—' if wall is None else f'{wall:.0f} s'} |")
    downstream = [r for r in plan.runs.values() if r.kind == "finetune"]
    if downstream:
        kinds = sorted({(r.config["mode"], r.config["train"]["steps"], r.config["train"]["batch_size"],
                         r.config["optim"]["lr"]) for r in downstream})
        lines += [""] + [f"Downstream ({mode}): {steps} steps at batch {batch}, lr {lr:g}; evaluated on the whole "
                         f"test split." for mode, steps, batch, lr in kinds]
        data = sorted({_describe_data(r.config["data"]) for r in downstream})
        lines.append("Downstream data: " + "; ".join(data) + ".")
    return lines


def write_report(out: str | Path) -> dict:
    """Writes DIR/results.csv, DIR/report.md and the plots from whatever has finished; returns the paths and the
    cell counts."""
    from mmfuse_fast.experiment.spec import load_spec

    out = Path(out)
    plan = read_plan(out)
    spec = load_spec(out / SPEC_NAME)
    rows = collect_results(plan, spec, out)
    with open(out / RESULTS_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    counts = {"finished": 0, "pending": 0, "no data": 0}
    for cell in _cells(plan, spec):
        if cell.status == "no data":
            counts["no data"] += 1
        elif _cell_metrics(cell, plan, out) is None:
            counts["pending"] += 1
        else:
            counts["finished"] += 1
    scale = spec.scales[plan.scale]
    lines = [f"# Experiment report: spec `{plan.spec}`, scale `{plan.scale}`", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} from `{out}`.", ""]
    if spec.description:
        lines += [spec.description, ""]
    if scale.note:
        lines += [f"**Scale `{plan.scale}`:** {scale.note}", ""]
    lines += [f"Cells: {counts['finished']} finished, {counts['pending']} pending, {counts['no data']} without data. "
              f"Seeds: {plan.seeds} (values are mean ± sample std over seeds when there are several). Numbers are "
              f"percentages; the paper's are in parentheses. `--set` overrides of this sweep: "
              f"{', '.join(f'`{o}`' for o in plan.overrides) or 'none'}.", ""]
    for name in [t for t in plan.tables if t in spec.tables]:
        chart = _bar_chart(spec, plan, out, name)
        lines += _table_section(spec, plan, out, name, [chart] if chart else [])
    curves = _loss_curves(spec, plan, out)
    lines += ["## Pretraining: budget and loss", ""] + _budget_lines(spec, plan, out) + [""]
    if curves:
        lines += [f"![pretraining loss]({curves.name})", ""]
    (out / REPORT_NAME).write_text("\n".join(lines))
    return {"report": str(out / REPORT_NAME), "results": str(out / RESULTS_NAME), "cells": counts}
