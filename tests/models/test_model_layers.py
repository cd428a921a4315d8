import pytest
import torch

from mmfuse_fast import ops
from mmfuse_fast.models.layers import (Attention, Block, CrossBlock, ModalityTokenizer, PatchEmbed, set_backend,
                                       sincos_pos_embed_2d)

from _model_helpers import OpSpy


def test_sincos_and_patch_embed_shapes():
    pos = sincos_pos_embed_2d(16, 5)
    assert pos.shape == (25, 16) and torch.isfinite(pos).all()
    assert not torch.allclose(pos[0], pos[1])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, 5)
    pe = PatchEmbed(32, 8, 3, 16)
    assert pe(torch.randn(2, 3, 32, 32)).shape == (2, 16, 16)
    tok = ModalityTokenizer(32, 8, 3, 16)
    assert tok(torch.randn(2, 3, 32, 32)).shape == (2, 16, 16)
    assert "pos_embed" not in tok.state_dict()  # fixed, derived from the config


def test_block_respects_allow_and_calls_the_op(monkeypatch):
    spy = OpSpy(monkeypatch)
    torch.manual_seed(0)
    blk = Block(16, 2, backend="reference")
    x = torch.randn(2, 7, 16)
    full = blk(x, [3, 4])
    eye = blk(x, [3, 4], torch.eye(2, dtype=torch.bool))
    alone = torch.cat([blk(x[:, :3], [3]), blk(x[:, 3:], [4])], 1)
    assert spy.count("modality_attention") == 4
    torch.testing.assert_close(eye, alone)  # allow=eye == each set on its own
    assert not torch.allclose(full, eye)
    names = set(dict(blk.named_parameters()))
    assert {"norm1.weight", "attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.bias"} <= names


def test_cross_block_shapes_and_backend_switch(monkeypatch):
    spy = OpSpy(monkeypatch)
    blk = CrossBlock(16, 4, backend="reference")
    out = blk(torch.randn(2, 5, 16), torch.randn(2, 9, 16), [5], [4, 5])
    assert out.shape == (2, 5, 16)
    args, kwargs, _ = spy.calls["modality_attention"][0]
    assert kwargs["backend"] == "reference" and list(args[3]) == [5] and list(args[4]) == [4, 5]
    set_backend(blk, "auto")
    assert blk.attn.backend == "auto"
    assert {"attn.q.weight", "attn.kv.weight", "norm_kv.weight"} <= set(blk.state_dict())


def test_attention_never_uses_sdpa(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("SDPA called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", boom)
    Attention(16, 2, backend="reference")(torch.randn(1, 4, 16), [4])
