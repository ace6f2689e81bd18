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



# ---------------------------------------------------------------------------------------------
# Triton kernels. Triton is optional (CPU installs may lack it); without it the names above
# stay the references.
# ---------------------------------------------------------------------------------------------
import os  # noqa: E402

try:  # noqa: E402
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None

from moeserve.kernels import moe_config  # noqa: E402


def triton_runs_on(*tensors: torch.Tensor) -> bool:
    """True where the Triton kernels can run on these tensors: CUDA, or CPU under the interpreter."""
    if triton is None:
        return False
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and os.environ.get("TRITON_INTERPRET") == "1"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


if triton is not None:

    @triton.jit
    def _round_to_e4m3(v):
        # Round to nearest even on e4m3's grid in fp32, so the cast after it is exact. The GPU's
        # cast rounds right by itself; Triton's CPU interpreter does not (it drops the carry when
        # the mantissa rounds up into the next power of two: 126.8 -> 64).
        exp_field = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)  # 121: e4m3's 2^-6 floor
        magic = ((exp_field + 20) << 23).to(tl.float32, bitcast=True) * 1.5  # 1.5 * 2^23 * step
        r = (v + magic) - magic
        return tl.where(r == 0, v * 0.0, r)  # keep the sign of values that round to zero, as torch does

    @triton.jit
    def _group_quant_kernel(x_ptr, q_ptr, s_ptr, num_rows, k, num_groups, stride_xm, stride_qm, stride_sm,
                            GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, FP8_MAX_C: tl.constexpr):
        # One row of the tile is one (row, group) pair of x; the scale is the group's amax / 448.
        gid = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
        row, grp = gid // num_groups, gid % num_groups
        cols = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = (row[:, None] < num_rows) & (cols < k)
        x = tl.load(x_ptr + row[:, None] * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10) / FP8_MAX_C
        # div_rn: IEEE division as torch does it; the GPU's default '/' is approximate and, with
        # bf16 inputs, lands on the other side of an e4m3 rounding tie for ~0.1% of elements.
        q = _round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale[:, None]), -FP8_MAX_C, FP8_MAX_C))
        tl.store(q_ptr + row[:, None] * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * stride_sm + grp, scale, mask=row < num_rows)

    @triton.jit
    def _block_fp8_matmul_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, m, n, k,
                                 stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                                 GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_SIZE_M: tl.constexpr):
        # c = (a * a_scale) @ (b * b_scale).T; BLOCK_K divides GROUP_K, so one K step has one
        # activation scale per row and one weight scale per output column.
        pid = tl.program_id(0)
        num_pid_m, num_pid_n = tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N)
        pid_m, pid_n = _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_SIZE_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < m, offs_n < n
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
        as_rows = as_ptr + offs_m.to(tl.int64) * stride_asm
        bs_cols = bs_ptr + (offs_n // GROUP_N).to(tl.int64) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(a_rows + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < k), other=0.0)
            b = tl.load(b_cols + kk[:, None], mask=mask_n[None, :] & (kk[:, None] < k), other=0.0)
            a_s = tl.load(as_rows + k0 // GROUP_K, mask=mask_m, other=0.0)
            b_s = tl.load(bs_cols + k0 // GROUP_K, mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_SIZE_M: tl.constexpr):
        # Programs that run together share GROUP_SIZE_M row blocks, so their B tiles stay in L2.
        per_group = GROUP_SIZE_M * num_pid_n
        first_m = (pid // per_group) * GROUP_SIZE_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_SIZE_M)
        return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


def per_token_group_quant_fp8_triton(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    num_groups = -(-k // group_size)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, num_groups, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    x = x if x.stride(-1) == 1 else x.contiguous()
    groups_per_prog = 16
    grid = (triton.cdiv(m * num_groups, groups_per_prog),)
    _group_quant_kernel[grid](x, q, s, m, k, num_groups, x.stride(0), q.stride(0), s.stride(0),
                              GROUP=group_size, GROUPS_PER_PROG=groups_per_prog, FP8_MAX_C=FP8_MAX, num_warps=4)
    return q, s


def block_fp8_matmul_triton(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                            block: tuple[int, int] = (128, 128), config: dict | None = None) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    xq, xs = per_token_group_quant_fp8_triton(x, block[1])
    w = w if w.stride(-1) == 1 else w.contiguous()
    cfg = dict(config or moe_config.dense_fp8_config(m, n, k, x.device))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], block[1])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _block_fp8_matmul_kernel[grid](xq, xs, w, w_scale, out, m, n, k,
                                   xq.stride(0), xs.stride(0), w.stride(0), w_scale.stride(0), out.stride(0),
                                   GROUP_N=block[0], GROUP_K=block[1], **cfg)
    return out


def _fp8_shapes_ok(block: tuple[int, int]) -> bool:
    # A K step must sit inside one scale group, and groups are tiles of a power-of-two width.
    return _is_pow2(block[1]) and block[1] >= 16 and block[0] >= 1


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton where it can run, else the reference (same results: both round to nearest even)."""
    if x.dim() == 2 and triton_runs_on(x) and _is_pow2(group_size) and x.dtype.is_floating_point:
        return per_token_group_quant_fp8_triton(x, group_size)
    return per_token_group_quant_fp8_ref(x, group_size)


def block_fp8_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W8A8 block-scaled GEMM: Triton where it can run, else the reference."""
    if (x.dim() == 2 and triton_runs_on(x, w, w_scale) and w.dtype == FP8_DTYPE and _fp8_shapes_ok(block)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return block_fp8_matmul_triton(x, w, w_scale, tuple(block))
    return block_fp8_matmul_ref(x, w, w_scale, block)
