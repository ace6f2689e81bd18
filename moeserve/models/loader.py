"""Build a model from a Hugging Face folder: safetensors (sharded or not), DeepSeek FP8 block
format, or dummy random weights of the configured shapes (no file read).

Checkpoint names map to our modules by name, except:
- routed experts `...mlp.experts.{e}.{gate,up,down}_proj.weight[_scale_inv]` are stacked into
  `...mlp.experts.w13[e]` (gate rows, then up rows) and `...mlp.experts.w2[e]`;
- shared experts fused into the routed experts' pass (layers/moe.py): the shared MLP
  `...mlp.shared_experts.{gate,up,down}_proj.weight[_scale_inv]` of intermediate S*I goes into
  slots E..E+S-1 of the same stacks, slot E+k taking gate/up rows and down columns [kI, (k+1)I)
  (their scale blocks likewise; under tensor parallelism this rank's slice of each, as for a
  routed expert);
- projections merged into one GEMM (layers/linear.py MergedColumnLinear: `mlp.gate_up_proj` from
  `mlp.gate_proj` + `mlp.up_proj`, `self_attn.q_kv_a_proj` from `self_attn.q_proj` or `q_a_proj` +
  `kv_a_proj_with_mqa` (MLA), `self_attn.qkv_proj` from `self_attn.q_proj` + `k_proj` + `v_proj`
  (GQA)) are written part by part into their rows, FP8 scales, biases and TP slices included;
- DeepSeek's MTP layers `model.layers.{num_hidden_layers + i}.*` go to `mtp_layers.{i}`;
- an FP8 tensor whose module is not kept in FP8 is dequantized with its `_scale_inv`.
Under tensor parallelism a parameter with a `tp_shard` (layers/linear.py) is read as its slice
only (safetensors slices: the rest of the tensor is never read), and dummy weights of a shard
are exactly that slice of the single-process dummy tensor.
Every parameter must be written exactly once and every checkpoint tensor must be used, else
loading fails with an error that names the missing and unexpected tensors.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from moeserve.config import ModelConfig
from moeserve.distributed.groups import ParallelState, get_parallel_state, set_parallel_state
from moeserve.kernels.fp8 import FP8_DTYPE, dequant_block_fp8_ref
from moeserve.layers.linear import MergedColumnLinear, TPShard
from moeserve.models import MODEL_CLASSES
from moeserve.models.deepseek_v3 import mtp_param_name, num_mtp_layers_in

EXPERT_RE = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
SHARED_RE = re.compile(r"(.*\.mlp)\.shared_experts\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
FUSED_EXPERT_RE = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointMismatch(ValueError):
    pass


class Checkpoint:
    """Lazy access to the tensors of a folder's *.safetensors files."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.file_of = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {path!r}")
            self.file_of = {}
            for fname in files:
                with safe_open(fname, framework="pt") as f:
                    self.file_of.update({name: fname for name in f.keys()})
        self._open: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def names(self) -> set[str]:
        return set(self.file_of)

    def _file(self, name: str):
        fname = self.file_of[name]
        if fname not in self._open:
            self._open[fname] = self._stack.enter_context(safe_open(fname, framework="pt"))
        return self._open[fname]

    def get(self, name: str, shard: TPShard | None = None) -> torch.Tensor:
        """The tensor, or only its `shard` (read as slices: the rest stays on disk)."""
        if shard is None:
            return self._file(name).get_tensor(name)
        view = self._file(name).get_slice(name)
        shape = tuple(view.get_shape())
        if shape != shard.full_shape:
            raise CheckpointMismatch(f"{name}: checkpoint shape {shape} != model {shard.full_shape} (before "
                                     f"tensor-parallel sharding)")
        lead = (slice(None),) * shard.dim
        parts = [view[lead + (slice(start, start + n),)] for start, n in shard.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.dim)

    def is_fp8(self, name: str) -> bool:
        return self._file(name).get_slice(name).get_dtype() == "F8_E4M3"

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, num_mtp_layers: int = 0) -> nn.Module:
    """Allocate the model's parameters (uninitialised) directly on `device`."""
    with default_dtype(dtype), torch.device(device):
        model = MODEL_CLASSES[cfg.arch](cfg, cfg.quant_method, num_mtp_layers)
    return model.eval()


class _WholeExperts:
    """Stands for an EPRuntime in check_tensor_parallel: under expert parallelism the routed
    experts are whole (never split over tp) and the shared experts are replicated."""

    def local_slot_experts(self) -> list[int]:
        return []

    def register(self, *args, **kwargs) -> None:
        return None


def check_tensor_parallel(cfg: ModelConfig, tp: int, expert_parallel: bool = False) -> None:
    """ValueError, naming the layer and sizes, if the model does not split over tp ranks (heads,
    intermediate sizes, FP8 128-block alignment of every shard). Builds each rank's layers on the
    meta device (no memory; one dense and one MoE layer stand for all), so the check is exactly
    what the ranks will build. expert_parallel: the experts are spread whole over ranks instead."""
    if tp == 1:
        return
    from moeserve.models.base import DecoderLayer

    kinds = {cfg.is_moe_layer(i): i for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)}
    saved = get_parallel_state()
    try:
        for rank in range(tp):
            set_parallel_state(ParallelState(
                rank=rank, world_size=tp, local_rank=rank, backend="gloo", device=torch.device("meta"), tp=tp, dp=1,
                ep=1, tp_rank=rank, dp_rank=0, ep_rank=0, tp_group=None, dp_group=None, ep_group=None, timeout=None,
                ep_runtime=_WholeExperts() if expert_parallel else None))
            try:
                with default_dtype(torch.bfloat16), torch.device("meta"):
                    for layer_idx in kinds.values():
                        DecoderLayer(cfg, layer_idx, cfg.quant_method)
            except ValueError as e:
                raise ValueError(f"the model does not split over tp={tp}: {e}") from None
    finally:
        set_parallel_state(saved)


def _slot_experts(model: nn.Module) -> dict[str, list[int]]:
    """Experts-module name -> the logical expert of each of its routed slots (this rank's share under EP)."""
    return {name: module.slot_experts for name, module in model.named_modules() if hasattr(module, "slot_experts")}


def _fused_shared(model: nn.Module) -> dict[str, int]:
    """Experts-module name -> how many shared experts it holds after its routed slots (0: none fused)."""
    return {name: module.num_shared for name, module in model.named_modules() if hasattr(module, "num_shared")}


MERGED_KINDS = ("weight", "weight_scale_inv", "bias")


def _merged_parts(model: nn.Module) -> tuple[dict[str, tuple[MergedColumnLinear, int, str]], set[str]]:
    """Checkpoint name of each part of each merged projection -> (module, part index, kind), and
    the names of the merged parameters themselves (which no checkpoint holds)."""
    parts, merged_params = {}, set()
    for prefix, module in model.named_modules():
        if not isinstance(module, MergedColumnLinear):
            continue
        parent = prefix.rsplit(".", 1)[0]
        for kind in MERGED_KINDS:
            if getattr(module, kind, None) is None:
                continue
            merged_params.add(f"{prefix}.{kind}")
            for i, part in enumerate(module.parts):
                parts[f"{parent}.{part.name}.{kind}"] = (module, i, kind)
    return parts, merged_params


def _expected_keys(model: nn.Module) -> set[str]:
    """Everything a checkpoint must provide: each parameter, each expert's projections one by one
    (under expert parallelism only the experts this rank holds), the shared MLP's tensors that fill
    fused shared-expert slots (by their checkpoint names), and each part of a merged projection."""
    parts, merged_params = _merged_parts(model)
    keys = set(parts)
    slots, shared = _slot_experts(model), _fused_shared(model)
    for name, param in model.named_parameters():
        if name in merged_params:
            continue
        m = re.match(r"(.*\.mlp\.experts)\.(w13|w2)(_scale)?$", name)
        if m:
            projs = ("gate_proj", "up_proj") if m.group(2) == "w13" else ("down_proj",)
            keys |= {f"{m.group(1)}.{e}.{p}{m.group(3) or ''}" for e in set(slots[m.group(1)]) for p in projs}
            if shared[m.group(1)]:
                mlp = m.group(1).removesuffix(".experts")
                keys |= {f"{mlp}.shared_experts.{p}.weight{'_scale_inv' if m.group(3) else ''}" for p in projs}
        else:
            keys.add(name)
    return keys


def _dequant_if_needed(ckpt: Checkpoint, name: str, tensor: torch.Tensor, target: torch.Tensor, cfg: ModelConfig,
                       consumed: set[str]) -> torch.Tensor:
    if tensor.dtype == FP8_DTYPE and target.dtype != FP8_DTYPE:
        scale_name = name + "_scale_inv"
        if scale_name not in ckpt.file_of:
            raise CheckpointMismatch(f"FP8 tensor {name} has no {scale_name}")
        consumed.add(scale_name)
        return dequant_block_fp8_ref(tensor, ckpt.get(scale_name), cfg.weight_block_size, target.dtype)
    return tensor


def narrow(tensor: torch.Tensor, shard: TPShard) -> torch.Tensor:
    parts = [tensor.narrow(shard.dim, start, n) for start, n in shard.segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.dim)


def _read(ckpt: Checkpoint, name: str, target: torch.Tensor, shard: TPShard | None, cfg: ModelConfig,
          consumed: set[str]) -> torch.Tensor:
    """Checkpoint tensor `name` for `target` (this rank's shard of it under tensor parallelism),
    dequantized if it is FP8 and the target is not."""
    if shard is None:
        return _dequant_if_needed(ckpt, name, ckpt.get(name), target, cfg, consumed)
    if target.dtype != FP8_DTYPE and ckpt.is_fp8(name):  # dequantize whole blocks, then slice
        full = _dequant_if_needed(ckpt, name, ckpt.get(name), target, cfg, consumed)
        if tuple(full.shape) != shard.full_shape:
            raise CheckpointMismatch(f"{name}: checkpoint shape {tuple(full.shape)} != model {shard.full_shape}")
        return narrow(full, shard)
    return ckpt.get(name, shard)


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, shard: TPShard | None, name: str) -> None:
    """param <- tensor; a shard may be shorter than its parameter (vocabulary padding stays zero)."""
    dest = param.data if shard is None else param.data.narrow(shard.dim, 0, shard.length)
    if tuple(tensor.shape) != tuple(dest.shape):
        raise CheckpointMismatch(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}")
    dest.copy_(tensor.to(param.dtype))


def load_weights(model: nn.Module, path: str) -> None:
    cfg: ModelConfig = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    slots, shared = _slot_experts(model), _fused_shared(model)
    merged, _ = _merged_parts(model)
    expected, loaded = _expected_keys(model), set()
    ckpt = Checkpoint(path)
    # Scale tensors used while dequantizing their weight. Names are visited sorted, so
    # "X.weight" comes before "X.weight_scale_inv".
    consumed: set[str] = set()
    unexpected: list[str] = []
    try:
        for name in sorted(ckpt.names()):
            if IGNORED_RE.match(name) or name in consumed:
                continue
            target_name = name
            if cfg.is_mla:
                mapped = mtp_param_name(cfg, name)
                if mapped == "":
                    continue
                target_name = mapped or name
            if _load_expert(ckpt, name, target_name, params, slots, cfg, loaded, consumed):
                continue
            if _load_fused_shared(ckpt, name, target_name, params, shared, cfg, loaded, consumed):
                continue
            if target_name in merged:
                module, index, kind = merged[target_name]
                dest, shard = module.part_target(index, kind)
                tensor = _read(ckpt, name, dest, shard, cfg, consumed)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise CheckpointMismatch(f"{name}: checkpoint shape {tuple(tensor.shape)} != model "
                                             f"{tuple(dest.shape)}")
                dest.copy_(tensor.to(dest.dtype))
                loaded.add(target_name)
                continue
            if target_name not in params:
                unexpected.append(name)
                continue
            param = params[target_name]
            shard = getattr(param, "tp_shard", None)
            _copy_into(param, _read(ckpt, name, param, shard, cfg, consumed), shard, name)
            loaded.add(target_name)
    finally:
        ckpt.close()
    missing = sorted(expected - loaded)
    if missing or unexpected:
        raise CheckpointMismatch(
            f"checkpoint {path!r} does not match its config: "
            f"{len(missing)} missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
            f"{len(unexpected)} unexpected tensors {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )


def _load_expert(ckpt: Checkpoint, name: str, target_name: str, params: dict[str, torch.Tensor],
                 slots: dict[str, list[int]], cfg: ModelConfig, loaded: set[str], consumed: set[str]) -> bool:
    """Write one routed expert's projection (or its scale) into every local slot that holds it.
    An expert held on another rank (expert parallelism) is skipped without reading it."""
    fused = FUSED_EXPERT_RE.match(target_name)
    if fused and f"{fused.group(1)}.w13" in params:
        stacked = params[f"{fused.group(1)}.{'w13' if fused.group(2) == 'gate_up_proj' else 'w2'}"]
        experts = slots[fused.group(1)]
        tensor = ckpt.get(name)
        shard = getattr(stacked, "tp_shard", None)
        want = shard.full_shape[1:] if shard is not None else tuple(stacked.shape[1:])
        if tuple(tensor.shape[1:]) != tuple(want) or tensor.shape[0] <= max(experts):
            raise CheckpointMismatch(f"{name}: checkpoint shape {tuple(tensor.shape)} does not hold the model's "
                                     f"experts {tuple(stacked.shape)}")
        tensor = tensor[torch.tensor(experts)]
        # the routed slots (fused shared experts' slots, if any, come after them)
        stacked.data[:len(experts)].copy_((tensor if shard is None else narrow(tensor, shard)).to(stacked.dtype))
        projs = ("gate_proj", "up_proj") if fused.group(2) == "gate_up_proj" else ("down_proj",)
        loaded.update(f"{fused.group(1)}.{e}.{p}" for e in experts for p in projs)
        return True
    m = EXPERT_RE.match(target_name)
    if not m:
        return False
    prefix, expert, proj, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    w_name = f"{prefix}.{'w2' if proj == 'down_proj' else 'w13'}"
    if w_name not in params:
        return False
    is_scale = kind == "weight_scale_inv"
    if is_scale and params[w_name].dtype != FP8_DTYPE:
        return False  # a scale whose weight is not FP8 was consumed by the dequantization, else unexpected
    if expert >= cfg.n_routed_experts:
        return False
    local = [s for s, e in enumerate(slots[prefix]) if e == expert]
    if not local:  # held by another expert-parallel rank
        if not is_scale:
            consumed.add(name + "_scale_inv")
        return True
    stacked = params[w_name + ("_scale" if is_scale else "")]
    rows = stacked.shape[1] // 2
    shard = _expert_shard(getattr(stacked, "tp_shard", None), proj)
    tensor = None
    for slot in local:
        dest = stacked[slot] if proj == "down_proj" else stacked[slot, :rows] if proj == "gate_proj" else stacked[slot, rows:]
        if tensor is None:
            tensor = _read(ckpt, name, dest, shard, cfg, consumed) if not is_scale else ckpt.get(name, shard)
        if tuple(tensor.shape) != tuple(dest.shape):
            raise CheckpointMismatch(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}")
        dest.copy_(tensor.to(dest.dtype))
    loaded.add(f"{prefix}.{expert}.{proj}{'_scale' if is_scale else ''}")
    return True


def _load_fused_shared(ckpt: Checkpoint, name: str, target_name: str, params: dict[str, torch.Tensor],
                       shared: dict[str, int], cfg: ModelConfig, loaded: set[str], consumed: set[str]) -> bool:
    """Write one projection of a shared MLP (or its scale) whose experts are fused into the routed
    experts' stacks: slot E+k gets the k-th of the S equal slices along the intermediate dimension
    (gate/up rows, down columns), cut to this rank's part of a slot under tensor parallelism exactly
    as a routed expert's tensor is (only those slices are read)."""
    m = SHARED_RE.match(target_name)
    if not m:
        return False
    prefix, proj, kind = f"{m.group(1)}.experts", m.group(2), m.group(3)
    num_shared = shared.get(prefix, 0)
    if not num_shared:
        return False  # a shared MLP module of its own loads it
    w_name = f"{prefix}.{'w2' if proj == 'down_proj' else 'w13'}"
    is_scale = kind == "weight_scale_inv"
    if is_scale and params[w_name].dtype != FP8_DTYPE:
        return False  # a scale whose weight is not FP8 was consumed by the dequantization, else unexpected
    stacked = params[w_name + ("_scale" if is_scale else "")]
    first, rows = stacked.shape[0] - num_shared, stacked.shape[1] // 2
    dests = [stacked[s] if proj == "down_proj" else stacked[s, :rows] if proj == "gate_proj" else stacked[s, rows:]
             for s in range(first, first + num_shared)]
    dim = 1 if proj == "down_proj" else 0  # the intermediate dimension of the checkpoint tensor
    slot = _expert_shard(getattr(stacked, "tp_shard", None), proj)  # one slot's part of one expert
    shard = None
    if slot is not None:  # this rank's part of each of the S slices, in slot order
        size = slot.full_shape[dim]
        full = list(slot.full_shape)
        full[dim] = num_shared * size
        shard = TPShard(dim, tuple((k * size + start, n) for k in range(num_shared) for start, n in slot.segments),
                        tuple(full))
    tensor = _read(ckpt, name, dests[0], shard, cfg, consumed) if not is_scale else ckpt.get(name, shard)
    want = list(dests[0].shape)
    want[dim] *= num_shared
    if list(tensor.shape) != want:
        raise CheckpointMismatch(f"{name}: checkpoint shape {tuple(tensor.shape)} does not hold {num_shared} fused "
                                 f"shared-expert slots of {tuple(dests[0].shape)}")
    for dest, part in zip(dests, tensor.split(dests[0].shape[dim], dim=dim)):
        dest.copy_(part.to(dest.dtype))
    loaded.add(target_name)
    return True


def _expert_shard(stacked: TPShard | None, proj: str) -> TPShard | None:
    """One expert's projection ([I, H] gate/up, [H, I] down) sliced as the stacked tensor's shard
    (w13 [E, 2I, H]: gate rows then up rows; w2 [E, H, I])."""
    if stacked is None:
        return None
    full = stacked.full_shape[1:]
    if proj == "down_proj":
        return TPShard(stacked.dim - 1, stacked.segments, full)
    half = full[0] // 2
    start, n = stacked.segments[0 if proj == "gate_proj" else 1]
    return TPShard(0, ((start - (0 if proj == "gate_proj" else half), n),), (half, full[1]))


_DUMMY_CHUNK = 1 << 24


def _fill_random(flat: torch.Tensor, make: Callable[[int], torch.Tensor]) -> None:
    """Fill a 1-D tensor from one random chunk of at most 16M values, repeated: large tensors
    stay random-looking while CPU start-up stays in seconds (generation is the slow part)."""
    chunk = make(min(flat.numel(), _DUMMY_CHUNK))
    for start in range(0, flat.numel(), chunk.numel()):
        part = flat[start:start + chunk.numel()]
        part.copy_(chunk[: part.numel()])


def _fill_random_shard(dest: torch.Tensor, shard: TPShard, make: Callable[[int], torch.Tensor]) -> None:
    """Fill `dest` (this rank's slice, contiguous) with what _fill_random writes at those places of
    the full tensor: full flat index f holds chunk[f % len(chunk)]. Done in pieces of 16M values."""
    full = shard.full_shape
    numel = 1
    for d in full:
        numel *= d
    chunk = make(min(numel, _DUMMY_CHUNK))
    dev = chunk.device
    inner = 1
    for d in full[shard.dim + 1:]:
        inner *= d
    dim_full = full[shard.dim]
    dim_map = torch.cat([torch.arange(s, s + n, device=dev) for s, n in shard.segments])
    local_dim = dim_map.numel()
    assert dest.is_contiguous(), "a shard is a contiguous tensor"
    flat = dest.view(-1)
    for lo in range(0, flat.numel(), _DUMMY_CHUNK):
        idx = torch.arange(lo, min(lo + _DUMMY_CHUNK, flat.numel()), device=dev)
        outer, rest = idx // (local_dim * inner), idx % (local_dim * inner)
        f = (outer * dim_full + dim_map[rest // inner]) * inner + rest % inner
        flat[lo:lo + idx.numel()] = chunk[f % chunk.numel()]


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes, generated on the parameters' device (no file read).
    Each tensor is seeded from its name, so expert-parallel ranks (which hold fewer experts)
    still get the same attention and dense weights, and a tensor-parallel rank's shard is
    exactly its slice of the single-process tensor."""
    for name, param in model.named_parameters():
        shard = getattr(param, "tp_shard", None)
        if shard is not None:
            param = param.narrow(shard.dim, 0, shard.length)  # vocabulary padding stays zero
        torch.manual_seed(seed + zlib.crc32(name.encode()))
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed + zlib.crc32(name.encode()))
        device = param.device
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            param.zero_()
        elif "scale" in name.rsplit(".", 1)[-1]:
            param.fill_(0.02)  # times fp8 values of magnitude ~1: weights of ~0.02
        elif param.dtype == FP8_DTYPE:
            # Random bytes with the top exponent bit cleared: finite e4m3 values in [-1.875, 1.875].
            def random_bytes(n):
                return torch.randint(0, 256, (n,), dtype=torch.uint8, device=device) & 0xBF
            if shard is None:
                _fill_random(param.view(torch.uint8).view(-1), random_bytes)
            else:
                _fill_random_shard(param.view(torch.uint8), shard, random_bytes)
        else:
            # uniform(-a, a) with std 0.02
            def uniform(n):
                return torch.empty(n, device=device).uniform_(-0.0346, 0.0346)
            if shard is None:
                _fill_random(param.view(-1), uniform)
            else:
                _fill_random_shard(param, shard, uniform)


def load_model(cfg: ModelConfig, path: str | None, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto", seed: int = 0) -> nn.Module:
    if load_format == "dummy":
        model = build_model(cfg, dtype, device, num_mtp_layers=cfg.num_nextn_predict_layers)
        init_dummy_weights(model, seed)
    elif load_format in ("auto", "safetensors"):
        if path is None:
            raise ValueError("a model path is needed unless load_format='dummy'")
        num_mtp = num_mtp_layers_in(cfg, Checkpoint(path).names()) if cfg.is_mla else 0
        model = build_model(cfg, dtype, device, num_mtp_layers=num_mtp)
        load_weights(model, path)
    else:
        raise ValueError(f"unknown load_format {load_format!r}; use auto or dummy")
    model.process_weights_after_loading(dtype)
    return model
