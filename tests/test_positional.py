"""Positional encodings: RoPE layout and formulas, rotation properties, learned absolute PE resizing."""
import math

import pytest
import torch

from starkit.positional import (LearnedAbsolutePE, NormalizedRoPE2D, PositionalEncoding, RoPE2D, apply_rotary,
                                token_grid)

PNS = (1, 2, 3, 16, 64)


def _offsets(patch_nums):
    out, s = [], 0
    for pn in patch_nums:
        out.append(s)
        s += pn * pn
    return out


def _reference_angles(x, y, d, base):
    """Angles written out independently, one pair at a time (float64)."""
    n = d // 4
    ang = torch.empty(d // 2, dtype=torch.float64)
    for k in range(n):
        theta = base ** (-k / n)
        ang[k] = x * theta
        ang[n + k] = y * theta
    return ang


@pytest.mark.parametrize("pn", PNS)
def test_normalized_positions_match_formula(pn):
    norm, base, width, heads = 64.0, 10000.0, 256, 4  # head dim 64: 16 frequencies per axis
    rope = NormalizedRoPE2D(width, heads, (pn,), norm=norm, base=base)
    xy = rope.positions_xy()
    assert xy.shape == (pn * pn, 2) and rope.cos.shape == (pn * pn, 32)
    for t in range(pn * pn):
        i, j = divmod(t, pn)
        ex = 0.0 if pn == 1 else j * norm / (pn - 1)
        ey = 0.0 if pn == 1 else i * norm / (pn - 1)
        assert xy[t, 0].item() == ex and xy[t, 1].item() == ey
    # tables: a sample of tokens against the pair-by-pair reference
    for t in sorted({0, pn * pn - 1, (pn * pn) // 2, pn - 1}):
        i, j = divmod(t, pn)
        s = 0.0 if pn == 1 else norm / (pn - 1)
        ref = _reference_angles(j * s, i * s, 64, base)
        torch.testing.assert_close(rope.cos[t], ref.cos().float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(rope.sin[t], ref.sin().float(), atol=1e-6, rtol=0)


def test_theta_at_head_dim_64():
    rope = RoPE2D(64, 1, (2,), base=100.0)
    # token (0, 1): x = 1, y = 0 -> angle of x-pair k is theta_k = 100 ** (-k / 16); y-pairs 0
    ang = torch.atan2(rope.sin[1], rope.cos[1]).double()
    expected = torch.tensor([100.0 ** (-k / 16) for k in range(16)], dtype=torch.float64)
    torch.testing.assert_close(ang[:16], expected, atol=1e-6, rtol=0)
    assert torch.all(ang[16:] == 0)


def test_corners_align_across_scales():
    norm = 64.0
    rope = NormalizedRoPE2D(128, 2, PNS, norm=norm)
    corner = _reference_angles(norm, norm, 64, 10000.0)
    for off, pn in zip(_offsets(PNS), PNS):
        cos, sin = rope.rotary(slice(off, off + pn * pn))
        assert torch.all(cos[0] == 1) and torch.all(sin[0] == 0)  # (0, 0) -> x = y = 0
        if pn > 1:
            torch.testing.assert_close(cos[-1], corner.cos().float(), atol=1e-6, rtol=0)
            torch.testing.assert_close(sin[-1], corner.sin().float(), atol=1e-6, rtol=0)
            assert torch.equal(cos[-1], rope.cos[sum(p * p for p in PNS) - 1])  # same as the last scale's corner


def test_plain_positions_are_token_indices():
    rope = RoPE2D(64, 2, (1, 3, 5))
    _, rows, cols = token_grid((1, 3, 5))
    xy = rope.positions_xy()
    assert torch.equal(xy[:, 0], cols.double()) and torch.equal(xy[:, 1], rows.double())


def test_rotary_indexing_slice_and_tensor():
    rope = NormalizedRoPE2D(64, 2, (1, 2, 4))
    assert isinstance(rope, PositionalEncoding) and rope.absolute(slice(0, 5)) is None
    cos, sin = rope.rotary(slice(1, 5))
    assert cos.shape == (4, 16) and cos.dtype == torch.float32 and sin.dtype == torch.float32
    idx = torch.tensor([0, 3, 20])
    c2, s2 = rope.rotary(idx)
    assert torch.equal(c2, rope.cos[idx]) and c2.shape == (3, 16)


def test_no_tables_in_checkpoint_and_cast_proof():
    rope = NormalizedRoPE2D(64, 2, (1, 2, 4))
    assert rope.state_dict() == {}
    ref = rope.cos.clone()
    rope.to(torch.bfloat16)
    assert rope.cos.dtype == torch.float32 and torch.equal(rope.cos, ref)
    rope.half()
    assert rope.sin.dtype == torch.float32


def test_bad_head_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        RoPE2D(12, 2, (1, 2))  # head dim 6
    with pytest.raises(ValueError, match="divisible"):
        NormalizedRoPE2D(66, 4, (1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_complex_reference(dtype):
    torch.manual_seed(0)
    rope = NormalizedRoPE2D(128, 2, (1, 2, 3, 4), norm=32.0, base=100.0)
    B, H, L, d = 2, 2, rope.seq_len, 64
    x = torch.randn(B, H, L, d).to(dtype)
    cos, sin = rope.rotary(slice(None))
    out = apply_rotary(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    # independent reference: complex multiplication with the angles recomputed from positions
    ang = torch.stack([_reference_angles(px, py, d, 100.0) for px, py in rope.positions_xy().tolist()])  # (L, d/2)
    freqs = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)
    xc = torch.view_as_complex(x.float().reshape(B, H, L, d // 2, 2))
    ref = torch.view_as_real(xc * freqs).flatten(3).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    # norms of each rotary pair are preserved
    if dtype == torch.float32:
        pair = lambda t: t.reshape(B, H, L, d // 2, 2).norm(dim=-1)  # noqa: E731
        torch.testing.assert_close(pair(out), pair(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_apply_rotary_per_sample_tables():
    torch.manual_seed(1)
    rope = RoPE2D(64, 2, (4,))
    x = torch.randn(2, 2, 3, 32)
    idx = torch.tensor([[0, 5, 9], [1, 2, 15]])
    cos, sin = rope.rotary(idx)  # (2, 3, 16)
    out = apply_rotary(x, cos, sin)
    for b in range(2):
        torch.testing.assert_close(out[b:b + 1], apply_rotary(x[b:b + 1], *rope.rotary(idx[b])))


def test_relative_position_property():
    """After rotation, q.k depends only on the position difference (plain RoPE2D)."""
    torch.manual_seed(0)
    pns = (1, 3, 8)
    rope = RoPE2D(64, 1, pns)
    off = dict(zip(pns, _offsets(pns)))
    q = torch.randn(1, 1, 1, 64)
    k = torch.randn(1, 1, 1, 64)

    def score(tq, tk):
        qr = apply_rotary(q, *rope.rotary(torch.tensor([tq])))
        kr = apply_rotary(k, *rope.rotary(torch.tensor([tk])))
        return (qr * kr).sum().item()

    t = lambda pn, i, j: off[pn] + i * pn + j  # noqa: E731
    s1 = score(t(8, 1, 2), t(8, 3, 5))  # difference (2, 3)
    s2 = score(t(8, 4, 1), t(8, 6, 4))  # difference (2, 3)
    s3 = score(t(3, 0, 0), t(8, 2, 3))  # difference (2, 3), across scales
    s4 = score(t(8, 1, 2), t(8, 3, 6))  # difference (2, 4)
    assert s1 == pytest.approx(s2, abs=1e-4) and s1 == pytest.approx(s3, abs=1e-4)
    assert abs(s1 - s4) > 1e-3
    # same position -> plain dot product
    assert score(t(8, 2, 2), t(3, 2, 2)) == pytest.approx((q * k).sum().item(), abs=1e-4)


def test_learned_absolute_init_and_lookup():
    torch.manual_seed(0)
    pe = LearnedAbsolutePE(256, 4, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert pe.pos_1LC.shape == (1, pe.seq_len, 256) and pe.seq_len == 680
    assert pe.rotary(slice(0, 4)) is None
    assert pe.pos_1LC.std().item() == pytest.approx(math.sqrt(1 / (3 * 256)), rel=0.05)
    assert torch.equal(pe.absolute(slice(1, 5)), pe.pos_1LC[:, 1:5])
    idx = torch.tensor([0, 7, 100])
    assert pe.absolute(idx).shape == (1, 3, 256) and torch.equal(pe.absolute(idx)[0, 1], pe.pos_1LC[0, 7])
    assert list(dict(pe.named_parameters())) == ["pos_1LC"]
    assert LearnedAbsolutePE(32, 2, (1, 2), init_std=0.5).init_std == 0.5


def test_learned_absolute_resize():
    torch.manual_seed(0)
    old_pns, new_pns = (1, 2, 3, 4), (1, 2, 3, 5, 6)
    old = LearnedAbsolutePE(16, 2, old_pns)
    sd = {"gen.pos_enc." + k: v.clone() for k, v in old.state_dict().items()}
    new = LearnedAbsolutePE(16, 2, new_pns)
    new.resize_state_dict(sd, "gen.pos_enc.", old_pns)
    w = sd["gen.pos_enc.pos_1LC"]
    assert w.shape == (1, new.seq_len, 16)
    new.load_state_dict({"pos_1LC": w})
    oo, no = _offsets(old_pns), _offsets(new_pns)
    for k in range(3):  # unchanged scales: identical
        pn = new_pns[k]
        assert torch.equal(new.pos_1LC[:, no[k]:no[k] + pn * pn], old.pos_1LC[:, oo[k]:oo[k] + pn * pn])
    # scale 5 and the extra scale 6 both come from the nearest old scale (4), bicubic-resized
    src = old.pos_1LC[:, oo[3]:].transpose(1, 2).unflatten(2, (4, 4))  # (1, C, 4, 4)
    for k, pn in ((3, 5), (4, 6)):
        ref = torch.nn.functional.interpolate(src, size=(pn, pn), mode="bicubic", align_corners=False)
        torch.testing.assert_close(new.pos_1LC[:, no[k]:no[k] + pn * pn], ref.flatten(2).transpose(1, 2))
    # shrinking works too, and a missing key is left alone
    small = LearnedAbsolutePE(16, 2, (1, 2))
    sd2 = old.state_dict()
    small.resize_state_dict(sd2, "", old_pns)
    assert sd2["pos_1LC"].shape == (1, 5, 16) and torch.equal(sd2["pos_1LC"], old.pos_1LC[:, :5])
    empty = {}
    small.resize_state_dict(empty, "", old_pns)
    assert empty == {}
    with pytest.raises(ValueError, match="old_patch_nums"):
        small.resize_state_dict(old.state_dict(), "", (1, 2))


def _rotary_formula(x, cos, sin):
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_the_pairwise_formula_with_gradients(dtype):
    from starkit.positional import apply_rotary
    torch.manual_seed(0)
    base = torch.randn(2, 7, 3, 4, 16 + 1)[..., 1:]  # odd storage offset, non-contiguous
    x = base.permute(2, 0, 3, 1, 4)[1].to(dtype).requires_grad_(True)  # (B, H, l, d) view of a qkv-like buffer
    ang = torch.randn(7, 8)
    cos, sin = ang.cos(), ang.sin()
    out, ref = apply_rotary(x, cos, sin), _rotary_formula(x, cos, sin)
    assert out.dtype == dtype and torch.allclose(out.float(), ref.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(grad.float(), grad_ref.float(), atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("per_sample", [False, True])
def test_rotation_by_the_real_pair_equals_the_complex_multiplication(per_sample):
    """Compiled training blocks rotate with the real (cos, sin) pair (no complex code generation);
    it must equal the complex path, for shared and per-sample tables."""
    from starkit.positional import as_cis, rotate_float32
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    angles = torch.randn(2, 5, 4) if per_sample else torch.randn(5, 4)
    pair = (angles.cos(), angles.sin())
    assert torch.allclose(rotate_float32(x, pair), rotate_float32(x, as_cis(pair)), atol=1e-6)


def test_self_attention_rotates_queries_and_keys_as_written_out_here():
    """One SelfAttention with normalized 2D RoPE against attention written out here: qkv projection with VAR's
    biases (q, zero, v), L2-normalised queries (times the learned scale) and keys, BOTH rotated by the pairwise
    formula at their positions, softmax attention with scale 1, output projection."""
    from starkit.generator.blocks import SelfAttention
    torch.manual_seed(0)
    B, C, H, pns = 2, 32, 2, (1, 2, 3)
    attn = SelfAttention(C, H).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
        attn.qk_norm.scale_mul_1H11.uniform_(0.5, 2.0)
    rope = NormalizedRoPE2D(C, H, pns)
    L = sum(p * p for p in pns)
    x = torch.randn(B, L, C)
    cos, sin = rope.rotary(slice(0, L))
    with torch.no_grad():
        got = attn(x, rotary=(cos, sin))
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
        q, k, v = (x @ attn.mat_qkv.weight.T + bias).view(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4)
        scale = attn.qk_norm.scale_mul_1H11.clamp_max(math.log(100)).exp()
        q = _rotary_formula(q / q.norm(dim=-1, keepdim=True) * scale, cos, sin)
        k = _rotary_formula(k / k.norm(dim=-1, keepdim=True), cos, sin)
        out = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
        want = out @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
