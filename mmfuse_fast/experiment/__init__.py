"""`mmfuse experiment`: a spec of tables (spec.py) -> planned runs and cells (plan.py) -> runs through the
`mmfuse` command, resumable (runner.py) -> results.csv, report.md and plots (report.py). docs/experiments.md."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmfuse_fast.config import to_dict
from mmfuse_fast.experiment.plan import Plan, make_plan
from mmfuse_fast.experiment.report import SPEC_NAME, write_report
from mmfuse_fast.experiment.runner import LAUNCHERS, execute, write_plan
from mmfuse_fast.experiment.spec import ExperimentSpec, load_spec

__all__ = ["run_experiment", "write_report", "load_spec", "make_plan", "ExperimentSpec", "Plan", "LAUNCHERS"]


def run_experiment(spec: str | Path, scale: str, out: str | Path, seeds: int = 1, only: list[str] | None = None,
                   launcher: str = "inline", overrides: list[str] | None = None, nproc: int | None = None,
                   log=print) -> dict:
    """Plans the sweep (every config validated before anything runs), runs what is unfinished with `launcher`,
    then writes the report of whatever has finished. Returns the run statuses and the report's paths."""
    loaded = load_spec(spec)
    out = Path(out)
    plan = make_plan(loaded, scale, out, seeds=seeds, only=only, overrides=overrides)
    write_plan(plan, out)
    (out / SPEC_NAME).write_text(yaml.safe_dump(to_dict(loaded), sort_keys=False, allow_unicode=True))
    status = execute(plan, out, launcher=launcher, nproc=nproc, log=log)
    report = write_report(out)
    failed = sorted(k for k, v in status.items() if v not in ("done", "ran"))
    return {"out": str(out), "runs": len(plan.runs), "failed": failed, **report, "exit_code": 1 if failed else 0}
