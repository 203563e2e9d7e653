"""The quantizer's resizes as matrix products (starkit.tokenizers.resize) equal F.interpolate."""
import pytest
import torch
import torch.nn.functional as F

from starkit.tokenizers.resize import resize, resize_matrix

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_1024 = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 32, 40, 48, 64)
SIZE_PAIRS = sorted({(p, 16) for p in PN_256} | {(16, p) for p in PN_256}
                    | {(p, 64) for p in PN_1024} | {(64, p) for p in PN_1024})


def reference(x, size, mode):
    return F.interpolate(x, size=size, mode=mode, **({"align_corners": False} if mode == "bicubic" else {}))


@pytest.mark.parametrize("mode", ["bicubic", "area"])
@pytest.mark.parametrize("n_in,n_out", SIZE_PAIRS)
def test_equals_interpolate(mode, n_in, n_out):
    x = torch.randn(2, 3, n_in, n_in, generator=torch.Generator().manual_seed(n_in * 100 + n_out))
    out = resize(x, (n_out, n_out), mode)
    assert out.shape == (2, 3, n_out, n_out) and out.dtype == torch.float32
    assert (out - reference(x, (n_out, n_out), mode)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["bicubic", "area"])
def test_non_square_and_gradients(mode):
    x = torch.randn(2, 3, 5, 13, dtype=torch.float32, requires_grad=True)
    g = torch.randn(2, 3, 16, 10)
    ours = torch.autograd.grad((resize(x, (16, 10), mode) * g).sum(), x)[0]
    ref = torch.autograd.grad((reference(x, (16, 10), mode) * g).sum(), x)[0]
    assert (ours - ref).abs().max() < 1e-5
    assert (resize(x, (16, 10), mode) - reference(x, (16, 10), mode)).abs().max() < 1e-5


def test_fp32_under_autocast_and_matrices_built_in_inference_mode():
    resize_matrix.cache_clear()
    x = torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        resize(x, (16, 16), "bicubic")  # builds the cached matrices here
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resize(x, (16, 16), "bicubic")
    assert out.dtype == torch.float32 and (out - reference(x, (16, 16), "bicubic")).abs().max() < 1e-5
    out.sum().backward()  # the cached matrices are usable with autograd
    assert x.grad is not None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        resize(torch.zeros(1, 1, 2, 2), (4, 4), "bilinear")


def test_tracing_with_fake_tensors_leaves_the_cache_usable():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from starkit.tokenizers.resize import resize, resize_matrix
    resize_matrix.cache_clear()
    with FakeTensorMode():
        out = resize(torch.randn(2, 3, 5, 5), (11, 11), "bicubic")
        assert out.shape == (2, 3, 11, 11)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(resize(x, (11, 11), "bicubic"),
                               F.interpolate(x, size=(11, 11), mode="bicubic", align_corners=False), rtol=0, atol=1e-5)
