"""Configuration dataclasses: the one place where defaults live.

ModelConfig is read from a Hugging Face config.json. The engine-side configs
(cache, parallelism, scheduler) are plain dataclasses gathered in EngineConfig.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

# config.json "architectures" -> our model family.
ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass
class RopeConfig:
    """Rotary embedding parameters, normalised from either `rope_scaling`
    (DeepSeek's own config.json) or `rope_parameters` (transformers 5)."""

    theta: float = 10000.0
    type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, raw: dict[str, Any], max_position_embeddings: int) -> "RopeConfig":
        params = dict(raw.get("rope_parameters") or {})
        # DeepSeek's own checkpoints carry `rope_scaling` and a top-level `rope_theta`.
        if raw.get("rope_scaling"):
            params = {**raw["rope_scaling"], **params}
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, yarn)")
        cfg = cls(theta=float(theta), type=rope_type)
        if rope_type == "yarn":
            cfg.factor = float(params["factor"])
            cfg.original_max_position_embeddings = int(
                params.get("original_max_position_embeddings", max_position_embeddings)
            )
            cfg.beta_fast = float(params.get("beta_fast") or 32)
            cfg.beta_slow = float(params.get("beta_slow") or 1)
            cfg.mscale = float(params.get("mscale") or 0.0)
            cfg.mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
            cfg.attention_factor = params.get("attention_factor")
            cfg.truncate = bool(params.get("truncate", True))
        return cfg


@dataclass
class ModelConfig:
    """The architecture of a checkpoint, read from its config.json."""

    arch: str  # "deepseek_v3" | "deepseek_v2" | "qwen3_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "bfloat16"
    attention_bias: bool = False

    # MLA (DeepSeek V2/V3)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False

    # GQA (Qwen3-MoE)
    head_dim: int = 0

    # MoE
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    # MTP (DeepSeek-V3): extra layers stored as model.layers.{num_hidden_layers + i}
    num_nextn_predict_layers: int = 0

    # Quantization of the checkpoint: None or "fp8" (block-scaled e4m3, DeepSeek's format)
    quant_method: str | None = None
    weight_block_size: tuple[int, int] = (128, 128)

    # How to build the model, not read from config.json (the engine sets it from
    # EngineConfig.fuse_shared_experts): DeepSeek's shared experts as extra slots of the routed
    # experts' fused MoE pass where that applies (layers/moe.py MoE), else a separate MLP.
    fuse_shared_experts: bool = True

    @property
    def is_mla(self) -> bool:
        return self.arch in ("deepseek_v3", "deepseek_v2")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.n_routed_experts == 0:
            return False
        if self.arch == "qwen3_moe":
            return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            arch = {"deepseek_v3": "deepseek_v3", "deepseek_v2": "deepseek_v2", "qwen3_moe": "qwen3_moe"}.get(
                raw.get("model_type", "")
            )
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; supported: {sorted(ARCHITECTURES)}"
            )
        eos = raw.get("eos_token_id")
        eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        max_pos = int(raw.get("max_position_embeddings", 4096))
        cfg = cls(
            arch=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw.get("intermediate_size", 0),
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            max_position_embeddings=max_pos,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(raw, max_pos),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=raw.get("hidden_act", "silu"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos_list,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            attention_bias=bool(raw.get("attention_bias", False)),
        )
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        if arch in ("deepseek_v3", "deepseek_v2"):
            cfg.q_lora_rank = raw.get("q_lora_rank")
            cfg.kv_lora_rank = raw["kv_lora_rank"]
            cfg.qk_nope_head_dim = raw["qk_nope_head_dim"]
            cfg.qk_rope_head_dim = raw["qk_rope_head_dim"]
            cfg.v_head_dim = raw["v_head_dim"]
            cfg.n_routed_experts = raw.get("n_routed_experts") or 0
            cfg.num_experts_per_tok = raw.get("num_experts_per_tok") or 0
            cfg.moe_intermediate_size = raw.get("moe_intermediate_size", 0)
            cfg.n_shared_experts = raw.get("n_shared_experts") or 0
            cfg.routed_scaling_factor = float(raw.get("routed_scaling_factor", 1.0))
            cfg.n_group = raw.get("n_group") or 1
            cfg.topk_group = raw.get("topk_group") or 1
            cfg.first_k_dense_replace = raw.get("first_k_dense_replace", 0)
            cfg.moe_layer_freq = raw.get("moe_layer_freq", 1)
            cfg.num_nextn_predict_layers = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0
            if arch == "deepseek_v3":
                cfg.scoring_func = raw.get("scoring_func", "sigmoid")
                cfg.topk_method = raw.get("topk_method", "noaux_tc")
                cfg.norm_topk_prob = bool(raw.get("norm_topk_prob", True))
                cfg.rope_interleave = bool(raw.get("rope_interleave", True))
            else:
                cfg.scoring_func = raw.get("scoring_func", "softmax")
                cfg.topk_method = raw.get("topk_method", "greedy")
                # transformers' DeepseekV2 never renormalises the top-k weights; DeepSeek-V2
                # checkpoints ship norm_topk_prob=false, so following transformers is exact.
                cfg.norm_topk_prob = False
                # DeepSeek-V2 rotates interleaved pairs (complex multiplication).
                cfg.rope_interleave = True
        else:
            cfg.head_dim = raw.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads
            cfg.n_routed_experts = raw.get("num_experts", raw.get("num_local_experts", 0))  # transformers 5 writes the latter
            cfg.num_experts_per_tok = raw.get("num_experts_per_tok", 0)
            cfg.moe_intermediate_size = raw.get("moe_intermediate_size", 0)
            cfg.norm_topk_prob = bool(raw.get("norm_topk_prob", False))
            cfg.decoder_sparse_step = raw.get("decoder_sparse_step", 1) or 1
            cfg.mlp_only_layers = list(raw.get("mlp_only_layers") or [])
        quant = raw.get("quantization_config")
        if quant:
            method = quant.get("quant_method")
            if method != "fp8":
                raise ValueError(f"unsupported quantization {method!r} (supported: fp8 block-scaled)")
            cfg.quant_method = "fp8"
            cfg.weight_block_size = tuple(quant.get("weight_block_size", (128, 128)))
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path!r} is not a model folder: no config.json")
        with open(cfg_path) as f:
            return cls.from_dict(json.load(f))

    def validate(self) -> None:
        if self.n_routed_experts:
            if self.num_experts_per_tok <= 0 or self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError("num_experts_per_tok must be in 1..n_routed_experts")
            if self.n_routed_experts % self.n_group:
                raise ValueError("n_routed_experts must be divisible by n_group")
            if self.topk_group > self.n_group:
                raise ValueError("topk_group must be <= n_group")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")


def resolve_dtype(dtype: str | torch.dtype, model_config: ModelConfig | None = None) -> torch.dtype:
    """'auto' follows the checkpoint (FP8 checkpoints compute in bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = model_config.torch_dtype if model_config else "bfloat16"
        dtype = "bfloat16" if name.startswith("float8") else name
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return table[dtype]


def default_block_size(model_config: "ModelConfig") -> int:
    """KV-cache page size where none is given: 64 tokens for MLA models, whose decode kernel then
    addresses each 32- or 64-token tile from one page (kernels/attention_triton.py; on an H200,
    V2-Lite's batch-1 step 3-4% faster than with 16-token pages, batch 64 0.5%:
    docs/perf/engine_v2lite.md), as vLLM's MLA backends use 64; 16 otherwise."""
    return 64 if model_config.is_mla else 16


@dataclass
class CacheConfig:
    block_size: int | None = None  # tokens a KV page; None: default_block_size(model)
    # On GPU the number of blocks comes from free memory; on CPU from num_gpu_blocks or cpu_kv_cache_mb.
    gpu_memory_utilization: float = 0.90
    num_blocks: int | None = None
    cpu_kv_cache_mb: int = 256
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto" (model dtype) | "fp8"


@dataclass
class ParallelConfig:
    """One instance's ranks, one process each: dp data-parallel attention groups (each schedules
    its own requests) of tp tensor-parallel ranks (the group's rank 0 is its engine core, the
    other tp - 1 are workers; attention and dense MLPs are sharded over them). With ep = dp * tp
    the MoE layers form one expert-parallel group over every rank; with ep = 1 the experts are
    tensor-parallel inside each group and the dp groups are independent replicas."""

    tp: int = 1
    dp: int = 1
    ep: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # "host:port" of rank 0's rendezvous; None on one node: a free local port
    dist_timeout_s: float = 300.0  # deadline of every collective
    # Process-group backend: "auto" (NCCL on GPUs, gloo on CPU) | "nccl" | "gloo". gloo on GPUs stages
    # every collective through host memory and lets a node's ranks share its GPUs round-robin (NCCL runs
    # one rank a GPU): for checking parallel paths on fewer GPUs than ranks, not for speed.
    dist_backend: str = "auto"
    # Expert-parallel wire formats: "auto" follows the checkpoint (fp8 for FP8 checkpoints, else
    # the activation dtype), or "none" | "fp8" | "mxfp4" (dispatch only).
    dispatch_dtype: str = "auto"
    combine_dtype: str = "auto"
    dispatch_backend: str = "auto"  # "auto" (by tokens per rank) | "ht" | "ll"; env MOESERVE_DISPATCH overrides auto
    ll_threshold: int = 128  # max tokens per rank at which the low-latency kernel is used
    ll_capacity: int | None = None  # rows per destination rank in the low-latency buffers (None: ll_threshold)
    # How low-latency rows travel: "collective" (all_to_all) | "peer" (stored straight into the other
    # ranks' memory, CUDA IPC, one node only); None: env MOESERVE_EP_LL_TRANSPORT, else collective.
    ll_transport: str | None = None
    num_redundant_experts: int = 0
    eplb_interval: int = 0  # steps between expert rebalances; 0: off
    eplb_window: int = 1000  # steps of expert load the balancer looks at

    def __post_init__(self) -> None:
        if min(self.tp, self.dp, self.ep, self.nnodes) < 1:
            raise ValueError("tp, dp, ep and nnodes must be >= 1")
        if self.ep not in (1, self.world_size):
            raise ValueError(f"ep must be 1 or dp * tp = {self.dp} * {self.tp} = {self.world_size} (one "
                             f"expert-parallel group over the instance), got {self.ep}")
        if self.world_size % self.nnodes:
            raise ValueError(f"{self.world_size} ranks do not split evenly over {self.nnodes} nodes")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not in [0, {self.nnodes})")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("a multi-node instance needs dist_init_addr (host:port of node 0)")
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"dist_backend {self.dist_backend!r}: use auto, nccl or gloo")
        if self.ll_transport not in (None, "collective", "peer"):
            raise ValueError(f"ll_transport {self.ll_transport!r}: use collective or peer")
        if self.ll_transport == "peer" and self.nnodes > 1:
            raise ValueError("the peer transport maps other ranks' memory: one node only (nnodes 1)")
        if self.num_redundant_experts < 0 or self.eplb_interval < 0 or self.eplb_window < 1:
            raise ValueError("num_redundant_experts and eplb_interval must be >= 0, eplb_window >= 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    # Schedule step n+1 while step n runs on the GPU (one process per instance only: data and
    # tensor parallel ranks step synchronously).
    async_scheduling: bool = True


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"  # "auto" | "cuda" | "cpu"
    load_format: str = "auto"  # "auto" | "dummy"
    seed: int = 0
    enforce_eager: bool = False
    # Unquantized linears with <= 16 rows (decode) on a GPU: a split-K Triton GEMM (kernels/gemv.py)
    # instead of cuBLAS. Off until a measurement shows it faster (docs/perf/engine_v2lite.md).
    dense_gemv: bool = False
    # DeepSeek's shared experts run as extra expert slots of the routed experts' fused MoE pass
    # (ep == 1; under expert parallelism they stay a separate MLP on the token's own rank): the
    # shared MLP's GEMMs and SiLU launches go. False keeps the separate MLP everywhere.
    fuse_shared_experts: bool = True
    # At start, run the forward at prefill sizes (ModelRunner._warm_up_prefill), so that Triton
    # compiles the kernel variants of those sizes then, not inside the first requests that need them
    # (seconds each on a fresh machine, stalling every request in the batch; under expert parallelism
    # every rank, whose collectives wait for it). None: on GPUs only (CPU has nothing to compile).
    warmup_prefill: bool | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def model_build_config(self, model_config: ModelConfig) -> ModelConfig:
        """model_config (a copy) with this engine's choices of how to build the model."""
        return replace(model_config, fuse_shared_experts=self.fuse_shared_experts)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        """Flat keyword arguments (as LLM(...) and the CLI take them) -> nested config."""
        sub = {"cache": CacheConfig, "parallel": ParallelConfig, "scheduler": SchedulerConfig}
        top = {f.name for f in fields(cls)} - set(sub) - {"model"}
        parts: dict[str, dict[str, Any]] = {name: {} for name in sub}
        own: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in top:
                own[key] = value
                continue
            for name, klass in sub.items():
                if key in {f.name for f in fields(klass)}:
                    parts[name][key] = value
                    break
            else:
                raise TypeError(f"unknown engine argument {key!r}")
        return cls(model=model, **own, **{name: sub[name](**vals) for name, vals in parts.items()})
