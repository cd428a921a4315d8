"""Backend names and dispatch of the ops, the custom-op namespace, and the layering of ops/ and kernels/."""

import ast
from pathlib import Path

import pytest
import torch

from mmfuse_fast.errors import ConfigError
from mmfuse_fast.ops import _backend, _extension, check_backend_available, crop_resize, modality_attention, \
    multiscale_infonce

PACKAGE = Path(__file__).resolve().parents[2] / "mmfuse_fast"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved against its package)."""
    package = "mmfuse_fast." + ".".join(path.relative_to(PACKAGE).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _uses(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


@pytest.mark.parametrize("path", sorted((PACKAGE / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_never_import_ops(path):
    assert not _uses(_imported_modules(path), "mmfuse_fast.ops")


def test_shared_infonce_math_imports_neither_ops_nor_kernels():
    names = _imported_modules(PACKAGE / "infonce_math.py")
    assert not _uses(names, "mmfuse_fast.ops") and not _uses(names, "mmfuse_fast.kernels")


def test_one_custom_op_namespace():
    pytest.importorskip("triton")
    import mmfuse_fast.kernels.infonce  # noqa: F401  (registers its custom ops)
    import mmfuse_fast.kernels.modality_attention  # noqa: F401

    ours = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("mmfuse")}
    expected = {"mmfuse::infonce_fwd", "mmfuse::infonce_bwd", "mmfuse::modality_attention_fwd",
                "mmfuse::modality_attention_bwd", "mmfuse::modality_attention_bwd_packed"}
    if _extension.AVAILABLE:
        expected |= {"mmfuse::crop_resize", "mmfuse::crop_resize_backward"}
    assert ours == expected


@pytest.mark.parametrize("op,call", [
    ("modality_attention", lambda b: modality_attention(*(torch.zeros(1, 1, 2, 4),) * 3, [2], [2], backend=b)),
    ("multiscale_infonce", lambda b: multiscale_infonce(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), backend=b)),
    ("crop_resize", lambda b: crop_resize(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0.0, 4.0, 4.0]]), (2, 2),
                                          backend=b)),
])
def test_unknown_backend_lists_the_valid_names(op, call):
    with pytest.raises(ValueError, match=f"{op}: unknown backend 'cuda'; expected one of "
                                         + ", ".join(_backend.OP_BACKENDS[op])):
        call("cuda")


def test_auto_on_cuda_picks_triton_except_float64():
    if not _backend.triton_available():
        pytest.skip("triton is not installed")
    for op, fallback in (("modality_attention", "reference"), ("multiscale_infonce", "chunked")):
        assert _backend.resolve("auto", "cuda", op) == "triton"
        assert _backend.resolve("auto", "cuda", op, dtype=torch.float64) == fallback
        assert _backend.resolve("auto", "cpu", op) == fallback
        assert _backend.resolve("reference", "cuda", op) == "reference"
    assert _backend.resolve("chunked", "cpu", "multiscale_infonce") == "chunked"


def test_crop_resize_takes_the_model_backend_names():
    fast = "extension" if _extension.has_kernel("crop_resize", "cpu") else "reference"
    assert _backend.resolve("auto", "cpu", "crop_resize") == fast
    assert _backend.resolve("triton", "cpu", "crop_resize") == fast
    assert _backend.resolve("reference", "cpu", "crop_resize") == "reference"
    images = torch.rand(2, 3, 8, 8)
    boxes = torch.tensor([[0.0, 1.0, 5.0, 8.0], [2.0, 0.0, 8.0, 6.0]])
    want = crop_resize(images, boxes, (4, 4), backend="auto")
    torch.testing.assert_close(crop_resize(images, boxes, (4, 4), backend="triton"), want, rtol=0, atol=0)
    torch.testing.assert_close(crop_resize(images, boxes, (4, 4), backend="reference"), want)


def test_triton_that_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend.triton_available():
        with pytest.raises(RuntimeError, match="backend='triton' cannot run here: the device is cpu"):
            _backend.resolve("triton", "cpu", "modality_attention")
    monkeypatch.setattr(_backend, "_TRITON_INSTALLED", False)
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        _backend.resolve("triton", "cuda", "multiscale_infonce")


def test_check_backend_available(monkeypatch):
    for name in ("auto", "reference"):
        check_backend_available(name, "cpu")
    with pytest.raises(ConfigError, match="'model.ops_backend' is 'fast'; expected one of auto, triton, reference"):
        check_backend_available("fast", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend.triton_available():
        check_backend_available("triton", "cuda")
        check_backend_available("triton", torch.device("cuda", 0))
        with pytest.raises(ConfigError, match="config key 'model.ops_backend' is 'triton' but Triton cannot run "
                                              "here: the device is cpu"):
            check_backend_available("triton", "cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        check_backend_available("triton", "cpu")
    monkeypatch.setattr(_backend, "_TRITON_INSTALLED", False)
    with pytest.raises(ConfigError, match="Triton cannot run here: the triton package is not installed"):
        check_backend_available("triton", "cuda")
