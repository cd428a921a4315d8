"""Experiment specs: which pretraining runs and which downstream cells make up a set of tables.

A spec is YAML validated like a config (unknown keys and wrong types are errors that name the key):

    methods:  {name: {config: "satvit_{scale}", label: SatViT, set: [KEY=VALUE, ...]}}
    scales:   {tiny: {pretrain: [...], linear: [...], full: [...], note: "..."}}
    tables:   {table2: {title, task, methods, variants, modalities, label_fractions, mode, metrics,
                        pretrain_set, downstream_set, random_init, paper}}

Every list of KEY=VALUE strings is a list of config overrides (`--set` syntax) applied to the runs it concerns; a
run is the product of its config file and these overrides, so the config system validates every key. The built-in
spec `paper` (mmfuse_fast/configs/experiments/paper.yaml) lays out the paper's tables; a user's spec is any YAML
path with the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmfuse_fast.config import CONFIG_DIR, from_dict, read_yaml, require
from mmfuse_fast.errors import ConfigError

__all__ = ["MethodSpec", "ScaleSpec", "TableSpec", "ExperimentSpec", "load_spec", "SPEC_DIR", "RANDOM_INIT",
           "column_label", "modalities_label"]

SPEC_DIR = CONFIG_DIR / "experiments"
RANDOM_INIT = "random_init"  # the method name of the random-initialization rows
TASKS = ("multilabel", "scene", "segmentation")


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class MethodSpec:
    config: str = "{scale}"  # the pretraining config; "{scale}" is replaced by the sweep's scale
    label: str = ""  # the name shown in the report (default: the method's key)
    set: list[str] = field(default_factory=list)  # overrides of every pretraining run of the method


@dataclass
class ScaleSpec:
    configs: str = ""  # what "{scale}" becomes in the methods' config names (default: the scale's own name)
    pretrain: list[str] = field(default_factory=list)  # overrides of every pretraining run at this scale
    linear: list[str] = field(default_factory=list)  # ... of every linear-probe run
    full: list[str] = field(default_factory=list)  # ... of every full fine-tuning run
    note: str = ""  # what the numbers at this scale can and cannot say (shown in the report)


@dataclass
class TableSpec:
    title: str = ""
    task: str = "multilabel"  # multilabel | scene | segmentation
    methods: list[str] = field(default_factory=list)  # keys of `methods`
    variants: dict[str, list[str]] = field(default_factory=lambda: {"": []})  # row label -> pretraining overrides
    modalities: list[list[str]] = field(default_factory=lambda: [[]])  # downstream subsets; [] = all of them
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    mode: str = "linear"  # linear | full
    metrics: list[str] = field(default_factory=lambda: ["map_micro", "map_macro"])  # reported, in this order
    pretrain_set: list[str] = field(default_factory=list)  # overrides of this table's pretraining runs
    downstream_set: list[str] = field(default_factory=list)  # overrides of this table's downstream runs
    random_init: bool = False  # add a row of a randomly initialized backbone (the floor of the metric)
    paper: dict[str, dict[str, float]] = field(default_factory=dict)  # row label -> column label -> value (%)
    paper_note: str = ""


@dataclass
class ExperimentSpec:
    name: str = ""
    description: str = ""
    label_seed: int = 0  # the label-fraction draw's seed, the same for every cell (independent of the seeds)
    downstream_config: dict[str, str] = field(default_factory=dict)  # mode -> base FinetuneConfig (name or path)
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    scales: dict[str, ScaleSpec] = field(default_factory=dict)
    tables: dict[str, TableSpec] = field(default_factory=dict)

    def validate(self) -> "ExperimentSpec":
        """The checks across keys (types were checked while loading); raises ConfigError naming the key."""
        require(bool(self.methods), "methods", "must name at least one method")
        require(bool(self.scales), "scales", "must name at least one scale")
        require(bool(self.tables), "tables", "must name at least one table")
        require(self.label_seed >= 0, "label_seed", f"must be >= 0; got {self.label_seed}")
        for mode in self.downstream_config:
            _one_of(mode, ("linear", "full"), f"downstream_config.{mode}")
        for name, m in self.methods.items():
            require(name != RANDOM_INIT, f"methods.{name}", f"is reserved for the random-initialization rows")
            require("{scale}" in m.config or Path(m.config).suffix in (".yaml", ".yml"), f"methods.{name}.config",
                    f"must contain '{{scale}}' or be a YAML path; got {m.config!r}")
        for name, t in self.tables.items():
            key = f"tables.{name}"
            _one_of(t.task, TASKS, f"{key}.task")
            _one_of(t.mode, ("linear", "full"), f"{key}.mode")
            require(bool(t.methods), f"{key}.methods", "must name at least one method")
            unknown = [m for m in t.methods if m not in self.methods]
            require(not unknown, f"{key}.methods", f"names unknown methods {unknown}; the spec's methods are "
                                                   f"{sorted(self.methods)}")
            require(bool(t.variants), f"{key}.variants", "must hold at least one variant ('' for none)")
            require(bool(t.modalities) and bool(t.label_fractions) and bool(t.metrics), f"{key}",
                    "needs non-empty modalities, label_fractions and metrics")
            for f in t.label_fractions:
                require(0 < f <= 1, f"{key}.label_fractions", f"must be in (0, 1]; got {f}")
            rows, cols = set(row_labels(self, t)), set(column_labels(t))
            for row, values in t.paper.items():
                require(row in rows, f"{key}.paper.{row}", f"is not a row of the table (rows: {sorted(rows)})")
                bad = [c for c in values if c not in cols]
                require(not bad, f"{key}.paper.{row}", f"names unknown columns {bad} (columns: {sorted(cols)})")
        return self

    def method_label(self, method: str) -> str:
        if method == RANDOM_INIT:
            return "random init"
        return self.methods[method].label or method


def modalities_label(modalities) -> str:
    return "+".join(modalities) if modalities else "all"


def fraction_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def column_label(table: TableSpec, modalities, fraction: float, metric: str) -> str:
    """The column of a cell's metric: the dimensions of the table that take more than one value, joined."""
    parts = []
    if len(table.modalities) > 1:
        parts.append(modalities_label(modalities))
    if len(table.label_fractions) > 1:
        parts.append(fraction_label(fraction))
    if len(table.metrics) > 1 and len(parts) == 0:
        parts.append(metric)
    return " ".join(parts) or metric


def column_labels(table: TableSpec) -> list[str]:
    out = []
    for mods in table.modalities:
        for fraction in table.label_fractions:
            for metric in table.metrics:
                label = column_label(table, mods, fraction, metric)
                if label not in out:
                    out.append(label)
    return out


def row_label(spec: ExperimentSpec, table: TableSpec, method: str, variant: str) -> str:
    """Rows are the variants when the table has several, else the methods."""
    if method == RANDOM_INIT:
        return spec.method_label(method)
    return variant if len(table.variants) > 1 else spec.method_label(method)


def row_labels(spec: ExperimentSpec, table: TableSpec) -> list[str]:
    rows = [row_label(spec, table, m, v) for v in table.variants for m in table.methods]
    if table.random_init:
        rows.append(spec.method_label(RANDOM_INIT))
    return list(dict.fromkeys(rows))


def load_spec(name_or_path: str | Path) -> ExperimentSpec:
    """A built-in spec by name (`paper`) or a YAML path; every key validated (ConfigError naming it)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        builtin = SPEC_DIR / f"{name_or_path}.yaml"
        if not builtin.exists():
            known = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
            raise ConfigError(f"--spec {name_or_path!r}: no such file and no built-in spec of that name "
                              f"(built-in: {', '.join(known)})")
        path = builtin
    if not path.exists():
        raise ConfigError(f"--spec {path}: no such file")
    try:
        values = read_yaml(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"spec {path} is not valid YAML: {' '.join(str(e).split())}") from None
    values.setdefault("name", path.stem)
    try:
        return from_dict(ExperimentSpec, values).validate()
    except ConfigError as e:
        raise ConfigError(f"spec {path}: {e}") from None
