import math

import numpy as np
import pytest
import torch

from mmfuse_fast.engine.metrics import (MultiLabelMetrics, average_precision, f1_samples, map_macro, map_micro,
                                        multilabel_metrics)

sk = pytest.importorskip("sklearn.metrics")


def _sk_macro(y, s):
    cols = [k for k in range(y.shape[1]) if y[:, k].sum() > 0]
    return float(np.mean([sk.average_precision_score(y[:, k], s[:, k]) for k in cols]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,k", [(1, 3), (7, 5), (50, 19)])
def test_matches_sklearn_random(seed, n, k):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.float32)
    y[0, 0] = 1  # at least one positive overall
    s = rng.normal(size=(n, k)).astype(np.float32)
    assert map_micro(s, y) == pytest.approx(sk.average_precision_score(y.ravel(), s.ravel()), abs=1e-9)
    assert map_macro(s, y) == pytest.approx(_sk_macro(y, s), abs=1e-9)
    pred = (s >= 0).astype(int)
    assert f1_samples(s, y) == pytest.approx(sk.f1_score(y, pred, average="samples", zero_division=0), abs=1e-9)


def test_ties_and_quantized_scores():
    rng = np.random.default_rng(3)
    y = (rng.random((40, 6)) < 0.4).astype(np.float32)
    s = np.round(rng.random((40, 6)) * 3) / 3  # many tied scores
    for j in range(6):
        if y[:, j].sum():
            assert average_precision(s[:, j], y[:, j]) == pytest.approx(sk.average_precision_score(y[:, j], s[:, j]))
    assert map_micro(s, y) == pytest.approx(sk.average_precision_score(y.ravel(), s.ravel()))


def test_class_without_positives_is_left_out_of_macro():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float32)  # class 2 has no positive
    s = np.array([[0.9, 0.1, 0.8], [0.2, 0.7, 0.1], [0.6, 0.4, 0.5]], dtype=np.float32)
    m = multilabel_metrics(s, y)
    assert math.isnan(m["ap_per_class"][2])
    assert m["n_classes_scored"] == 2
    assert m["map_macro"] == pytest.approx(_sk_macro(y, s))
    # all-negative input: nothing to score
    assert math.isnan(map_micro(s, np.zeros_like(y)))
    assert math.isnan(map_macro(s, np.zeros_like(y)))


def test_f1_edge_cases():
    y = np.array([[0, 0], [1, 0], [0, 0], [1, 1]], dtype=np.float32)
    logits = np.array([[-1, -1], [-1, -1], [2, -2], [0.0, 3]], dtype=np.float32)  # logit 0 -> p = 0.5 -> positive
    pred = (logits >= 0).astype(int)
    assert f1_samples(logits, y) == pytest.approx(sk.f1_score(y, pred, average="samples", zero_division=0))


def test_accumulator_equals_whole_set():
    rng = np.random.default_rng(5)
    y = torch.from_numpy((rng.random((33, 19)) < 0.2).astype(np.float32))
    s = torch.from_numpy(rng.normal(size=(33, 19)).astype(np.float32))
    acc = MultiLabelMetrics()
    for lo in range(0, 33, 8):
        acc.update(s[lo:lo + 8], y[lo:lo + 8])
    got, want = acc.compute(), multilabel_metrics(s, y)
    for key in ("map_micro", "map_macro", "f1_samples", "n_samples"):
        assert got[key] == want[key]
    assert got["n_samples"] == 33
    with pytest.raises(ValueError):
        MultiLabelMetrics().compute()
