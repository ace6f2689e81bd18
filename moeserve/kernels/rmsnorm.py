"""RMSNorm, and RMSNorm fused with the residual add that precedes it.

The Triton kernels do one launch per call (a block of rows per program) where the reference
does about six elementwise kernels; a decode step calls these a few times per layer.

The input may be a fused MoE's rows before their sum (fused_moe.ExpertRows): the kernel then sums each
token's expert rows as fused_moe's last launch would (same order, same roundings), one launch and a [T, H]
round trip less a MoE layer.

`fp8_group`: the norm also quantizes its output per 1 x group (e4m3 + one fp32 scale a group, bit
for bit what fp8.per_token_group_quant_fp8 makes of the output), for a consumer that runs W8A8 FP8
GEMMs: the quantization then costs no launch of its own.
"""

from __future__ import annotations

import torch

from moeserve.kernels.fused_moe import ExpertRows


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalises in fp32, casts back, then scales (transformers' order of operations)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rmsnorm(residual'), residual')."""
    residual = x + residual
    return rmsnorm_ref(residual, weight, eps), residual


Fp8Rows = tuple[torch.Tensor, torch.Tensor]  # (e4m3 [T, n], fp32 scales [T, ceil(n / group)])


def rmsnorm_quant_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      group: int) -> tuple[torch.Tensor, torch.Tensor, Fp8Rows]:
    """(out, residual', out quantized per 1 x group), residual' = x + residual (x itself without one)."""
    from moeserve.kernels.fp8 import per_token_group_quant_fp8_ref

    out, residual = (rmsnorm_ref(x, weight, eps), x) if residual is None else fused_add_rmsnorm_ref(
        x, residual, weight, eps)
    return out, residual, per_token_group_quant_fp8_ref(out.reshape(-1, out.shape[-1]), group)


# ---------------------------------------------------------------------------------------------
# Triton kernels. Triton is optional (CPU installs may lack it); without it the public names
# are the references.
# ---------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
    from moeserve.kernels.fp8 import FP8_DTYPE, FP8_MAX, _quant_group_tile
    from moeserve.kernels.fused_moe import _sum_expert_rows
    from moeserve.kernels.pdl import pdl_begin, pdl_launch
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None

if triton is not None:

    @triton.jit(do_not_specialize=["num_rows"])
    def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, q_ptr, s_ptr, ids_ptr, add_ptr, num_rows, n, eps,
                        x_heads, stride_xt, stride_xh, stride_r, stride_out, stride_r_out, stride_q, stride_s,
                        stride_add, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                        QUANT_GROUP: tl.constexpr = 0, FP8_MAX_C: tl.constexpr = 448.0, FAST: tl.constexpr = False,
                        SUM_ROWS: tl.constexpr = 0, HAS_ADD: tl.constexpr = False, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < num_rows) & (cols[None, :] < n)
        if SUM_ROWS:  # x: a fused MoE's expert rows (ExpertRows), SUM_ROWS a token
            x = _sum_expert_rows(x_ptr, ids_ptr, add_ptr, rows, cols, mask, num_rows, stride_xt, stride_add,
                                 SUM_ROWS, HAS_ADD, ROWS, BLOCK)
        else:
            x_rows = (rows // x_heads) * stride_xt + (rows % x_heads) * stride_xh  # row (t, h) of x
            x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            # Round the sum to the residual stream's dtype first: the norm reads what is stored.
            x = (x + r.to(tl.float32)).to(r_out_ptr.dtype.element_ty)
            tl.store(r_out_ptr + rows[:, None] * stride_r_out + cols[None, :], x, mask=mask)
            x = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / n + eps)
        # As the reference: cast the normalised row to the input's dtype, then scale in fp32
        # (torch's opmath for bf16/fp16 products) and round once to the output dtype.
        if HAS_RESIDUAL:
            y = (x * inv[:, None]).to(r_out_ptr.dtype.element_ty)
        else:
            y = (x * inv[:, None]).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
        out = (w[None, :] * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out, mask=mask)
        if QUANT_GROUP > 0:
            # The stored (rounded) output, one scale group a row of the reshaped tile; columns past
            # n are zeros (masked loads), as the separate quant kernel pads them.
            q, scale = _quant_group_tile(tl.reshape(out.to(tl.float32), (ROWS * (BLOCK // QUANT_GROUP), QUANT_GROUP)),
                                         FP8_MAX_C, FAST)
            q = tl.reshape(q, (ROWS, BLOCK))
            tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
            grp = tl.arange(0, BLOCK // QUANT_GROUP)
            tl.store(s_ptr + rows[:, None] * stride_s + grp[None, :], tl.reshape(scale, (ROWS, BLOCK // QUANT_GROUP)),
                     mask=(rows[:, None] < num_rows) & (grp[None, :] * QUANT_GROUP < n))


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] with unit column stride; a view when the layout allows."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _input_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, heads, token stride, head stride): row t * heads + h of x [..., n] starts at
    t * token stride + h * head stride. Heads of [T, H, n] are read in place, whatever the token
    stride (the q or k columns of a merged q/k/v projection's output); else one head per row."""
    if x.dim() == 3 and x.stride(-1) == 1:
        return x, x.shape[1], x.stride(0), x.stride(1)
    x2 = _as_rows(x)
    return x2, 1, x2.stride(0), 0


def _launch(x, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, group: int = 0):
    # x: a tensor, or a fused MoE's ExpertRows (summed by the kernel)
    n = x.shape[-1]
    device = x.device
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=device)
    r_out = None if residual is None else torch.empty(x.shape, dtype=res_dtype, device=device)
    out2 = out.view(-1, n)
    num_rows = out2.shape[0]
    fp8 = None
    if group:
        fp8 = (torch.empty(num_rows, n, dtype=FP8_DTYPE, device=device),
               torch.empty(num_rows, -(-n // group), dtype=torch.float32, device=device))
    if num_rows == 0:
        return out, r_out, fp8
    sum_rows, ids, add = 0, out2, None  # ids and add: stand-in pointers unless x is ExpertRows
    if isinstance(x, ExpertRows):
        sum_rows, ids, add = x.ids.shape[1], x.ids.contiguous(), x.addend
        add = add if add is None or add.stride(-1) == 1 else add.contiguous()
        x2, heads, stride_xt, stride_xh = _as_rows(x.rows), 1, x.rows.stride(0), 0
    else:
        x2, heads, stride_xt, stride_xh = _input_rows(x)
    r2 = out2 if residual is None else _as_rows(residual)
    r_out2 = out2 if r_out is None else r_out.view(-1, n)
    block = max(triton.next_power_of_2(n), group)  # a quantized row is whole groups
    rows = max(1, min(16, 2048 // block))  # short rows (per-head q/k norms): several per program
    q, s = fp8 if fp8 is not None else (out2, out2)  # not written without a group
    _rmsnorm_kernel[(triton.cdiv(num_rows, rows),)](
        x2, r2, weight, out2, r_out2, q, s, ids, add if add is not None else out2, num_rows, n, eps,
        heads, stride_xt, stride_xh, r2.stride(0), out2.stride(0), r_out2.stride(0), q.stride(0), s.stride(0),
        add.stride(0) if add is not None else 0, HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block,
        QUANT_GROUP=group, FP8_MAX_C=FP8_MAX, FAST=device.type == "cuda", SUM_ROWS=sum_rows,
        HAS_ADD=add is not None, num_warps=min(16, max(1, rows * block // 256)), **pdl_launch(device))
    return out, r_out, fp8


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm_ref over the last dim of x [..., n] in one launch; returns a new contiguous tensor."""
    assert weight.is_contiguous() and weight.shape == (x.shape[-1],)
    return _launch(x, None, weight, eps)[0]


def rmsnorm_quant_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                         group: int) -> tuple[torch.Tensor, torch.Tensor, Fp8Rows]:
    """rmsnorm_quant_ref in one launch."""
    assert weight.is_contiguous() and weight.shape == (x.shape[-1],) and group > 0 and group & (group - 1) == 0
    assert residual is None or residual.shape == x.shape
    out, r_out, fp8 = _launch(x, residual, weight, eps, group)
    return out, x if residual is None else r_out, fp8


def fused_add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rmsnorm_ref in one launch; both outputs are new contiguous tensors."""
    assert weight.is_contiguous() and weight.shape == (x.shape[-1],) and residual.shape == x.shape
    return _launch(x, residual, weight, eps)[:2]


def _use_triton(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """CUDA, or CPU under the interpreter in fp32/fp16 (bf16 is wrong there)."""
    from moeserve.kernels.fp8 import triton_runs_on

    if triton is None or not triton_runs_on(x, *others):
        return False
    return x.is_cuda or all(t.dtype in (torch.float32, torch.float16) for t in (x, *others) if t.is_floating_point())


def _summed_unless_triton(x, *others: torch.Tensor):
    """(x, whether the Triton kernel runs): x is a tensor or ExpertRows, summed first (fused_moe's sum
    launch) where the kernel cannot read the rows itself."""
    if isinstance(x, ExpertRows):
        if _use_triton(x.rows, *others):
            return x, True
        x = x.sum()
    return x, _use_triton(x, *others)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, use_triton = _summed_unless_triton(x, weight)
    if use_triton:
        return rmsnorm_triton(x, weight, eps)
    return rmsnorm_ref(x, weight, eps)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x, use_triton = _summed_unless_triton(x, residual, weight)
    if use_triton:
        return fused_add_rmsnorm_triton(x, residual, weight, eps)
    return fused_add_rmsnorm_ref(x, residual, weight, eps)


def rmsnorm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  group: int) -> tuple[torch.Tensor, torch.Tensor, Fp8Rows]:
    """(rmsnorm(x + residual), x + residual, that output quantized per 1 x group); without a
    residual, (rmsnorm(x), x, ...). x may be a fused MoE's ExpertRows (with a residual)."""
    x, use_triton = _summed_unless_triton(x, weight, *([residual] if residual is not None else []))
    if use_triton:
        return rmsnorm_quant_triton(x, residual, weight, eps, group)
    return rmsnorm_quant_ref(x, residual, weight, eps, group)
