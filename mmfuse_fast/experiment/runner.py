"""Running a planned sweep: every run through the `mmfuse` command, resumable at any point.

    inline    runs one after another in this process (cli.main), the CPU default
    torchrun  pretraining runs as `torchrun --standalone --nproc_per_node N -m mmfuse_fast.cli ...` on this node's
              GPUs; downstream runs inline
    print     writes the commands, one per line in dependency order, to DIR/commands.sh (and stdout), for a
              cluster scheduler; `mmfuse experiment report DIR` collects whatever has finished

Every command carries `--resume`, so running it again continues a run from its last checkpoint, and a run that has
finished is skipped: a sweep killed at any point (SIGKILL included) and started again skips finished cells,
resumes the unfinished run and ends with the results of an uninterrupted sweep. The sweep directory is held
(engine/rundir.py's RunDirLock) while a sweep executes, and every run holds its own run directory, so a second
sweep or a run started by hand in the same place fails at once instead of mixing its files in.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mmfuse_fast.engine.checkpoint import checkpoint_step, latest_checkpoint
from mmfuse_fast.engine.rundir import LOCK_NAME, RunDirLock, eval_metrics_path, write_json
from mmfuse_fast.errors import ConfigError, RunDirError
from mmfuse_fast.experiment.plan import PLAN_NAME, Plan, Run

__all__ = ["LAUNCHERS", "command", "run_finished", "write_plan", "read_plan", "read_status", "execute",
           "COMMANDS_NAME", "STATUS_NAME"]

LAUNCHERS = ("inline", "torchrun", "print")
COMMANDS_NAME, STATUS_NAME = "commands.sh", "status.json"


def command(run: Run, out: Path) -> list[str]:
    """The `mmfuse` arguments of a run (without the program): its resolved config file, its run directory."""
    return [run.kind, "--config", str(run.config_file(out)), "--run-dir", str(run.run_dir(out)), "--resume",
            "--no-progress"]


def run_finished(run: Run, out: Path) -> bool:
    """A pretraining run is finished when its last checkpoint is at its last step; a downstream run when it is
    also evaluated."""
    run_dir = run.run_dir(out)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or checkpoint_step(ckpt) != run.config["train"]["steps"]:
        return False
    if run.kind == "finetune":
        split = run.config["eval_split"]
        return not split or eval_metrics_path(run_dir, split).is_file()
    return True


def write_plan(plan: Plan, out: Path) -> None:
    """DIR/plan.json and one resolved config file per run. A directory that holds another sweep is refused."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        if (old["spec"], old["scale"]) != (plan.spec, plan.scale):
            raise RunDirError(f"{out} holds a sweep of spec {old['spec']!r} at scale {old['scale']!r}; choose "
                              f"another --out for spec {plan.spec!r} at scale {plan.scale!r}")
        # a sweep started again with more tables, seeds or overrides: keep every run it already planned
        previous = Plan.from_json(old)
        for run_id, run in previous.runs.items():
            plan.runs.setdefault(run_id, run)
        known = {(c.table, c.method, c.variant, tuple(c.modalities), c.label_fraction, c.seed) for c in plan.cells}
        plan.cells += [c for c in previous.cells
                       if (c.table, c.method, c.variant, tuple(c.modalities), c.label_fraction, c.seed) not in known]
    for run in plan.runs.values():
        file = run.config_file(out)
        file.parent.mkdir(parents=True, exist_ok=True)
        if not file.is_file():
            file.write_text(yaml.safe_dump(_file_values(run), sort_keys=False))
    write_json(path, plan.to_json())


def _file_values(run: Run) -> dict:
    """The config file of a run: its resolved config, except that a downstream run on a pretrained backbone
    names no architecture key (the backbone's are the pretraining run's) but the runtime one."""
    values = dict(run.config)
    if run.kind == "finetune" and run.pretrain is not None:
        values["model"] = {"ops_backend": values["model"]["ops_backend"]}
    return values


def read_plan(out: Path) -> Plan:
    path = Path(out) / PLAN_NAME
    if not path.is_file():
        raise ConfigError(f"{out} holds no sweep ({PLAN_NAME} is missing): run `mmfuse experiment run` first")
    return Plan.from_json(json.loads(path.read_text()))


def _forget_unstarted(run: Run, out: Path) -> None:
    """A run directory without a complete checkpoint holds nothing a resume could use (a run killed before or
    during its first checkpoint): start it again from scratch. Done holding the run directory, which keeps its
    lock file (another process may be waiting on it); a RunDirError when another process runs in it."""
    run_dir = run.run_dir(out)
    if not run_dir.is_dir():
        return
    with RunDirLock(run_dir):
        if latest_checkpoint(run_dir) is not None:
            return
        for path in run_dir.iterdir():
            if path.name == LOCK_NAME:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _run_inline(args: list[str]) -> int:
    from mmfuse_fast.cli import main

    return main(args)


def _run_torchrun(args: list[str], nproc: int) -> int:
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "mmfuse_fast.cli", *args]
    return subprocess.call(cmd)


def read_status(out: Path) -> dict:
    """DIR/status.json: {run id: {"status", "wall_s"}} of every run this sweep directory has executed."""
    path = Path(out) / STATUS_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def execute(plan: Plan, out: Path, launcher: str = "inline", nproc: int | None = None, log=print) -> dict:
    """Runs every unfinished run of the plan; returns {run id: "done" | "ran" | "failed (...)" | "skipped ..."}.
    A failed run does not stop the sweep (its cells are reported as failed); the runs that depend on it are
    skipped. Each run's status and wall time go to DIR/status.json as it ends. A sweep directory another sweep is
    executing in is refused (RunDirError)."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")
    out = Path(out)
    runs = plan.ordered_runs()
    if launcher == "print":
        lines = [shlex.join(["mmfuse", *command(r, out)]) for r in runs]
        (out / COMMANDS_NAME).write_text("".join(line + "\n" for line in lines))
        for line in lines:
            log(line)
        return {}
    if launcher == "torchrun":
        import torch

        nproc = nproc or max(1, torch.cuda.device_count())
    with RunDirLock(out):
        return _execute(runs, out, launcher, nproc, log)


def _execute(runs: list[Run], out: Path, launcher: str, nproc: int | None, log) -> dict:
    record = read_status(out)
    status: dict[str, str] = {}
    t0 = time.perf_counter()
    for i, run in enumerate(runs, 1):
        if run.pretrain is not None and status.get(run.pretrain, "done") not in ("done", "ran"):
            status[run.id] = f"skipped ({run.pretrain} failed)"
            continue
        if run_finished(run, out):
            status[run.id] = "done"
            continue
        try:
            _forget_unstarted(run, out)
        except RunDirError as error:  # a run started by hand (or another sweep's) is using it: leave it alone
            log(f"[{i}/{len(runs)}] {run.kind} {run.id}: {error}")
            status[run.id] = "failed (run directory in use)"
            continue
        log(f"[{i}/{len(runs)}] {run.kind} {run.id}  ({time.perf_counter() - t0:.0f} s into this invocation)")
        args = command(run, out)
        started = time.perf_counter()
        code = _run_torchrun(args, nproc) if launcher == "torchrun" and run.kind == "pretrain" else _run_inline(args)
        status[run.id] = "ran" if code == 0 and run_finished(run, out) else f"failed (exit {code})"
        previous = record.get(run.id, {}).get("wall_s", 0.0)  # time spent before an interruption is not known
        record[run.id] = {"status": status[run.id], "wall_s": round(previous + time.perf_counter() - started, 1)}
        write_json(out / STATUS_NAME, record)
    return status
