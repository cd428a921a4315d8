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
