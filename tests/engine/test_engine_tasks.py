import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score, top_k_accuracy_score

from mmfuse_fast.config import FinetuneConfig, load_config
from mmfuse_fast.data import PackedDataset, SegmentationTiles, pack_dataset
from mmfuse_fast.data.synthetic import write_sen12ms
from mmfuse_fast.engine.evaluate import evaluate, load_classifier
from mmfuse_fast.engine.finetune import finetune
from mmfuse_fast.engine.predict import predict
from mmfuse_fast.engine.metrics import SegmentationMetrics, scene_metrics
from mmfuse_fast.models.segmentation import sliding_window_logits

TINY = ["model.patch_size=8", "model.embed_dim=16", "model.num_heads=2", "model.decoder_dim=16",
        "model.decoder_heads=2", "model.decoder_depth=1", "model.encoder_depth=2", "model.mlp_ratio=2.0",
        "model.ops_backend=reference", "train.device=cpu", "train.log_every=2", "train.checkpoint_every=100"]


def test_scene_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g)
    targets = torch.randint(0, 10, (200,), generator=g)
    targets[targets == 7] = 3  # a class that is never true; predictions of it still count
    m = scene_metrics(logits, targets, 10)
    pred = logits.argmax(1).numpy()
    y = targets.numpy()
    assert m["top1"] == pytest.approx(accuracy_score(y, pred))
    assert m["top3"] == pytest.approx(top_k_accuracy_score(y, logits.numpy(), k=3, labels=range(10)))
    for key, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        assert m[key] == pytest.approx(fn(y, pred, average="weighted", zero_division=0, labels=range(10)))
    assert m["recall"] == pytest.approx(m["top1"])  # weighted recall is accuracy


def test_segmentation_metrics_match_sklearn():
    g = torch.Generator().manual_seed(1)
    metrics = SegmentationMetrics(num_classes=6, ignore_index=255)
    preds, targets = [], []
    for _ in range(3):  # accumulated over batches, one confusion matrix
        logits = torch.randn(2, 6, 9, 7, generator=g)
        target = torch.randint(0, 5, (2, 9, 7), generator=g)  # class 5 never true
        target[:, 0] = 255
        metrics.update(logits, target)
        preds.append(logits.argmax(1).flatten())
        targets.append(target.flatten())
    m = metrics.compute()
    pred, y = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    keep = y != 255
    pred, y = pred[keep], y[keep]
    present = sorted(set(y) | set(pred))
    assert m["miou"] == pytest.approx(jaccard_score(y, pred, labels=present, average="macro"))
    assert m["oa"] == pytest.approx(accuracy_score(y, pred))
    assert m["mean_f1"] == pytest.approx(f1_score(y, pred, labels=present, average="macro"))
    assert m["n_pixels"] == keep.sum()


def test_sliding_window_equals_direct_for_a_pointwise_model():
    conv = torch.nn.Conv2d(3, 4, 1)

    def model(batch):
        assert batch["x"].shape[-2:] == (8, 8)
        return conv(batch["x"])

    x = torch.randn(2, 3, 21, 13)
    out = sliding_window_logits(model, {"x": x}, window=8, num_classes=4, stride=5)
    assert out.shape == (2, 4, 21, 13)
    assert torch.allclose(out, conv(x), atol=1e-5)
    small = torch.randn(1, 3, 6, 5)  # smaller than a window: padded, cropped back
    assert sliding_window_logits(model, {"x": small}, 8, 4).shape == (1, 4, 6, 5)


def test_scene_classification_end_to_end(tmp_path):
    root = write_sen12ms(tmp_path / "sen", size=16, patches_per_scene=3)
    (root / "train.txt").write_text("ROIs1158_spring_1_p30\nROIs1158_spring_1_p31\nROIs1868_summer_7_p30\n"
                                    "ROIs1868_summer_7_p31\n")
    (root / "test.txt").write_text("ROIs1158_spring_1_p32\nROIs1868_summer_7_p32\n")
    pack_dataset("sen12ms", root, tmp_path / "packed", progress=False)
    cfg = load_config(FinetuneConfig, {"task": "scene", "mode": "full", "data": {"dataset": "packed",
                      "root": str(tmp_path / "packed")},
                      "model": {"modalities": {"s1": ["VV", "VH"], "s2": ["B02", "B03", "B04", "B08"]}}},
                      TINY + ["model.img_size=16", "train.steps=3", "train.batch_size=2"])
    result = finetune(cfg, tmp_path / "run", progress=False)
    ev = result["eval"]
    assert ev["task"] == "scene" and ev["n_samples"] == 2 and {"top1", "top3", "precision", "recall", "f1"} <= set(ev)
    info = json.loads((tmp_path / "run" / "task.json").read_text())
    assert info["num_classes"] == 10 and info["classes"][0] == "Forest"
    model, _, _ = load_classifier(tmp_path / "run")
    test = PackedDataset(tmp_path / "packed", split="test", bands=model.backbone.cfg.modalities)
    batch = {k: torch.stack([test[i][k] for i in range(2)]) for k in ("s1", "s2", "label")}
    with torch.no_grad():
        pred = model(batch).argmax(1)
    assert ev["top1"] == pytest.approx(accuracy_score(batch["label"].numpy(), pred.numpy()))


def test_segmentation_end_to_end_on_enmap(tmp_path, enmap_root):
    names = SegmentationTiles(enmap_root, split="test", modalities={"hsi": "images"}, num_classes=6,
                              reduce_zero_label=True, normalize=False).bands["hsi"]
    # the README's recipe: every band the tiles declare (no list of 224 names), class names, reduce_zero_label
    class_names = ["c1", "c2", "c3", "c4", "c5", "c6"]
    data = {"dataset": "seg_tiles", "root": str(enmap_root), "modality_dirs": {"hsi": "images"},
            "reduce_zero_label": True, "stats_files": {"hsi": str(enmap_root / "Normalize_Bands.csv")},
            "options": {"class_names": class_names}}
    cfg = load_config(FinetuneConfig, {"task": "segmentation", "mode": "full", "data": data, "seg_channels": 16,
                                       "model": {"modalities": {"hsi": []}}},
                      TINY + ["model.img_size=32", "train.steps=4", "train.batch_size=2", "optim.lr=1e-3"])
    result = finetune(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(result["metrics"]["loss"])
    assert load_config(FinetuneConfig, tmp_path / "run" / "config.yaml").model.modalities == {"hsi": list(names)}
    tile = next((enmap_root / "images").glob("*.tif"))
    predicted = predict(tmp_path / "run", {"hsi": tile}, tmp_path / "predicted")
    assert predicted["classes"] == class_names and predicted["label_values"] == [1, 2, 3, 4, 5, 6]
    ev = evaluate(tmp_path / "run", split="test", progress=False)
    assert ev["task"] == "segmentation" and ev["n_pixels"] == 660  # labelled test pixels (classes 1-6)
    # the same predictions scored with scikit-learn
    model, _, _ = load_classifier(tmp_path / "run")
    test = SegmentationTiles(enmap_root, split="test", modalities={"hsi": "images"}, num_classes=6,
                             reduce_zero_label=True, stats={"hsi": str(enmap_root / "Normalize_Bands.csv")})
    preds, ys = [], []
    with torch.no_grad():
        for i in range(len(test)):
            s = test[i]
            preds.append(model({"hsi": s["hsi"][None]}).argmax(1).flatten())
            ys.append(s["label"].flatten())
    pred, y = torch.cat(preds).numpy(), torch.cat(ys).numpy()
    keep = y != 255
    present = sorted(set(y[keep]) | set(pred[keep]))
    assert ev["miou"] == pytest.approx(jaccard_score(y[keep], pred[keep], labels=present, average="macro"))
    assert ev["oa"] == pytest.approx(accuracy_score(y[keep], pred[keep]))
    assert ev["mean_f1"] == pytest.approx(f1_score(y[keep], pred[keep], labels=present, average="macro"))
