"""The reference ops are the oracle of every fast backend, so they are checked here against the most literal
formulation: per-sample, per-query loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmfuse_fast.ops import modality_attention, multiscale_infonce, random_boxes
from mmfuse_fast.ops.reference import modality_attention_reference, multiscale_infonce_reference


def literal_attention(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, scale):
    batch, heads, lq, _ = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    q_starts = [sum(q_segments[:i]) for i in range(len(q_segments))]
    kv_starts = [sum(kv_segments[:j]) for j in range(len(kv_segments))]
    for b in range(batch):
        for i, (qs, qn) in enumerate(zip(q_starts, q_segments)):
            n_queries = qn if q_used is None else int(q_used[b, i])
            keys = [
                kv_starts[j] + t
                for j, kn in enumerate(kv_segments)
                if allow[i, j]
                for t in range(kn if kv_used is None else int(kv_used[b, j]))
            ]
            if not keys:
                continue
            for row in range(qs, qs + n_queries):
                for h in range(heads):
                    scores = torch.stack([q[b, h, row].double() @ k[b, h, t].double() * scale for t in keys])
                    weights = torch.softmax(scores, 0)
                    out[b, h, row] = sum(w * v[b, h, t].double() for w, t in zip(weights, keys))
    return out


@pytest.mark.parametrize(
    "q_segments, kv_segments, allow, use_used",
    [
        ([5], [7], [[True]], False),
        ([3, 4], [3, 4], [[False, True], [True, False]], True),  # CAF: ~eye
        ([6], [2, 0, 3], [[True, True, True]], True),  # CMF with an empty set
        ([2, 3, 1], [4, 1], [[True, False], [False, False], [True, True]], True),  # a row with no key
    ],
)
def test_attention_reference_matches_literal_loops(q_segments, kv_segments, allow, use_used):
    torch.manual_seed(0)
    batch, heads, dim = 2, 2, 4
    q = torch.randn(batch, heads, sum(q_segments), dim)
    k = torch.randn(batch, heads, sum(kv_segments), dim)
    v = torch.randn(batch, heads, sum(kv_segments), dim)
    allow = torch.tensor(allow)
    q_used = kv_used = None
    if use_used:
        q_used = torch.stack([torch.randint(0, n + 1, (batch,)) for n in q_segments], 1).int()
        kv_used = torch.stack([torch.randint(0, n + 1, (batch,)) for n in kv_segments], 1).int()
    got = modality_attention(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, backend="reference")
    expected = literal_attention(q, k, v, q_segments, kv_segments, allow, q_used, kv_used, dim**-0.5)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_attention_reference_gradients_are_zero_where_nothing_is_seen():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    k = torch.randn(1, 1, 4, 8, requires_grad=True)
    v = torch.randn(1, 1, 4, 8, requires_grad=True)
    allow = torch.tensor([[False, False], [True, True]])
    out = modality_attention_reference(q, k, v, [2, 2], [2, 2], allow)
    out.sum().backward()
    assert torch.all(out[:, :, :2] == 0) and torch.all(q.grad[:, :, :2] == 0)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_attention_validation_names_the_problem():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="q_segments"):
        modality_attention(q, q, q, [2, 2], [5])
    with pytest.raises(ValueError, match="allow"):
        modality_attention(q, q, q, [5], [5], allow=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        modality_attention(q, q, q, [5], [5], backend="fast")


def literal_infonce(anchors, views, temperature, symmetric):
    losses = []
    for s in range(views.shape[0]):
        a = anchors if anchors.dim() == 2 else anchors[s]
        logits = a.double() @ views[s].double().T / temperature
        n = logits.shape[0]
        forward = -sum(logits[r, r] - torch.logsumexp(logits[r], 0) for r in range(n)) / n
        backward = -sum(logits[c, c] - torch.logsumexp(logits[:, c], 0) for c in range(n)) / n
        losses.append((forward + backward) / 2 if symmetric else forward)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shared_anchors", [True, False])
def test_infonce_reference_matches_literal_definition(symmetric, shared_anchors):
    torch.manual_seed(1)
    views = F.normalize(torch.randn(3, 7, 5), dim=-1)
    anchors = F.normalize(torch.randn(7, 5) if shared_anchors else torch.randn(3, 7, 5), dim=-1)
    got = multiscale_infonce(anchors, views, temperature=0.2, symmetric=symmetric, backend="reference")
    expected = literal_infonce(anchors, views, 0.2, symmetric)
    assert math.isclose(float(got), float(expected), rel_tol=1e-5)


def test_infonce_temperature_tensor_gets_a_gradient():
    anchors, views = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    temperature = torch.tensor(0.1, requires_grad=True)
    multiscale_infonce_reference(anchors, views, temperature).backward()
    assert temperature.grad is not None and torch.isfinite(temperature.grad)


def test_random_boxes_stay_inside_with_the_requested_area():
    generator = torch.Generator().manual_seed(0)
    boxes = random_boxes(2000, 120, 90, scale=(0.4, 0.6), generator=generator)
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1) / (120 * 90)
    assert torch.all(x1 >= 0) and torch.all(y1 >= 0) and torch.all(x2 <= 90 + 1e-4) and torch.all(y2 <= 120 + 1e-4)
    assert area.min() >= 0.4 - 1e-4 and area.max() <= 0.6 + 1e-4
    aspect = (x2 - x1) / (y2 - y1)
    assert aspect.min() >= 3 / 4 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    fixed = random_boxes(10, 120, 120, scale=(0.5, 0.5), generator=generator)
    fixed_area = (fixed[:, 2] - fixed[:, 0]) * (fixed[:, 3] - fixed[:, 1]) / 120**2
    torch.testing.assert_close(fixed_area, torch.full((10,), 0.5))
