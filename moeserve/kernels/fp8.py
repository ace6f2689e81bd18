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
    xp = torch.nn.functional.pad(x.to(torch.float32), (0, pad)).view(m, (k + pad) // group_size, group_size)
    scale = xp.abs().amax(dim=-1).clamp(min=1e-10) / FP8_MAX
    q = (xp / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, k + pad)[:, :k].to(FP8_DTYPE)
    return q.contiguous(), scale


def block_fp8_matmul_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                         block: tuple[int, int] = (128, 128),
                         x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """y = quant(x) @ dequant(w).T with x quantized per 1 x block[1] group, as the FP8 kernel computes it.

    x [M, K] (bf16/fp32), w [N, K] e4m3, w_scale [ceil(N/bn), ceil(K/bk)] -> [M, N] in x.dtype.
    x_fp8: x already quantized so (per_token_group_quant_fp8's (e4m3, scales); e.g. by the RMSNorm
    that made x), used as it is.
    """
    xq, xs = x_fp8 if x_fp8 is not None else per_token_group_quant_fp8_ref(x, block[1])
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
    from moeserve.kernels.pdl import pdl_begin, pdl_launch
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
    def _cast_to(v, TY: tl.constexpr, FAST: tl.constexpr):
        # v cast to TY. To e4m3 off a GPU (FAST False: the interpreter) through _round_to_e4m3 and
        # e4m3's range first, which the GPU's saturating cast does by itself; NaN stays NaN, as on
        # the GPU (the interpreter's cast turns it into a number: its code set here, sign kept).
        if TY == tl.float8e4nv and not FAST:
            v = v.to(tl.float32)
            q = _round_to_e4m3(tl.clamp(v, -448.0, 448.0)).to(TY)
            nan = tl.where(v.to(tl.int32, bitcast=True) < 0, 0xFF, 0x7F).to(tl.uint8).to(TY, bitcast=True)
            return tl.where(v == v, q, nan)
        return v.to(TY)

    @triton.jit
    def _quant_group_tile(x, FP8_MAX_C: tl.constexpr, FAST: tl.constexpr):
        # x [rows, GROUP] fp32, one scale group per row -> (x / scale, clamped, in fp32, whose cast
        # to e4m3 is the quantized value; scale [rows]). The one definition of the activation
        # rounding: the quant kernel and the GEMMs that quantize their A tiles on load all call it,
        # so they agree bit for bit.
        # div_rn: the scale is the IEEE quotient, as torch computes it on the CPU (the reference) and
        # as the fp8 wire codec does. The GPU's '/' (amax times a rounded 1/448) was one ulp off in
        # 58% of groups on an H200, which put 0.14% of bf16 values on the other side of an e4m3
        # rounding tie: FP8 MoE outputs then differed from the reference quantization's by ~1.2%
        # (the intermediate's own quantization amplifies any change), and expert parallelism's fp8
        # payload, fed to the experts as it arrived, would not have matched a single process.
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10), FP8_MAX_C)
        if FAST:
            # CUDA: the IEEE quotient without a division per element (div_rn is a slow subroutine,
            # and a GEMM that quantizes on load redoes it for every N tile). Markstein: with
            # y = RN(1/s) and q = RN(x y), RN(q + (x - s q) y) is RN(x / s). The GPU's cast to e4m3
            # rounds to nearest even by itself.
            rcp = tl.math.div_rn(scale * 0.0 + 1.0, scale)[:, None]
            q0 = x * rcp
            q = tl.fma(tl.fma(-q0, scale[:, None], x), rcp, q0)
            q = tl.clamp(q, -FP8_MAX_C, FP8_MAX_C)
        else:
            # div_rn: IEEE division as torch does it; the GPU's default '/' is approximate and,
            # with bf16 inputs, lands on the other side of an e4m3 rounding tie for ~0.1% of
            # elements. _round_to_e4m3: the interpreter's cast does not round right by itself.
            q = _round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale[:, None]), -FP8_MAX_C, FP8_MAX_C))
        return q, scale

    @triton.jit(do_not_specialize=["num_rows"])
    def _group_quant_kernel(x_ptr, q_ptr, s_ptr, num_rows, k, num_groups, stride_xm, stride_qm, stride_sm,
                            GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, FP8_MAX_C: tl.constexpr,
                            FAST: tl.constexpr = False, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # One row of the tile is one (row, group) pair of x; the scale is the group's amax / 448.
        gid = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
        row, grp = gid // num_groups, gid % num_groups
        cols = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = (row[:, None] < num_rows) & (cols < k)
        x = tl.load(x_ptr + row[:, None] * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        q, scale = _quant_group_tile(x, FP8_MAX_C, FAST)
        tl.store(q_ptr + row[:, None] * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * stride_sm + grp, scale, mask=row < num_rows)

    @triton.jit(do_not_specialize=["m", "groups_per_split", "splits", "stride_asm", "stride_bsn"])
    def _splitk_matmul_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, p_ptr, count_ptr, bias_ptr, m, n, k,
                              groups_per_split, splits, stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                              GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_SIZE_M: tl.constexpr, SCALED: tl.constexpr, FUSE_QUANT: tl.constexpr,
                              PARTIALS: tl.constexpr, REDUCE_IN_GEMM: tl.constexpr, HAS_BIAS: tl.constexpr,
                              FP8_MAX_C: tl.constexpr, FAST: tl.constexpr, EVEN_K: tl.constexpr = False,
                              SCALE_PER_TILE: tl.constexpr = False, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # c = (a * a_scale) @ (b * b_scale).T over the K range of groups_per_split whole scale groups
        # [pid_k * k_per_split, + k_per_split). BLOCK_K divides GROUP_K, so one K step has one
        # activation scale per row and one weight scale per output column.
        # SCALED=False: c = a @ b.T, no scales (the unquantized small-M GEMM of kernels/gemv.py); a
        #   "group" is then just the unit the K ranges are cut in (GROUP_K == BLOCK_K).
        # FUSE_QUANT: a is the unquantized activation (bf16/fp16/fp32) and BLOCK_K == GROUP_K: each
        #   step quantizes its A tile (one group per row) exactly as _group_quant_kernel does.
        # PARTIALS: split-K; this K range's fp32 sum goes to p[pid_k] ([splits, m, n] fp32); the
        #   splits are added in a fixed order (s = 0, 1, ...), so a result is the same run to run:
        #   REDUCE_IN_GEMM: by the tile's last program to finish (an arrival counter a tile, which
        #   that program resets to 0 for the next call); else by _splitk_reduce_kernel, a launch more.
        # HAS_BIAS: c += bias[n], in fp32 before the one rounding to c's dtype.
        # EVEN_K: BLOCK_K divides k, so no K step needs a bound on its columns.
        # SCALE_PER_TILE: BLOCK_N divides GROUP_N, so the tile's columns share one weight scale a K
        #   step: one scalar load, multiplied into the activation scales before one FMA an element,
        #   where a scale a column took a load each and two multiplies an element (the promotion was
        #   most of the 64-row decode GEMM's instructions, which is issue-bound; Nsight Compute).
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
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
        bs_tile = bs_ptr + (pid_n * BLOCK_N // GROUP_N).to(tl.int64) * stride_bsn
        # k_start as a product with the constexpr GROUP_K: the compiler then knows the K offsets are
        # 16-byte aligned and pipelines the loads (async copies). From a plain runtime k_per_split it
        # could not, left the loop unpipelined, and the kernel ran 5-8x slower on an H200.
        k_per_split = groups_per_split * GROUP_K
        k_start = pid_k * k_per_split
        num_steps = tl.cdiv(tl.minimum(k_per_split, k - k_start), BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, num_steps):
            k0 = k_start + step * BLOCK_K
            kk = k0 + offs_k
            if EVEN_K:
                a_mask, b_mask = mask_m[:, None], mask_n[None, :]
            else:
                a_mask, b_mask = mask_m[:, None] & (kk < k)[None, :], mask_n[None, :] & (kk < k)[:, None]
            a = tl.load(a_rows + kk[None, :], mask=a_mask, other=0.0)
            b = tl.load(b_cols + kk[:, None], mask=b_mask, other=0.0)
            if SCALED:
                if FUSE_QUANT:
                    aq, a_s = _quant_group_tile(a.to(tl.float32), FP8_MAX_C, FAST)
                    a = aq.to(b_ptr.dtype.element_ty)
                else:
                    a_s = tl.load(as_rows + k0 // GROUP_K, mask=mask_m, other=0.0)
                if SCALE_PER_TILE:
                    acc += tl.dot(a, b) * (a_s * tl.load(bs_tile + k0 // GROUP_K))[:, None]
                else:
                    b_s = tl.load(bs_cols + k0 // GROUP_K, mask=mask_n, other=0.0)
                    acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            else:
                acc += tl.dot(a, b)
        c_mask = mask_m[:, None] & mask_n[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tile_offs = offs_m.to(tl.int64)[:, None] * n + offs_n[None, :]  # in a [m, n] partial
        part_stride = m.to(tl.int64) * n
        if PARTIALS:
            tl.store(p_ptr + pid_k * part_stride + tile_offs, acc, mask=c_mask)
            if REDUCE_IN_GEMM:
                # Every thread's partial stored before the (release) arrival; the program that
                # arrives last sees all of them (acquire) and reads them from L2 (.cg, not L1).
                tl.debug_barrier()
                if tl.atomic_add(count_ptr + pid, 1, sem="acq_rel") == splits - 1:
                    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for s in range(0, splits):
                        total += tl.load(p_ptr + s * part_stride + tile_offs, mask=c_mask, other=0.0,
                                         cache_modifier=".cg")
                    if HAS_BIAS:
                        total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                    tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=c_mask)
                    tl.atomic_xchg(count_ptr + pid, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    @triton.jit(do_not_specialize=["numel", "splits"])
    def _splitk_reduce_kernel(p_ptr, c_ptr, bias_ptr, numel, n, splits, stride_cm, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # c[i] = sum over s = 0, 1, ..., splits-1 of p[s, i], always in that order: the result does
        # not depend on which split finished first (float atomics would), so it is the same run to run.
        # The bias joins the fp32 sum last, before the one rounding to c's dtype.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
        for s in range(1, splits):
            acc += tl.load(p_ptr + s * numel + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % n, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptr + (offs // n) * stride_cm + offs % n, acc.to(c_ptr.dtype.element_ty), mask=mask)

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
                              GROUP=group_size, GROUPS_PER_PROG=groups_per_prog, FP8_MAX_C=FP8_MAX,
                              FAST=x.is_cuda, num_warps=4, **pdl_launch(x.device))
    return q, s


def block_fp8_matmul_triton(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                            block: tuple[int, int] = (128, 128), config: dict | None = None,
                            x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """config: BLOCK_M/N/K, GROUP_SIZE_M, num_warps, num_stages, and optionally SPLIT_K (K ranges
    summed in a fixed order), REDUCE_IN_GEMM (that sum by the GEMM's last program, not a second
    launch) and FUSE_QUANT (quantize x inside the GEMM, no separate quant launch);
    moe_config.dense_fp8_config picks them per shape. x_fp8: x already quantized per 1 x block[1]
    (no quant at all here; FUSE_QUANT is then moot)."""
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    w = w if w.stride(-1) == 1 else w.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = dict(config or moe_config.dense_fp8_config(m, n, k, x.device))
    fuse = bool(cfg.pop("FUSE_QUANT", False)) and block[1] <= 256 and x_fp8 is None
    # A fused K step quantizes one whole scale group per row, so it is exactly one group wide.
    cfg["BLOCK_K"] = block[1] if fuse else min(cfg["BLOCK_K"], block[1])
    if fuse:
        a, a_s = x, x  # the scale pointer is not read
    elif x_fp8 is not None:
        a, a_s = x_fp8
    else:
        a, a_s = per_token_group_quant_fp8_triton(x, block[1])
    return splitk_matmul(a, w, out, cfg, scales=(a_s, w_scale, block), fuse_quant=fuse)


# Arrival counters of REDUCE_IN_GEMM, one int32 a (BLOCK_M x BLOCK_N) output tile, one set a device:
# zero between calls (each tile's last program resets its own), so a call needs no memset launch.
# Allocated at the first call outside a CUDA-graph capture (the graph runner warms up before it
# captures) and never freed, since captured graphs keep its address; a call with more tiles than
# this, or a first call inside a capture, takes the separate reduce launch instead. One set a device
# means one stream at a time may run these GEMMs on it (the engine's case: a step's kernels run on
# one stream, eager or replayed); GEMMs on two streams at once could share a counter.
SPLIT_COUNTERS = 16384
_split_counters: dict[torch.device, torch.Tensor] = {}


def kept_counters(kept: dict[torch.device, torch.Tensor], device: torch.device, numel: int) -> torch.Tensor | None:
    """kept[device]: int32 zeros made at the first call outside a CUDA-graph capture and kept for the
    process (captured graphs keep its address); None for a first call inside a capture."""
    counters = kept.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = kept[device] = torch.zeros(numel, dtype=torch.int32, device=device)
    return counters


def split_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    return kept_counters(_split_counters, device, SPLIT_COUNTERS) if tiles <= SPLIT_COUNTERS else None


def splitk_matmul(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: dict,
                  scales: tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None = None,
                  bias: torch.Tensor | None = None, fuse_quant: bool = False) -> torch.Tensor:
    """out = a @ w.T (+ bias) by _splitk_matmul_kernel over cfg's SPLIT_K ranges of K, their fp32
    partials summed in a fixed order (so the same run to run): by the GEMM's last program of each
    tile where cfg's REDUCE_IN_GEMM (default moe_config.REDUCE_IN_GEMM) says so and counters are
    free, else by _splitk_reduce_kernel.

    scales: (a's per-group scales, w's per-block scales, block) of the FP8 GEMM; None: unscaled, and
    the K ranges are cut in whole BLOCK_K steps. a and w have unit last strides."""
    m, k = a.shape
    n = w.shape[0]
    cfg = dict(cfg)
    split = max(1, int(cfg.pop("SPLIT_K", 1)))
    reduce_in_gemm = bool(cfg.pop("REDUCE_IN_GEMM", moe_config.REDUCE_IN_GEMM))
    a_s, w_s, block = scales if scales is not None else (a, w, (1, cfg["BLOCK_K"]))  # unscaled: not read
    num_groups = triton.cdiv(k, block[1])
    groups_per_split = triton.cdiv(num_groups, min(split, num_groups))
    split = triton.cdiv(num_groups, groups_per_split)  # no empty K ranges
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    partials = torch.empty(split, m, n, dtype=torch.float32, device=a.device) if split > 1 else out
    counters = split_counters(a.device, tiles) if split > 1 and reduce_in_gemm else None
    reduce_in_gemm = counters is not None
    has_bias = bias is not None
    bias = bias if has_bias else out  # not read
    _splitk_matmul_kernel[(tiles, split)](
        a, a_s, w, w_s, out, partials, counters if reduce_in_gemm else out, bias, m, n, k, groups_per_split,
        split, a.stride(0), a_s.stride(0), w.stride(0), w_s.stride(0), out.stride(0),
        GROUP_N=block[0], GROUP_K=block[1], SCALED=scales is not None, FUSE_QUANT=fuse_quant, PARTIALS=split > 1,
        REDUCE_IN_GEMM=reduce_in_gemm, HAS_BIAS=has_bias, FP8_MAX_C=FP8_MAX, FAST=a.is_cuda,
        EVEN_K=k % cfg["BLOCK_K"] == 0, SCALE_PER_TILE=scale_per_tile(block, cfg["BLOCK_N"]), **cfg,
        **pdl_launch(a.device))
    if split > 1 and not reduce_in_gemm:
        reduce_block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, reduce_block),)](partials, out, bias, m * n, n, split,
                                                                   out.stride(0), HAS_BIAS=has_bias,
                                                                   BLOCK=reduce_block, num_warps=4,
                                                                   **pdl_launch(a.device))
    return out


def scale_per_tile(block: tuple[int, int], block_n: int) -> bool:
    """Whether the dense FP8 GEMM's BLOCK_N-column tiles (starting at multiples of BLOCK_N) each lie in
    one weight-scale row of block[0] columns, and take one scale a K step (moe_config.DENSE_FP8_SCALE_PER_TILE)."""
    return moe_config.DENSE_FP8_SCALE_PER_TILE and block[0] % block_n == 0


def _fp8_shapes_ok(block: tuple[int, int]) -> bool:
    # A K step must sit inside one scale group, and groups are tiles of a power-of-two width (the dense
    # and the fused MoE's Triton paths both).
    return _is_pow2(block[1]) and block[1] >= 16 and block[0] >= 1


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton where it can run, else the reference (same results: both round to nearest even)."""
    if x.dim() == 2 and triton_runs_on(x) and _is_pow2(group_size) and x.dtype.is_floating_point:
        return per_token_group_quant_fp8_triton(x, group_size)
    return per_token_group_quant_fp8_ref(x, group_size)


def block_fp8_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     block: tuple[int, int] = (128, 128),
                     x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """W8A8 block-scaled GEMM: Triton where it can run, else the reference. x_fp8: x's quantization
    per 1 x block[1] when the caller has it already (the RMSNorm before the GEMM made it)."""
    if x_fp8 is not None:
        assert x_fp8[0].shape == x.shape and x_fp8[1].shape == (x.shape[0], -(-x.shape[1] // block[1])), \
            f"x_fp8 {x_fp8[0].shape} / {x_fp8[1].shape} is not x {tuple(x.shape)} in groups of {block[1]}"
    if (x.dim() == 2 and triton_runs_on(x, w, w_scale) and w.dtype == FP8_DTYPE and _fp8_shapes_ok(block)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return block_fp8_matmul_triton(x, w, w_scale, tuple(block), x_fp8=x_fp8)
    return block_fp8_matmul_ref(x, w, w_scale, block, x_fp8)
