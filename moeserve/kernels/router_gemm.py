"""Router logits in fp32 for decode-sized batches: logits [T, E] = x [T, H] @ W [E, H]^T.

DeepSeek's gate computes in fp32 (transformers casts the hidden states and the weight each call);
the weight stays fp32 from loading on (layers/moe.py Router), so on the GPU a step used to pay a
cast kernel for x and a cuBLAS fp32 GEMV: two launches (~2.4 + ~2.2 us at batch 1, ~3.5 + ~5.8 us
at batch 64 on an H200, per MoE layer) for a 0.5 MB (V2-Lite) to 7 MB (V3) read of W. This kernel
reads x in its own dtype and upcasts in registers, so it is one launch. The products are fp32 FMAs
(no tensor cores: tl.dot would round fp32 operands to TF32), summed per BLOCK_K slice then across
slices, so a logit differs from the cast-then-GEMM one only in summation order.

One program per (BLOCK_E experts, BLOCK_T tokens) tile: by default one expert's whole row of W
(2048 wide per step) against 4 tokens, so batch 1 has one program per expert and a step's loads
are few and wide. Measured on an H200 against cast + cuBLAS (docs/perf/kernels_router.json):
V2-Lite's gate 1.8 vs 5.5 us at T = 1, 5.7 vs 12.7 at T = 64; V3's 6.7 vs 9.3 at T = 1, 16.4 vs 25.7
at T = 16, but 56 vs 23.5 at T = 64, where the token blocks read W 16 times over. So the kernel
serves T <= ROUTER_TRITON_MAX_T while those re-reads stay under ROUTER_MAX_REREAD_BYTES; larger
batches go to cuBLAS (cast + F.linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.rmsnorm import _use_triton, triton

if triton is not None:
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

ROUTER_TRITON_MAX_T = 64
ROUTER_TILES = dict(BLOCK_T=4, BLOCK_E=1, BLOCK_K=2048, num_warps=4)  # GPU tiles, capped by T and H
# Each block of BLOCK_T tokens reads all of W again (from L2 at best): past this many bytes so read,
# cuBLAS wins (H200: V3's 7.3 MB W at T = 64 is 117 MB, 56 us against 23.5 for cast + cuBLAS).
ROUTER_MAX_REREAD_BYTES = 32 << 20


def router_logits_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(torch.float32), weight)


if triton is not None:

    @triton.jit(do_not_specialize=["num_tokens"])
    def _router_logits_kernel(x_ptr, w_ptr, out_ptr, num_tokens, num_experts, hidden, stride_x, stride_w, stride_o,
                              BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                              PDL: tl.constexpr = False):
        pdl_begin(PDL)
        offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        e_mask = offs_e < num_experts
        t_mask = offs_t < num_tokens
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hidden
            x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_e[:, None] * stride_w + offs_k[None, :], mask=e_mask[:, None] & k_mask[None, :],
                        other=0.0)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        tl.store(out_ptr + offs_t[:, None] * stride_o + offs_e[None, :], acc, mask=t_mask[:, None] & e_mask[None, :])


def default_router_tiles(num_tokens: int, num_experts: int, hidden: int, on_gpu: bool) -> dict:
    if not on_gpu:  # the interpreter: few, large programs keep tests fast
        return dict(BLOCK_T=min(16, triton.next_power_of_2(num_tokens)), BLOCK_E=triton.next_power_of_2(num_experts),
                    BLOCK_K=min(256, triton.next_power_of_2(hidden)), num_warps=4)
    return dict(ROUTER_TILES, BLOCK_T=min(ROUTER_TILES["BLOCK_T"], triton.next_power_of_2(num_tokens)),
                BLOCK_K=min(ROUTER_TILES["BLOCK_K"], triton.next_power_of_2(hidden)))


def router_logits_triton(x: torch.Tensor, weight: torch.Tensor, tiles: dict | None = None) -> torch.Tensor:
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    out = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    tiles = tiles or default_router_tiles(num_tokens, num_experts, hidden, x.is_cuda)
    grid = (triton.cdiv(num_experts, tiles["BLOCK_E"]), triton.cdiv(num_tokens, tiles["BLOCK_T"]))
    _router_logits_kernel[grid](x, weight, out, num_tokens, num_experts, hidden, x.stride(0), weight.stride(0),
                                out.stride(0), num_stages=2, **tiles, **pdl_launch(x.device))
    return out


def kernel_serves(num_tokens: int, weight_bytes: int) -> bool:
    """Whether a batch of num_tokens is decode-sized for this kernel (see the module docstring)."""
    return (num_tokens <= ROUTER_TRITON_MAX_T
            and -(-num_tokens // ROUTER_TILES["BLOCK_T"]) * weight_bytes <= ROUTER_MAX_REREAD_BYTES)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits of x [T, H] (any float dtype) against the fp32 weight [E, H]: the kernel at decode
    sizes where Triton runs, else cast + F.linear."""
    if (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.dtype == torch.float32
            and weight.stride(-1) == 1 and kernel_serves(x.shape[0], weight.nbytes) and _use_triton(x, weight)):
        return router_logits_triton(x, weight)
    return router_logits_ref(x, weight)
