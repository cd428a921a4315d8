"""From a spec, a scale, seeds and `--set` overrides to the runs of a sweep and the cells they fill.

    cells   one per (table, method, variant, modalities, label fraction, seed): a downstream run, or "no data"
    runs    pretraining runs and downstream runs, each identified by a hash of its resolved config (the number of
            steps included), so a pretraining run that several cells share (the paper's full model is in Tables
            2, 6, 7 and 8) is planned and run once

`--set KEY=VALUE` applies to every run whose config has the key's section; `--set TABLE:KEY=VALUE` only to the
downstream runs of that table (e.g. `table3:data.root=/data/sen12ms`), and to its pretraining runs too when the
table pretrains on data of its own (a `pretrain_set` in the spec: the segmentation tables).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mmfuse_fast.config import FinetuneConfig, PretrainConfig, load_config, parse_override, resolve_config_path, to_dict
from mmfuse_fast.errors import ConfigError
from mmfuse_fast.experiment.spec import RANDOM_INIT, ExperimentSpec, TableSpec

__all__ = ["Run", "Cell", "Plan", "make_plan", "RUNS_DIR", "CONFIGS_DIR", "PLAN_NAME"]

RUNS_DIR, CONFIGS_DIR, PLAN_NAME = "runs", "configs", "plan.json"
# datasets that cannot be read without a data.root (bigearthnet_v2 falls back to the fetched sample)
NEEDS_ROOT = ("bigearthnet_v1", "sen12ms", "seg_tiles", "packed")


@dataclass
class Run:
    id: str  # "pt-<method>-<hash>" | "ft-<hash>"
    kind: str  # pretrain | finetune
    config: dict  # the resolved config, as config.yaml will hold it
    pretrain: str | None = None  # the pretraining run a downstream run starts from

    def config_file(self, out: Path) -> Path:
        return Path(out) / CONFIGS_DIR / f"{self.id}.yaml"

    def run_dir(self, out: Path) -> Path:
        return Path(out) / RUNS_DIR / self.id


@dataclass
class Cell:
    table: str
    method: str
    variant: str
    modalities: list[str]  # [] = all the backbone has
    label_fraction: float
    seed: int
    run: str | None  # the downstream run; None: no data
    pretrain: str | None = None
    status: str = "planned"  # planned | no data


@dataclass
class Plan:
    spec: str
    scale: str
    seeds: int
    tables: list[str]
    overrides: list[str]
    runs: dict[str, Run] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)

    def ordered_runs(self) -> list[Run]:
        """Pretraining runs first, then downstream runs, each in the order the cells need them."""
        return sorted(self.runs.values(), key=lambda r: r.kind != "pretrain")

    def to_json(self) -> dict:
        return {"spec": self.spec, "scale": self.scale, "seeds": self.seeds, "tables": self.tables,
                "overrides": self.overrides, "runs": {k: dataclasses.asdict(r) for k, r in self.runs.items()},
                "cells": [dataclasses.asdict(c) for c in self.cells]}

    @classmethod
    def from_json(cls, values: dict) -> "Plan":
        plan = cls(values["spec"], values["scale"], values["seeds"], values["tables"], values["overrides"])
        plan.runs = {k: Run(**r) for k, r in values["runs"].items()}
        plan.cells = [Cell(**c) for c in values["cells"]]
        return plan


def config_digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _sections(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _scoped_overrides(overrides: list[str], spec: ExperimentSpec) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides of every run, {table: overrides of its runs}); checks each key applies to some run."""
    known = _sections(PretrainConfig) | _sections(FinetuneConfig)
    common, per_table = [], {}
    for text in overrides:
        table, _, rest = text.partition(":") if ":" in text.split("=", 1)[0] else ("", "", text)
        if table and table not in spec.tables:
            raise ConfigError(f"--set {text}: unknown table {table!r}; the spec's tables are {sorted(spec.tables)}")
        key, _ = parse_override(rest)
        if key.split(".")[0] not in known:
            raise ConfigError(f"--set {text}: config key '{key}' is not a key of a pretraining or a downstream "
                              f"config (sections: {', '.join(sorted(known))})")
        (per_table.setdefault(table, []) if table else common).append(rest)
    return common, per_table


def _applicable(cls, overrides: list[str], pretrained: bool = False) -> list[str]:
    """The overrides whose section `cls` has (a downstream run on a pretrained backbone takes no model key but
    the runtime one: the backbone's architecture is the pretraining run's)."""
    out = []
    for text in overrides:
        key = parse_override(text)[0]
        if key.split(".")[0] not in _sections(cls):
            continue
        if pretrained and key.startswith("model.") and key != "model.ops_backend":
            continue
        out.append(text)
    return out


def _load(cls, config: str | None, overrides: list[str], where: str):
    try:
        return load_config(cls, config, overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"{where}: {e}") from None


def _data_missing(data: dict) -> bool:
    return data["dataset"] in NEEDS_ROOT and not data["root"]


def make_plan(spec: ExperimentSpec, scale: str, out: str | Path, seeds: int = 1, only: list[str] | None = None,
              overrides: list[str] | None = None) -> Plan:
    """Every run and cell of the sweep (nothing runs here); every config resolved and validated up front."""
    if scale not in spec.scales:
        raise ConfigError(f"--scale {scale!r}: the spec {spec.name!r} has scales {sorted(spec.scales)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1; got {seeds}")
    tables = list(only or spec.tables)
    unknown = [t for t in tables if t not in spec.tables]
    if unknown:
        raise ConfigError(f"--only {' '.join(unknown)}: unknown table; the spec's tables are {sorted(spec.tables)}")
    overrides = list(overrides or [])
    common, per_table = _scoped_overrides(overrides, spec)
    plan = Plan(spec.name, scale, seeds, tables, overrides)
    out = Path(out)
    for name in tables:
        table = spec.tables[name]
        scoped = per_table.get(name, [])
        table_sets = common + scoped
        pretrain_sets = common + (scoped if table.pretrain_set else [])
        for seed in range(seeds):
            for variant, variant_sets in table.variants.items():
                for method in table.methods:
                    pretrain = _pretrain_run(plan, spec, scale, name, table, method, variant, variant_sets,
                                             pretrain_sets, seed)
                    _downstream_cells(plan, spec, scale, out, name, table, method, variant, pretrain, table_sets,
                                      seed)
            if table.random_init:
                _downstream_cells(plan, spec, scale, out, name, table, RANDOM_INIT, "", None, table_sets, seed,
                                  pretrain_sets)
    return plan


def _pretrain_run(plan: Plan, spec: ExperimentSpec, scale: str, table_name: str, table: TableSpec, method: str,
                  variant: str, variant_sets: list[str], table_sets: list[str], seed: int) -> Run | None:
    m = spec.methods[method]
    config = m.config.replace("{scale}", spec.scales[scale].configs or scale)
    sets = [*spec.scales[scale].pretrain, *m.set, *table.pretrain_set, *variant_sets,
            *_applicable(PretrainConfig, table_sets), f"train.seed={seed}"]
    where = f"tables.{table_name} method {method}" + (f" variant {variant!r}" if variant else "")
    cfg = _load(PretrainConfig, config, sets, where)
    values = to_dict(cfg)
    if _data_missing(values["data"]):
        return None
    run = Run(f"pt-{method}-{config_digest(values)}", "pretrain", values)
    plan.runs.setdefault(run.id, run)
    return run


def _downstream_cells(plan: Plan, spec: ExperimentSpec, scale: str, out: Path, table_name: str, table: TableSpec,
                      method: str, variant: str, pretrain: Run | None, table_sets: list[str], seed: int,
                      pretrain_sets: list[str] = ()) -> None:
    base = spec.downstream_config.get(table.mode)
    if base is not None:
        try:
            resolve_config_path(base)
        except FileNotFoundError as e:
            raise ConfigError(f"downstream_config.{table.mode}: {e}") from None
    random_init = method == RANDOM_INIT
    everything = set(pretrain.config["model"]["modalities"]) if pretrain else None
    for mods in table.modalities:
        run_mods = [] if everything is not None and set(mods) == everything else list(mods)  # "all": one run
        for fraction in table.label_fractions:
            cell = Cell(table_name, method, variant, list(mods), fraction, seed, None,
                        pretrain.id if pretrain else None)
            plan.cells.append(cell)
            if pretrain is None and not random_init:
                cell.status = "no data"
                continue
            scale_sets = getattr(spec.scales[scale], table.mode)
            sets = [*scale_sets, *table.downstream_set,
                    *_applicable(FinetuneConfig, table_sets, pretrained=not random_init),
                    f"task={table.task}", f"mode={table.mode}", f"label_fraction={fraction}",
                    f"label_seed={spec.label_seed}", f"train.seed={seed}", f"modalities={json.dumps(run_mods)}"]
            if random_init:  # the paper's method's architecture (or the first method's), randomly initialized
                arch = "mmfuse" if "mmfuse" in spec.methods else next(iter(spec.methods))
                m = spec.methods[arch]
                arch_cfg = _load(PretrainConfig, m.config.replace("{scale}", spec.scales[scale].configs or scale),
                                 [*m.set, *table.pretrain_set, *_applicable(PretrainConfig, pretrain_sets)],
                                 f"tables.{table_name} random init")
                sets.append(f"model={json.dumps(to_dict(arch_cfg.model))}")
            else:
                sets.append(f"pretrained={pretrain.run_dir(out)}")
            where = f"tables.{table_name} method {method} modalities {list(mods)} label_fraction {fraction}"
            cfg = _load(FinetuneConfig, base, sets, where)
            values = to_dict(cfg)
            if _data_missing(values["data"]):
                cell.status = "no data"
                continue
            identity = dict(values, pretrained=pretrain.id if pretrain else "")  # independent of where DIR is
            run = Run(f"ft-{config_digest(identity)}", "finetune", values, pretrain.id if pretrain else None)
            plan.runs.setdefault(run.id, run)
            cell.run = run.id
