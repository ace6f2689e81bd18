"""Wire codecs for expert-parallel dispatch/combine payloads, specified in bytes.

A codec turns activations x [T, H] into a uint8 payload [T, bytes_per_token(H)] and back.
Payloads are plain bytes so they travel through any all_to_all (NCCL, gloo) unchanged.
All work is done with torch ops, so the same code runs on CPU and CUDA; on CUDA the mxfp4 and
fp8-decode math goes through torch.compile (one fused kernel instead of ~10 passes), and fp8
encode is the Triton per-1x128-group quantization the FP8 GEMMs use.

Byte layout of one token's row (little-endian, as torch stores it):

  "none"   [H * itemsize]                 the activation dtype's raw bytes
  "fp8"    [H]           e4m3 values      x / scale, scale = amax(group) / 448
           [4 * ceil(H / 128)]            fp32 scale per group of 128 values
  "mxfp4"  [H / 2]       e2m1 codes       two per byte, element 2i in the low nibble
           [H / 32]      e8m0 scales      one biased power-of-two exponent per 32 values

For hidden 7168: none/bf16 14,336 B; fp8 7,168 + 56*4 = 7,392 B; mxfp4 3,584 + 224 = 3,808 B.

Errors (per element, x the input, q the round trip):
  fp8:   |x - q| <= 2^-4 |x| + 2^-9 * scale   (half an e4m3 ulp; the second term covers subnormals)
  mxfp4: |x - q| <= amax(block of 32) / 4     (half the widest e2m1 step, or the clamp at 6)
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from moeserve.kernels.fp8 import FP8_DTYPE, per_token_group_quant_fp8

FP8_GROUP = 128

MX_BLOCK = 32
E2M1_EMAX = 2  # exponent of the largest e2m1 normal (6 = 1.5 * 2^2)
E2M1_MAX = 6.0
E8M0_BIAS = 127
# Magnitudes of the 8 e2m1 codes, and the midpoints between neighbours (rounding boundaries).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def bytes_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View uint8 columns [N, n * itemsize] as dtype [N, n], copying when the slice is misaligned."""
    if not t.is_contiguous() or t.storage_offset() % dtype.itemsize:
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(dtype)


def compiled_on_cuda(fn):
    """Run fn eagerly on CPU; on CUDA through torch.compile, which fuses its elementwise passes into
    one kernel (eager torch would make ~10 passes over the activations). Falls back to eager if
    compiling fails, or when MOESERVE_COMPILE_CODECS=0."""
    state: dict = {}

    def run(x, *args):
        if not x.is_cuda or os.environ.get("MOESERVE_COMPILE_CODECS", "1") == "0" or state.get("broken"):
            return fn(x, *args)
        if "fn" not in state:
            state["fn"] = torch.compile(fn, dynamic=True)
        try:
            return state["fn"](x, *args)
        except Exception as e:  # a compiler problem must not take serving down; eager is correct
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); running eagerly")
            state["broken"] = True
            return fn(x, *args)

    run.__name__ = fn.__name__
    return run


# ----------------------------------------------------------------------------- fp8


def fp8_decode(payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    t = payload.shape[0]
    groups = -(-hidden // FP8_GROUP)
    q = bytes_as(payload[:, :hidden], FP8_DTYPE).to(torch.float32)
    scale = bytes_as(payload[:, hidden:hidden + 4 * groups], torch.float32)
    q = torch.nn.functional.pad(q, (0, groups * FP8_GROUP - hidden)).view(t, groups, FP8_GROUP)
    return (q * scale[..., None]).view(t, groups * FP8_GROUP)[:, :hidden].to(dtype)


# ----------------------------------------------------------------------------- mxfp4


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Magnitudes v >= 0 (already scaled) -> e2m1 codes 0..7: round to nearest, ties to the even
    code, values above 6 saturate to code 7 (6.0), as the OCP MX spec allows for FP4.

    The grid step is 0.5 below 2, 1 in [2, 4), 2 from 4 on; torch.round (half to even) on v / step
    gives an integer whose parity is the code's, and the code is that integer + 0, 2 or 4.
    """
    v = v.to(torch.float32)
    step = torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0))
    offset = torch.where(v < 2, 0.0, torch.where(v < 4, 2.0, 4.0))
    return (torch.round(v / step) + offset).clamp(max=7).to(torch.uint8)


def e2m1_value(code: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (bit 3 = sign) -> fp32 values: 0.5*m when the exponent field is 0, else 2^(e-1) * (1 + m/2)."""
    c = code.to(torch.int32)
    e, m = ((c >> 1) & 3).to(torch.float32), (c & 1).to(torch.float32)
    mag = torch.where(e == 0, 0.5 * m, torch.exp2(e - 1) * (1 + 0.5 * m))
    return torch.where((c & 8) != 0, -mag, mag)


def mxfp4_encode(x: torch.Tensor) -> torch.Tensor:
    t, h = x.shape
    blocks = x.to(torch.float32).view(t, h // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    # frexp: amax = m * 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1, exactly.
    _, e = torch.frexp(amax)
    shared = torch.where(amax > 0, e - 1 - E2M1_EMAX, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = blocks * torch.exp2(-shared.to(torch.float32))[..., None]
    codes = e2m1_round(scaled.abs()) | ((scaled < 0).to(torch.uint8) << 3)
    codes = codes.view(t, h // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return torch.cat([packed, (shared + E8M0_BIAS).to(torch.uint8)], dim=1)


def mxfp4_decode(payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    t = payload.shape[0]
    packed = payload[:, :hidden // 2]
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(t, hidden // MX_BLOCK, MX_BLOCK)
    shared = payload[:, hidden // 2:hidden // 2 + hidden // MX_BLOCK].to(torch.float32) - E8M0_BIAS
    return (e2m1_value(codes) * torch.exp2(shared)[..., None]).view(t, hidden).to(dtype)


_fp8_decode = compiled_on_cuda(fp8_decode)
_mxfp4_encode, _mxfp4_decode = compiled_on_cuda(mxfp4_encode), compiled_on_cuda(mxfp4_decode)


class Codec:
    """encode(x [T, H]) -> uint8 [T, bytes_per_token(H)]; decode(payload, H) -> [T, H] in `dtype`."""

    name = "base"

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype  # the activation dtype decode returns

    def bytes_per_token(self, hidden: int) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, hidden: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dtype={self.dtype})"


class RawCodec(Codec):
    """The activation dtype's own bytes: exact."""

    name = "none"

    def bytes_per_token(self, hidden: int) -> int:
        return hidden * self.dtype.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).contiguous().view(torch.uint8).reshape(x.shape[0], x.shape[1] * self.dtype.itemsize)

    def decode(self, payload: torch.Tensor, hidden: int) -> torch.Tensor:
        return bytes_as(payload, self.dtype).reshape(payload.shape[0], hidden)


class Fp8Codec(Codec):
    """e4m3 values + one fp32 scale (amax / 448) per group of 128 values; a partial last group is allowed."""

    name = "fp8"

    def bytes_per_token(self, hidden: int) -> int:
        return hidden + 4 * math.ceil(hidden / FP8_GROUP)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # torch cannot reinterpret the bytes of an empty scale tensor
            return torch.empty(0, self.bytes_per_token(x.shape[1]), dtype=torch.uint8, device=x.device)
        # The same quantization as the FP8 expert GEMMs' activations (Triton on GPU, bit-equal to the reference).
        q, scale = per_token_group_quant_fp8(x, FP8_GROUP)
        return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=1)

    def decode(self, payload: torch.Tensor, hidden: int) -> torch.Tensor:
        return _fp8_decode(payload, hidden, self.dtype)


class Mxfp4Codec(Codec):
    """OCP MX FP4: blocks of 32 share a power-of-two scale 2^X (stored as e8m0, X + 127), with
    X = floor(log2(amax)) - 2 (the exponent of e2m1's largest normal); elements are x / 2^X
    rounded to e2m1 (nearest, ties to even, saturating at 6)."""

    name = "mxfp4"

    def bytes_per_token(self, hidden: int) -> int:
        self._check(hidden)
        return hidden // 2 + hidden // MX_BLOCK

    @staticmethod
    def _check(hidden: int) -> None:
        if hidden % MX_BLOCK:
            raise ValueError(f"mxfp4 needs hidden % {MX_BLOCK} == 0, got {hidden}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x.shape[1])
        if x.shape[0] == 0:
            return torch.empty(0, self.bytes_per_token(x.shape[1]), dtype=torch.uint8, device=x.device)
        return _mxfp4_encode(x)

    def decode(self, payload: torch.Tensor, hidden: int) -> torch.Tensor:
        self._check(hidden)
        return _mxfp4_decode(payload, hidden, self.dtype)


CODECS = {"none": RawCodec, "bf16": RawCodec, "fp8": Fp8Codec, "mxfp4": Mxfp4Codec}


def make_codec(name: str, dtype: torch.dtype = torch.bfloat16) -> Codec:
    """'none' (alias 'bf16': the activation dtype itself), 'fp8' or 'mxfp4'; decode returns `dtype`."""
    if name not in CODECS:
        raise ValueError(f"unknown wire codec {name!r}; choose from {sorted(CODECS)}")
    return CODECS[name](dtype)
