"""Wire codecs for expert-parallel dispatch/combine payloads, specified in bytes.

A codec turns activations x [T, H] into a uint8 payload [T, bytes_per_token(H)] and back.
Payloads are plain bytes so they travel through any all_to_all (NCCL, gloo) unchanged.
The math lives in moeserve/kernels/wire_codecs.py: plain-torch references (the specification,
run on CPU) and Triton kernels (CUDA) that give the same bytes, and that dispatch.py also uses to
encode straight into its send buffers and decode straight from its receive buffers.

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

import torch

from moeserve.kernels.wire_codecs import (E2M1_MAX, E2M1_MIDPOINTS, E2M1_VALUES, FP8_GROUP, MX_BLOCK,  # noqa: F401
                                          bytes_as, decode_rows, e2m1_round, e2m1_value, encode_rows,
                                          payload_bytes)


class Codec:
    """encode(x [T, H]) -> uint8 [T, bytes_per_token(H)]; decode(payload, H) -> [T, H] in `dtype`.
    `name` is the codec kind the row kernels of wire_codecs know."""

    name = "base"

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype  # the activation dtype decode returns

    def bytes_per_token(self, hidden: int) -> int:
        return payload_bytes(self.name, hidden, self.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return encode_rows(x, self.name, self.dtype)

    def decode(self, payload: torch.Tensor, hidden: int) -> torch.Tensor:
        return decode_rows(payload, self.name, hidden, self.dtype)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dtype={self.dtype})"


class RawCodec(Codec):
    """The activation dtype's own bytes: exact. decode returns a view into the payload when aligned."""

    name = "none"


class Fp8Codec(Codec):
    """e4m3 values + one fp32 scale (amax / 448) per group of 128 values; a partial last group is allowed.
    The same quantization as DeepSeek's FP8 expert GEMMs' activations (per_token_group_quant_fp8)."""

    name = "fp8"


class Mxfp4Codec(Codec):
    """OCP MX FP4: blocks of 32 share a power-of-two scale 2^X (stored as e8m0, X + 127), with
    X = floor(log2(amax)) - 2 (the exponent of e2m1's largest normal); elements are x / 2^X
    rounded to e2m1 (nearest, ties to even, saturating at 6). hidden must be a multiple of 32."""

    name = "mxfp4"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        payload_bytes(self.name, x.shape[1], self.dtype)  # raises on an unaligned hidden
        return super().encode(x)


CODECS = {"none": RawCodec, "bf16": RawCodec, "fp8": Fp8Codec, "mxfp4": Mxfp4Codec}


def make_codec(name: str, dtype: torch.dtype = torch.bfloat16) -> Codec:
    """'none' (alias 'bf16': the activation dtype itself), 'fp8' or 'mxfp4'; decode returns `dtype`."""
    if name not in CODECS:
        raise ValueError(f"unknown wire codec {name!r}; choose from {sorted(CODECS)}")
    return CODECS[name](dtype)
