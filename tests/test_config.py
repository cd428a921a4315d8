import re

import pytest

from mmfuse_fast.config import ConfigError, FinetuneConfig, PretrainConfig, load_config


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_builtin_configs_load(name):
    config = load_config(PretrainConfig, name)
    assert config.model.embed_dim % config.model.num_heads == 0
    assert config.model.img_size % config.model.patch_size == 0


def test_overrides_and_partial_sections_keep_section_defaults():
    config = load_config(FinetuneConfig, {"data": {"root": "/data"}}, ["train.steps=5", "optim.lr=1e-2"])
    assert config.data.root == "/data" and config.data.splits == ["train"]  # finetune's own default kept
    assert config.train.steps == 5 and config.optim.lr == 0.01


@pytest.mark.parametrize(
    "values, overrides, message",
    [
        ({"model": {"embed_dimm": 3}}, [], "model.embed_dimm.*did you mean model.embed_dim"),
        ({}, ["model.caf=3"], "model.caf"),
        ({}, ["train.steps=1.5"], "train.steps"),
        ({"optimizer": {}}, [], "'optimizer'"),
        ({}, ["model.crop_scale=0.5"], "model.crop_scale"),
    ],
)
def test_bad_keys_and_values_are_named(values, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, values, overrides)


def test_unknown_config_name_lists_the_builtin_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config(PretrainConfig, "huge")


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.crop_scale=[0.7, 0.3]", "model.crop_scale"),
        ("model.mask_ratio=1.0", "model.mask_ratio"),
        ("model.patch_size=7", "model.patch_size"),
        ("model.ops_backend=fast", "model.ops_backend"),
        ("data.on_error=ignore", "data.on_error"),
    ],
)
def test_out_of_range_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(PretrainConfig, None, [override])


def test_finetune_choices_are_checked():
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(FinetuneConfig, None, ["label_fraction=0"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(FinetuneConfig, None, ["mode=frozen"])


def _shipped_configs():
    from mmfuse_fast.config import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", _shipped_configs())
def test_every_shipped_config_loads(name):
    load_config(FinetuneConfig if name.startswith("finetune") else PretrainConfig, name)


NONSENSE = [  # (model name or None for tiny's, override(s), key named in the error)
    (None, "optim.weight_decay=-0.1", "optim.weight_decay"),
    (None, "optim.weight_decay_end=-0.1", "optim.weight_decay_end"),
    (None, "optim.lr=.nan", "optim.lr"),
    (None, "optim.lr=nan", "optim.lr"),
    (None, "optim.lr=.inf", "optim.lr"),
    (None, "optim.lr=0", "optim.lr"),
    (None, "optim.lr=-1e-3", "optim.lr"),
    (None, "optim.min_lr=-1e-6", "optim.min_lr"),
    (None, "optim.min_lr=1.0", "optim.min_lr"),  # above optim.lr: the cosine would climb
    (None, "optim.betas=[1.0, 0.95]", "optim.betas"),
    (None, "optim.betas=[0.9, 1.5]", "optim.betas"),
    (None, "optim.betas=[-0.1, 0.95]", "optim.betas"),
    (None, "optim.betas=[0.9]", "optim.betas"),
    (None, "optim.betas=[0.9, .nan]", "optim.betas"),
    (None, "optim.grad_clip=-1", "optim.grad_clip"),
    (None, "optim.grad_clip=.nan", "optim.grad_clip"),
    (None, "optim.warmup_steps=-1", "optim.warmup_steps"),
    (None, "train.seed=-1", "train.seed"),
    (None, "train.steps=0", "train.steps"),
    (None, "train.batch_size=0", "train.batch_size"),
    (None, "train.device=gpu", "train.device"),
    (None, "model.contrastive_weight=.nan", "model.contrastive_weight"),
    (None, "model.contrastive_weight=.inf", "model.contrastive_weight"),
    (None, "model.contrastive_weight=-0.5", "model.contrastive_weight"),
    (None, "model.temperature=.inf", "model.temperature"),
    (None, "model.temperature=0", "model.temperature"),
    (None, "model.patch_size=0", "model.patch_size"),
    (None, "model.img_size=0", "model.img_size"),
    (None, "model.num_heads=0", "model.num_heads"),
    (None, "model.decoder_heads=0", "model.decoder_heads"),
    (None, "model.embed_dim=0", "model.embed_dim"),
    (None, "model.embed_dim=100", "model.num_heads"),  # 100 is not divisible by 3 heads
    (None, "model.decoder_dim=0", "model.decoder_dim"),
    (None, "model.decoder_dim=130", "model.decoder_heads"),
    (None, "model.proj_dim=0", "model.proj_dim"),
    (None, "model.encoder_depth=-1", "model.encoder_depth"),
    (None, "model.decoder_depth=-1", "model.decoder_depth"),
    (None, "model.mlp_ratio=0", "model.mlp_ratio"),
    (None, "model.mlp_ratio=.inf", "model.mlp_ratio"),
    (None, "model.mask_ratio=0.9999", "model.mask_ratio"),  # keeps no token of 225
    (None, "model.mask_ratio=0", "model.mask_ratio"),  # masks none: the reconstruction loss would be 0 / 0
    (None, "model.mask_ratio=.nan", "model.mask_ratio"),
    (None, "model.sensor_drop=.nan", "model.sensor_drop"),
    (None, "model.modalities={s3: [B01]}", "model.modalities"),
    (None, "model.modalities={s2: [B02, B13]}", "model.modalities.s2"),
    ("satvit", "model.decoder_dim=0", "model.decoder_dim"),
    ("satvit", "model.mask_ratio=0", "model.mask_ratio"),
    ("satvit", "model.depth=0", "model.depth"),
    ("satvit", "model.mlp_ratio=.nan", "model.mlp_ratio"),
    ("fus_mae", ("model.caf=false", "model.encoder_depth=0"), "model.encoder_depth"),  # no stem: no block left
    ("dino_mm", "model.teacher_temp=.inf", "model.teacher_temp"),
    ("dino_mm", "model.student_temp=0", "model.student_temp"),
    ("dino_mm", "model.momentum_teacher=.nan", "model.momentum_teacher"),
    ("dino_mm", "model.global_crop_scale=[0.4, .inf]", "model.global_crop_scale"),
    ("dino_mm", "model.num_heads=0", "model.num_heads"),
]


@pytest.mark.parametrize("model,override,key", NONSENSE, ids=[f"{m or 'mmfuse'}:{o}" for m, o, _ in NONSENSE])
def test_nonsense_values_are_refused_naming_the_key(model, override, key):
    overrides = [override] if isinstance(override, str) else list(override)
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}' "):
        load_config(PretrainConfig, "tiny" if model is None else None,
                    [f"model.name={model}"] * (model is not None) + overrides)


def test_unknown_modality_and_band_list_the_known_ones():
    with pytest.raises(ConfigError, match="modality 's3'.*known modalities: s1, s2"):
        load_config(PretrainConfig, None, ["model.modalities={s3: [B01]}"])
    with pytest.raises(ConfigError, match="band.* B10.*known bands: B01, .*B12"):
        load_config(PretrainConfig, None, ["model.modalities={s2: [B02, B10]}"])
    sen12ms = load_config(PretrainConfig, None, ["data.dataset=sen12ms", "model.modalities={s2: [B02, B10]}"])
    assert sen12ms.model.modalities == {"s2": ["B02", "B10"]}  # SEN12MS has the cirrus band
    tiles = load_config(PretrainConfig, None, ["data.dataset=seg_tiles", "model.modalities={hsi: [band_1]}"])
    assert tiles.model.modalities == {"hsi": ["band_1"]}  # the tiles on disk declare their bands


def test_finetune_modalities_must_be_the_backbones():
    with pytest.raises(ConfigError, match=r"^config key 'modalities' names \['s3'\].*s1, s2"):
        load_config(FinetuneConfig, None, ["modalities=[s3]"])
    with pytest.raises(ConfigError, match=r"^config key 'modalities' names modality 's3'"):
        load_config(FinetuneConfig, None, ["pretrained=runs/pt", "modalities=[s3]"])
    assert load_config(FinetuneConfig, None, ["modalities=[s2]"]).modalities == ["s2"]


@pytest.mark.parametrize("override,key", [("eval_stride=-1", "eval_stride"), ("seg_channels=0", "seg_channels"),
                                          ("layer_decay=.nan", "layer_decay"), ("optim.lr=.inf", "optim.lr")])
def test_finetune_values_are_named(override, key):
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}' "):
        load_config(FinetuneConfig, None, [override])


def test_configs_built_in_code_are_validated_too():
    from mmfuse_fast.config import OptimConfig, TrainConfig

    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="train.seed"):
        TrainConfig(seed=-3)


@pytest.mark.parametrize("argv,key", [
    (["pretrain", "--set", "optim.weight_decay=-0.05"], "optim.weight_decay"),
    (["pretrain", "--set", "model.modalities={s2: [B13]}"], "model.modalities.s2"),
    (["finetune", "--set", "optim.betas=[0.9, 1.0]"], "optim.betas"),
])
def test_nonsense_values_exit_2_in_one_line(argv, key, tmp_path, capsys):
    from mmfuse_fast.cli import main

    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
