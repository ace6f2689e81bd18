"""Wire codecs: exact byte counts (DESIGN.md's DeepSeek-V3 numbers), byte layout, round-trip bounds."""

import pytest
import torch

from moeserve.distributed.wire import (E2M1_MIDPOINTS, E2M1_VALUES, bytes_as, e2m1_round, e2m1_value,
                                      make_codec)
from moeserve.kernels.fp8 import FP8_MAX, per_token_group_quant_fp8_ref


def test_bytes_per_token_deepseek_v3():
    h = 7168
    bf16 = make_codec("none", torch.bfloat16).bytes_per_token(h)
    fp8 = make_codec("fp8").bytes_per_token(h)
    mxfp4 = make_codec("mxfp4").bytes_per_token(h)
    assert (bf16, fp8, mxfp4) == (14_336, 7_392, 3_808)
    assert bf16 + bf16 == 28_672 and mxfp4 + fp8 == 11_200  # the round trips, a 2.56x cut
    assert round(28_672 / 11_200, 2) == 2.56
    x = torch.randn(3, h, dtype=torch.bfloat16)
    for name, n in (("none", bf16), ("fp8", fp8), ("mxfp4", mxfp4)):
        payload = make_codec(name, torch.bfloat16).encode(x)
        assert payload.dtype == torch.uint8 and payload.shape == (3, n)


def test_raw_codec_is_exact():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(5, 96).to(dtype)
        codec = make_codec("none", dtype)
        assert torch.equal(codec.decode(codec.encode(x), 96), x)


def test_fp8_layout_and_bound():
    torch.manual_seed(0)
    h = 7168 + 64  # a partial last group
    x = torch.randn(16, h) * torch.logspace(-3, 3, 16)[:, None]  # rows over six decades
    codec = make_codec("fp8", torch.float32)
    payload = codec.encode(x)
    groups = -(-h // 128)
    assert payload.shape == (16, h + 4 * groups)
    # Layout: e4m3 values, then fp32 scales; equal to the model's own per-1x128 activation quantization.
    q, scale = per_token_group_quant_fp8_ref(x, 128)
    assert torch.equal(payload[:, :h], q.view(torch.uint8))
    assert torch.equal(bytes_as(payload[:, h:], torch.float32), scale)
    y = codec.decode(payload, h)
    s = scale.repeat_interleave(128, dim=1)[:, :h]
    assert ((y - x).abs() <= 2 ** -4 * x.abs() + 2 ** -9 * s).all()  # half an ulp, subnormals included
    rel = ((y - x).norm() / x.norm()).item()
    assert rel < 0.03  # measured 0.026 on Gaussian rows


def test_e2m1_rounding_ties_to_even_and_saturates():
    grid = torch.tensor(E2M1_VALUES)
    assert torch.equal(e2m1_round(grid), torch.arange(8, dtype=torch.uint8))
    # Midpoint between codes k and k+1 goes to the even code.
    ties = e2m1_round(torch.tensor(E2M1_MIDPOINTS))
    assert ties.tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert e2m1_round(torch.tensor([6.5, 100.0, 0.26, 0.74])).tolist() == [7, 7, 1, 1]
    # Against brute force: nearest grid value, ties to the even code, saturating at 6.
    v = torch.cat([torch.rand(20000) * 8, torch.tensor(E2M1_MIDPOINTS), grid])
    dist = (v.clamp(max=6.0)[:, None] - grid[None]).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = (dist == best) & (torch.arange(8) % 2 == 0)
    expected = torch.where(ties.any(dim=1), ties.float().argmax(dim=1), dist.argmin(dim=1))
    assert torch.equal(e2m1_round(v).long(), expected)
    assert torch.equal(e2m1_value(torch.arange(16)), torch.cat([grid, -grid]))


def test_mxfp4_layout_and_bound():
    torch.manual_seed(0)
    h = 7168
    x = torch.randn(32, h) * torch.logspace(-4, 4, 32)[:, None]
    x[0, :32] = 0.0  # an all-zero block
    codec = make_codec("mxfp4", torch.float32)
    payload = codec.encode(x)
    assert payload.shape == (32, h // 2 + h // 32)
    # Scale byte = floor(log2(amax)) - 2 + 127 for each block of 32 (OCP MX).
    amax = x.view(32, -1, 32).abs().amax(dim=-1)
    nonzero = amax > 0
    expected = torch.floor(torch.log2(amax[nonzero])) - 2 + 127
    assert torch.equal(payload[:, h // 2:][nonzero].float(), expected)
    # Element 2i in the low nibble: a block of one known value.
    v = torch.zeros(1, 32)
    v[0, 0], v[0, 1] = 1.0, -6.0  # amax 6 -> X = 0; codes 2 and 8|7
    p = codec.encode(v)
    assert p[0, 0].item() == 2 | (15 << 4) and p[0, 16].item() == 127
    y = codec.decode(payload, h)
    assert torch.equal(y[0, :32], torch.zeros(32))
    blockmax = amax.repeat_interleave(32, dim=1)
    assert ((y - x).abs() <= blockmax / 4).all()  # half the widest step (4 -> 6), or the clamp at 6
    rel = ((y - x).norm() / x.norm()).item()
    assert 0.05 < rel < 0.13  # measured 0.115 on Gaussian rows


def test_mxfp4_rejects_unaligned_hidden():
    with pytest.raises(ValueError, match="hidden % 32"):
        make_codec("mxfp4").bytes_per_token(100)


def test_zero_rows_round_trip():
    for name in ("none", "fp8", "mxfp4"):
        codec = make_codec(name, torch.float32)
        payload = codec.encode(torch.zeros(0, 64))
        assert payload.shape == (0, codec.bytes_per_token(64))
        assert codec.decode(payload, 64).shape == (0, 64)


def test_unknown_codec():
    with pytest.raises(ValueError, match="unknown wire codec"):
        make_codec("int4")


def test_fp8_max_value():
    codec = make_codec("fp8", torch.float32)
    x = torch.tensor([[FP8_MAX * 3.0] + [1.0] * 127])
    assert torch.equal(codec.decode(codec.encode(x), 128)[0, 0], x[0, 0])  # amax maps to 448 exactly
