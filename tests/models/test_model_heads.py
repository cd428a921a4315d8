import pytest
import torch

from mmfuse_fast.models import MMFuseMAE, MultiLabelClassifier

from _model_helpers import random_batch, small_cfg


def backbone():
    torch.manual_seed(0)
    return MMFuseMAE(small_cfg())


def test_linear_probe_freezes_backbone():
    clf = MultiLabelClassifier(backbone(), num_classes=19)
    clf.train()
    assert not clf.backbone.training and clf.head.training
    logits = clf(random_batch(small_cfg()))
    assert logits.shape == (4, 19)
    logits.sum().backward()
    assert clf.head.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in clf.backbone.parameters())
    assert [n for n, p in clf.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_fine_tune_trains_backbone():
    clf = MultiLabelClassifier(backbone(), num_classes=5, freeze_backbone=False)
    clf(random_batch(small_cfg())).sum().backward()
    assert clf.backbone.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("mods,pooling,dim", [(["s1"], "mean", 32), (None, "mean", 32), (None, "concat", 64)])
def test_modality_subsets_and_pooling(mods, pooling, dim):
    clf = MultiLabelClassifier(backbone(), modalities=mods, pooling=pooling)
    assert clf.head.in_features == dim
    batch = random_batch(small_cfg())
    if mods == ["s1"]:
        batch = {"s1": batch["s1"]}  # S2 absent entirely
    assert clf(batch).shape == (4, 19)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pooling"):
        MultiLabelClassifier(backbone(), pooling="max")
    with pytest.raises(ValueError, match="unknown modality .rgb."):
        MultiLabelClassifier(backbone(), modalities=["rgb"])
