import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from mmfuse_fast.cli import main
from mmfuse_fast.config import FinetuneConfig, load_config
from mmfuse_fast.data import DataFileError
from mmfuse_fast.data.synthetic import write_seg_tiles, write_tif
from mmfuse_fast.engine.finetune import finetune
from mmfuse_fast.engine.predict import predict

TINY = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=16", "model.num_heads=2",
        "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_depth=1", "model.encoder_depth=1",
        "model.mlp_ratio=2.0", "model.ops_backend=reference", "train.device=cpu", "train.steps=2",
        "train.batch_size=2", "eval_split=", "seg_channels=8"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    root = write_seg_tiles(tmp / "tiles", n=4, size=16, modalities={"rgb": (3, 1), "sar": (2, 0.5)}, num_classes=4)
    cfg = load_config(FinetuneConfig, {"task": "segmentation", "mode": "full",
                                       "data": {"dataset": "seg_tiles", "root": str(root), "num_classes": 4},
                                       "model": {"modalities": {"rgb": ["rgb_0", "rgb_1", "rgb_2"],
                                                                "sar": ["sar_0", "sar_1"]}}}, TINY)
    finetune(cfg, tmp / "run", progress=False)
    return tmp / "run", tmp


def scene(tmp, h=40, w=30, crs="EPSG:32633", nodata=-9999.0):
    rng = np.random.default_rng(0)
    rgb = rng.normal(100, 20, (3, h, w)).astype(np.float32)
    rgb[:, :3, :4] = nodata
    sar = rng.normal(100, 20, (2, h // 2, w // 2)).astype(np.float32)
    a = write_tif(tmp / "rgb.tif", rgb, nodata=nodata, origin=(412345.0, 5123450.0),
                  descriptions=["rgb_2", "rgb_1", "rgb_0"])  # bands found by name, not by position
    b = write_tif(tmp / "sar.tif", sar, crs=crs, pixel_size=20.0, origin=(412345.0, 5123450.0))
    return a, b


def test_predict_keeps_the_georeferencing(seg_run, tmp_path):
    run, _ = seg_run
    rgb, sar = scene(tmp_path)
    result = predict(run, {"rgb": rgb, "sar": sar}, tmp_path / "out")
    with rasterio.open(rgb) as src, rasterio.open(result["class_map"]) as out:
        assert out.crs == src.crs and out.transform == src.transform and out.nodata == src.nodata
        assert (out.height, out.width, out.count) == (40, 30, 1)
        classes = out.read(1)
    assert (classes[:3, :4] == -9999).all()
    valid = classes[classes != -9999]
    assert valid.size == 40 * 30 - 12 and valid.min() >= 0 and valid.max() < 4
    assert result["nodata_pixels"] == 12 and sum(result["class_counts"]) == valid.size
    png = (tmp_path / "out" / "rgb_preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") > 256  # map + legend


def test_predict_writes_label_values_names_and_colour_table(tmp_path):
    """A run trained with reduce_zero_label predicts classes 0..2 for label values 1..3: the map holds 1..3 as the
    label rasters do, with a colour table and the class names, and the preview has a legend."""
    root = write_seg_tiles(tmp_path / "tiles", n=4, size=16, modalities={"rgb": (3, 1)}, num_classes=4)
    cfg = load_config(FinetuneConfig, {"task": "segmentation", "mode": "full",
                                       "data": {"dataset": "seg_tiles", "root": str(root),
                                                "reduce_zero_label": True, "num_classes": 3},
                                       "model": {"modalities": {"rgb": ["rgb_0", "rgb_1", "rgb_2"]}}}, TINY)
    finetune(cfg, tmp_path / "run", progress=False)
    image = write_tif(tmp_path / "scene.tif", np.random.default_rng(1).normal(100, 20, (3, 20, 20)).astype(np.float32),
                      descriptions=["rgb_0", "rgb_1", "rgb_2"])
    result = predict(tmp_path / "run", [image], tmp_path / "out")
    assert result["label_values"] == [1, 2, 3] and len(result["classes"]) == 3
    with rasterio.open(result["class_map"]) as out:
        values = out.read(1)
        assert out.dtypes[0] == "uint8" and values.min() >= 1 and values.max() <= 3
        colours = out.colormap(1)
        assert len({colours[v] for v in (1, 2, 3)}) == 3
        assert out.tags(1)["CLASS_1"] == result["classes"][0]
    assert sum(result["class_counts"]) == 400
    assert Path(result["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_bad_inputs(seg_run, tmp_path, capsys):
    run, _ = seg_run
    rgb, sar = scene(tmp_path, crs="EPSG:4326")
    with pytest.raises(DataFileError, match="sar.tif: CRS"):
        predict(run, {"rgb": rgb, "sar": sar}, tmp_path / "out")
    with pytest.raises(ValueError, match="takes modalities"):
        predict(run, {"rgb": rgb, "s1": sar}, tmp_path / "out")
    with pytest.raises(ValueError, match="name the inputs"):
        predict(run, [rgb, sar], tmp_path / "out")
    assert main(["predict", "--run-dir", str(run), "--input", f"rgb={tmp_path / 'missing.tif'}", "--input",
                 f"sar={sar}", "--out", str(tmp_path / "o")]) == 2
    assert "missing.tif" in capsys.readouterr().err
    for inputs in ([f"rgb={rgb}", f"s1={sar}"], [str(rgb), str(sar)]):  # inputs of another model: one line
        argv = [a for i in inputs for a in ("--input", i)]
        assert main(["predict", "--run-dir", str(run), *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "mmfuse predict: error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rgb_ok, sar_ok = scene(tmp_path / "ok")
    assert main(["predict", "--run-dir", str(run), "--input", f"rgb={rgb_ok}", "--input", f"sar={sar_ok}",
                 "--out", str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [40, 30]
