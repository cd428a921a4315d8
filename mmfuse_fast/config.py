"""Configuration: YAML files mapped onto dataclasses, every key validated.

A config file is a nested mapping whose sections mirror the dataclasses below. `load_config` starts from the
dataclass defaults, applies the file, then `--set section.key=value` overrides, and refuses any key it does not
know (naming it, with the closest valid names) and any value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from mmfuse_fast.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"

S1_BANDS = ("VV", "VH")
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def require(condition: bool, key: str, message: str) -> None:
    """Raises ConfigError naming `key` unless `condition`."""
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


def require_finite(section, prefix: str) -> None:
    """Refuses NaN and infinity in every float field (and float list) of the dataclass `section`, whose keys are
    named `prefix + field`: no range check below can see a NaN (every comparison with it is false)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        items = value if isinstance(value, (list, tuple)) else (value,)
        require(all(math.isfinite(v) for v in items if isinstance(v, float)), prefix + f.name,
                f"must be a finite number; got {value}")


def require_at_least(section, prefix: str, minimum: int, *names: str) -> None:
    """Refuses each field of `names` of the dataclass `section` that is below `minimum`."""
    for name in names:
        value = getattr(section, name)
        require(value >= minimum, prefix + name, f"must be >= {minimum}; got {value}")


def require_masks_some_keeps_some(mask_ratio: float, n_tokens: int, key: str) -> None:
    """A masked-autoencoder mask ratio must keep a token (the encoder's input) and mask one (the loss's)."""
    require(0.0 <= mask_ratio < 1.0, key, f"must be in [0, 1); got {mask_ratio}")
    n_keep = int(n_tokens * (1 - mask_ratio))
    require(n_keep >= 1, key, f"{mask_ratio} keeps no token of the {n_tokens} per image")
    require(n_keep < n_tokens, key, f"{mask_ratio} masks no token of the {n_tokens} per image, and the "
            "reconstruction loss is a mean over the masked ones")


def require_known_modalities(modalities: dict[str, list[str]], dataset: str, key: str) -> None:
    """Refuses a modality, or a band of one, that `dataset` does not have, naming `key` and the known names."""
    from mmfuse_fast.data import format_bands  # the data package owns the bands; it never imports the config

    known = format_bands(dataset)
    if known is None:
        return
    for modality, bands in modalities.items():
        require(modality in known, key, f"names modality {modality!r}, which data.dataset={dataset} does not have; "
                f"known modalities: {', '.join(known)}")
        unknown = [b for b in bands if b not in known[modality]]
        require(not unknown, f"{key}.{modality}", f"names band(s) {', '.join(unknown)}, which {modality} of "
                f"data.dataset={dataset} does not have; known bands: {', '.join(known[modality])}")


# --- model sections: one config class per registered model ------------------------------------------------------

MODEL_CONFIGS: dict[str, type] = {}


def register_model_config(name: str):
    """Class decorator: the `model` section of a config whose `model.name` is `name` is validated against this
    dataclass (a subclass of BaseModelConfig), so every model brings its own keys."""

    def wrap(cls):
        if name in MODEL_CONFIGS and MODEL_CONFIGS[name] is not cls:
            raise ValueError(f"a model config is already registered as {name!r}: {MODEL_CONFIGS[name].__qualname__}")
        MODEL_CONFIGS[name] = cls
        return cls

    return wrap


def model_config_class(name: str) -> type:
    """The config class registered for `model.name` (importing the model registry if needed)."""
    if name not in MODEL_CONFIGS:
        import mmfuse_fast.models  # noqa: F401  (registers the built-in models and their configs)
    require(name in MODEL_CONFIGS, "model.name", f"is {name!r}; known models: {', '.join(sorted(MODEL_CONFIGS))}")
    return MODEL_CONFIGS[name]


@dataclass
class BaseModelConfig:
    """Keys every model has: the backbone contract's input side (docs/architecture.md, Models)."""

    name: str = "mmfuse"  # key in mmfuse_fast.models.MODELS
    modalities: dict[str, list[str]] = field(default_factory=lambda: {"s1": list(S1_BANDS), "s2": list(S2_BANDS)})
    img_size: int = 120
    patch_size: int = 8  # 120 / 8 = 15 x 15 = 225 tokens per modality
    embed_dim: int = 192
    ops_backend: str = "auto"  # auto | triton | reference

    def __post_init__(self):
        require_finite(self, "model.")
        require(len(self.modalities) >= 1, "model.modalities", "must name at least one modality")
        for name, bands in self.modalities.items():  # [] = every band the data declares, filled in at run start
            require(len(set(bands)) == len(bands), f"model.modalities.{name}",
                     f"must list distinct band names; got {bands}")
        require(self.patch_size >= 1, "model.patch_size", f"must be >= 1; got {self.patch_size}")
        require(self.img_size >= 1, "model.img_size", f"must be >= 1; got {self.img_size}")
        require(self.img_size >= self.patch_size and self.img_size % self.patch_size == 0, "model.patch_size",
                 f"must divide model.img_size={self.img_size}; got {self.patch_size}")
        require(self.embed_dim >= 1, "model.embed_dim", f"must be >= 1; got {self.embed_dim}")
        _one_of(self.ops_backend, ("auto", "triton", "reference"), "model.ops_backend")


@register_model_config("mmfuse")
@dataclass
class ModelConfig(BaseModelConfig):
    """The paper's model (mmfuse_fast/models/mmfuse.py)."""

    num_heads: int = 3
    stem_depth: int = 1  # per-modality blocks before fusion
    caf_depth: int = 1  # cross-attention fusion blocks
    encoder_depth: int = 4  # blocks over the concatenated fused tokens
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    consistent_mask: bool = False  # same masked positions in every modality
    norm_pix_loss: bool = True
    caf: bool = True
    cmf: bool = True
    contrastive: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 0.6])  # [r, r] for a fixed crop ratio r
    contrastive_weight: float = 0.5  # lambda
    temperature: float = 0.1
    proj_dim: int = 128
    sensor_drop: float = 0.0  # probability that one modality of a sample is dropped from the fusion (pretraining)
    encoder_fusion: str = "joint"  # joint: encoder blocks attend across modalities | separate: within each one
    decoder_context: str = "all"  # the CMF memory of a modality's decoder: all modalities | others (Fus-MAE)

    def __post_init__(self):
        super().__post_init__()
        require_at_least(self, "model.", 1, "num_heads", "decoder_heads", "decoder_dim", "proj_dim")
        require_at_least(self, "model.", 0, "stem_depth", "caf_depth", "encoder_depth", "decoder_depth")
        require(self.stem_depth + self.caf_depth * self.caf + self.encoder_depth >= 1, "model.encoder_depth",
                "leaves the encoder without a block (model.stem_depth, model.caf_depth with model.caf, and "
                "model.encoder_depth are all 0)")
        require(self.embed_dim % self.num_heads == 0, "model.num_heads", f"must divide embed_dim={self.embed_dim}")
        require(self.decoder_dim % self.decoder_heads == 0, "model.decoder_heads",
                 f"must divide decoder_dim={self.decoder_dim}")
        require(self.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0; got {self.mlp_ratio}")
        require_masks_some_keeps_some(self.mask_ratio, (self.img_size // self.patch_size) ** 2, "model.mask_ratio")
        require(self.contrastive_weight >= 0, "model.contrastive_weight",
                f"must be >= 0; got {self.contrastive_weight}")
        require(len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
                 "model.crop_scale", f"must be [lo, hi] with 0 < lo <= hi <= 1; got {self.crop_scale}")
        require(self.temperature > 0, "model.temperature", "must be positive")
        require(0.0 <= self.sensor_drop < 1.0, "model.sensor_drop", f"must be in [0, 1); got {self.sensor_drop}")
        require(self.sensor_drop == 0 or len(self.modalities) >= 2, "model.sensor_drop",
                "needs at least two modalities (one is always kept)")
        _one_of(self.encoder_fusion, ("joint", "separate"), "model.encoder_fusion")
        _one_of(self.decoder_context, ("all", "others"), "model.decoder_context")
        require(self.decoder_context == "all" or len(self.modalities) >= 2, "model.decoder_context",
                "'others' needs at least two modalities")


@dataclass
class DataConfig:
    dataset: str = "bigearthnet_v2"
    root: str = ""  # empty: the BigEarthNet v2 sample, fetched into the cache
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    drop_snow_cloud: bool = False
    on_error: str = "raise"  # raise | skip
    num_workers: int = 0
    # --- sen12ms / seg_tiles / packed (mmfuse_fast/data/{sen12ms,seg_tiles,pack}.py)
    modality_dirs: dict[str, str] = field(default_factory=dict)  # seg_tiles: modality -> folder (default: all)
    label_dir: str = "labels"  # seg_tiles: folder of the label tiles
    num_classes: int = 0  # seg_tiles: 0 = largest label found + 1
    ignore_index: int = 255  # seg_tiles: label value left out of the loss and the metrics
    reduce_zero_label: bool = False  # seg_tiles: label 0 is background (ignored), the others shift down by one
    stats_files: dict[str, str] = field(default_factory=dict)  # modality -> CSV of per-band mean, std
    seasons: list[str] = field(default_factory=list)  # sen12ms: subset of spring, summer, fall, winter
    # reader constructor arguments passed as they are (e.g. split_files, s2_root, band_names, class_names); they
    # override the keys above. None rather than {}: runs made before the key existed keep their config hash.
    options: Optional[dict[str, Any]] = None

    def __post_init__(self):
        _one_of(self.on_error, ("raise", "skip"), "data.on_error")
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        require(self.num_classes >= 0, "data.num_classes", "must be >= 0 (0: from the labels)")
        if self.options:
            from mmfuse_fast.data import DATASETS, check_reader_options

            if self.dataset in DATASETS:  # an unknown dataset is reported under its own key
                check_reader_options(self.dataset, self.options)


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 20
    min_lr: float = 0.0
    grad_clip: float = 1.0
    weight_decay_end: Optional[float] = None  # cosine schedule weight_decay -> this over the run; None: constant
    grad_clip_mode: str = "global"  # global: one norm over all gradients | per_parameter: each clipped alone (DINO)

    def __post_init__(self):
        require_finite(self, "optim.")
        require(self.lr > 0, "optim.lr", f"must be > 0; got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, optim.lr={self.lr}]; got {self.min_lr}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0; got {self.weight_decay}")
        require(self.weight_decay_end is None or self.weight_decay_end >= 0, "optim.weight_decay_end",
                f"must be >= 0 (or null: constant weight decay); got {self.weight_decay_end}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                f"must be [beta1, beta2] with each in [0, 1); got {self.betas}")
        require_at_least(self, "optim.", 0, "warmup_steps")
        require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0: no clipping); got {self.grad_clip}")
        _one_of(self.grad_clip_mode, ("global", "per_parameter"), "optim.grad_clip_mode")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # --- throughput engine (mmfuse_fast/engine/step.py); used by pretraining
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on the CPU) | bf16 | fp16 (dynamic loss scaling) | off
    cuda_graph: bool = True  # capture the whole step as one CUDA graph where possible (CUDA only)
    compile: bool = False  # torch.compile the model
    grad_accum_steps: int = 1  # micro-batches per optimizer step; batch_size is the global batch per step
    max_bad_steps: int = 10  # consecutive non-finite steps (skipped) that stop the run
    distributed: str = "ddp"  # ddp | fsdp2 (under torchrun)

    def __post_init__(self):
        require(self.steps >= 1, "train.steps", f"must be >= 1; got {self.steps}")
        require(self.seed >= 0, "train.seed", f"must be >= 0; got {self.seed}")
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "train.device",
                f"must be auto, cpu, cuda or cuda:<index>; got {self.device!r}")
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.log_every >= 1 and self.checkpoint_every >= 1, "train.log_every",
                 "and train.checkpoint_every must be >= 1")
        _one_of(self.amp, ("auto", "bf16", "fp16", "off"), "train.amp")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        require(self.batch_size % self.grad_accum_steps == 0, "train.batch_size",
                 f"must be a multiple of train.grad_accum_steps={self.grad_accum_steps}; got {self.batch_size}")
        require(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        _one_of(self.distributed, ("ddp", "fsdp2"), "train.distributed")


@dataclass
class PretrainConfig:
    model: BaseModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        require_known_modalities(self.model.modalities, self.data.dataset, "model.modalities")


@dataclass
class FinetuneConfig:
    pretrained: str = ""  # pretraining run directory or checkpoint; empty trains from scratch
    modalities: list[str] = field(default_factory=list)  # the backbone's modalities used (and read); empty: all
    task: str = "multilabel"  # multilabel (BigEarthNet) | scene (single-label, SEN12MS) | segmentation
    model: BaseModelConfig = field(default_factory=ModelConfig)  # the backbone when `pretrained` is empty
    seg_channels: int = 64  # segmentation: width of the FPN head
    eval_stride: int = 0  # segmentation: sliding-window stride in px for rasters larger than img_size (0: half)
    mode: str = "linear"  # linear (frozen encoder) | full
    label_fraction: float = 1.0
    label_seed: int = 0  # seed of the label_fraction draw (stratified; engine/finetune.py), independent of train.seed
    # --- full fine-tuning (MAE recipe: configs/finetune_full.yaml); no effect on a frozen backbone (mode linear)
    layer_decay: float = 1.0  # layer-wise lr decay: lr x layer_decay ** (depth + 1 - layer id); 1.0 = off
    drop_path: float = 0.0  # stochastic depth of the backbone's blocks, rising linearly to this over depth
    pooling: str = "mean"
    data: DataConfig = field(default_factory=lambda: DataConfig(splits=["train"]))
    eval_split: str = "test"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=8))

    def __post_init__(self):
        require_finite(self, "")
        _one_of(self.mode, ("linear", "full"), "mode")
        _one_of(self.task, ("multilabel", "scene", "segmentation"), "task")
        require_at_least(self, "", 1, "seg_channels")
        require(self.eval_stride >= 0, "eval_stride",
                f"must be >= 0 (0: half of model.img_size); got {self.eval_stride}")
        _one_of(self.pooling, ("mean", "concat"), "pooling")
        require(0.0 < self.label_fraction <= 1.0, "label_fraction", f"must be in (0, 1]; got {self.label_fraction}")
        require(self.label_seed >= 0, "label_seed", f"must be >= 0; got {self.label_seed}")
        require(0.0 < self.layer_decay <= 1.0, "layer_decay", f"must be in (0, 1] (1 = off); got {self.layer_decay}")
        require(0.0 <= self.drop_path < 1.0, "drop_path", f"must be in [0, 1); got {self.drop_path}")
        require(len(set(self.modalities)) == len(self.modalities), "modalities",
                f"must list distinct modality names; got {self.modalities}")
        if self.pretrained:  # the backbone, and so its modalities, come from the checkpoint
            require_known_modalities({m: [] for m in self.modalities}, self.data.dataset, "modalities")
        else:
            require_known_modalities(self.model.modalities, self.data.dataset, "model.modalities")
            unknown = [m for m in self.modalities if m not in self.model.modalities]
            require(not unknown, "modalities", f"names {unknown}, which the backbone does not have; its modalities "
                    f"(model.modalities): {', '.join(self.model.modalities)}")


# ---------------------------------------------------------------------------------------------------------------


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    if annotation is Any:  # passed through as written (reader options are checked by the reader's signature)
        return value
    origin = typing.get_origin(annotation)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _check_value(value, inner, key)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        if issubclass(annotation, BaseModelConfig):  # validated against the config class of model.name
            name = value.get("name", annotation.name)
            require(isinstance(name, str), f"{key}.name", f"must be a string, got {name!r}")
            annotation = model_config_class(name)
        return _from_dict(annotation, value, key + ".")
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_check_value(k, key_type, key): _check_value(v, item, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config annotation {annotation!r} for '{key}'")


def _from_dict(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    defaults = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid: {', '.join(names)})")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A partial section is laid over the section's own defaults (for a model section: the defaults of the
            # model it names, which need not be the default model).
            if isinstance(default, BaseModelConfig) and value.get("name", default.name) != default.name:
                default = model_config_class(value["name"])()
            value = dataclasses.asdict(default) | value
        kwargs[key] = _check_value(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, values: dict):
    """Builds `cls` from a (possibly partial) nested mapping; unknown keys and wrong types raise ConfigError."""
    return _from_dict(cls, values or {})


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'model.caf=false' -> ('model.caf', False); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a built-in config in mmfuse_fast/configs (tiny, small, base, ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if not builtin.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config named {name_or_path!r}; built-in configs: {', '.join(known)}")
    return builtin


def read_yaml(path: str | Path) -> dict:
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return values


def load_config(cls, config: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Defaults <- config file (name, path or mapping) <- `key=value` overrides; validated throughout."""
    if config is None:
        values: dict = {}
    elif isinstance(config, dict):
        values = dict(config)
    else:
        values = read_yaml(resolve_config_path(config))
    values = _deep_copy(values)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(values, key, value)
    config = from_dict(cls, values)
    config._given_keys = frozenset(_flat_keys(values))
    return config


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "modalities":
            out += _flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def given_keys(config) -> frozenset[str]:
    """The dotted keys a config file or `--set` gave explicitly (empty for a config built in code)."""
    return getattr(config, "_given_keys", frozenset())


def _deep_copy(d):
    return yaml.safe_load(yaml.safe_dump(d)) if d else {}


def save_config(config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
