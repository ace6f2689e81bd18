"""FP8 (e4m3) block-scaled quantization, DeepSeek's format.

Weights: one fp32 scale per 128x128 block (`weight_scale_inv`, multiplied in to dequantize).
Activations: one fp32 scale per 1x128 group of a row.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


def dequant_block_fp8_ref(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128),
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [..., N, K] fp8, scale [..., ceil(N/bn), ceil(K/bk)] -> w * scale broadcast per block."""
    bn, bk = block
    n, k = w.shape[-2:]
    s = scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return (w.to(torch.float32) * s.to(torch.float32)).to(dtype)


def quant_block_fp8_ref(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w [..., N, K] to e4m3 with one scale per block (amax / 448), DeepSeek's checkpoint format."""
    bn, bk = block
    n, k = w.shape[-2:]
    pn, pk = -n % bn, -k % bk
    wp = torch.nn.functional.pad(w.to(torch.float32), (0, pk, 0, pn))
    lead = wp.shape[:-2]
    blocks = wp.reshape(*lead, (n + pn) // bn, bn, (k + pk) // bk, bk)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, n + pn, k + pk)[..., :n, :k].to(FP8_DTYPE)
    return q.contiguous(), scale.to(torch.float32)


def per_token_group_quant_fp8_ref(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, ceil(K/group)])."""
    m, k = x.shape
    pad = -k % group_size
    xp = torch.nn.functional.pad(x.to(torch.float32), (0, pad)).view(m, -1, group_size)
    scale = xp.abs().amax(dim=-1).clamp(min=1e-10) / FP8_MAX
    q = (xp / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, -1)[:, :k].to(FP8_DTYPE)
    return q.contiguous(), scale


def block_fp8_matmul_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """y = quant(x) @ dequant(w).T with x quantized per 1 x block[1] group, as the FP8 kernel computes it.

    x [M, K] (bf16/fp32), w [N, K] e4m3, w_scale [ceil(N/bn), ceil(K/bk)] -> [M, N] in x.dtype.
    """
    xq, xs = per_token_group_quant_fp8_ref(x, block[1])
    k = x.shape[1]
    x_deq = xq.to(torch.float32) * xs.repeat_interleave(block[1], dim=1)[:, :k]
    w_deq = dequant_block_fp8_ref(w, w_scale, block)
    return (x_deq @ w_deq.t()).to(x.dtype)


block_fp8_matmul = block_fp8_matmul_ref
per_token_group_quant_fp8 = per_token_group_quant_fp8_ref
