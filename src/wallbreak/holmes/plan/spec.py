"""What is trained and how: a decoder's architecture (a Hugging Face config) and the batch settings.

`ModelSpec` is the one owner of the architecture facts the planner and the runtime share: it is
built from a Hugging Face config (a model folder's config.json, a GGUF's metadata, or a preset)
and everything the cost model counts (parameters, FLOPs, activation sizes) is derived from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from wallbreak.errors import ConfigError

MASTER_PORT = 29500  # torchrun's rendezvous port in the node scripts (torchrun's own default too)

# Architectures whose stages the runtime builds from transformers' own modules.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

# Presets are Llama configs: (layers, hidden, heads, kv heads). The gpt-* sizes are Megatron-LM's
# standard GPT shapes (seq 2048, vocab 51200) with a SwiGLU MLP of ~8h/3, which keeps their
# parameter counts; llama-tiny and llama-small are for tests and the emulated cluster.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "llama-tiny": (4, 32, 4, 2),
    "llama-small": (4, 256, 8, 2),
    "gpt-1.7b": (24, 2304, 24, 24),
    "gpt-3.6b": (30, 3072, 32, 32),
    "gpt-7.5b": (36, 4096, 32, 32),
    "gpt-18.4b": (40, 6144, 48, 48),
    "gpt-39.1b": (48, 8192, 64, 64),
    "gpt-76.1b": (60, 10240, 80, 80),
}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
RECOMPUTE = ("none", "full")
# Pipeline schedules: the planner predicts 1F1B and interleaved 1F1B and picks the faster ("auto");
# GPipe is the runtime's reference schedule (same numbers, a larger memory peak).
SCHEDULES = ("auto", "1f1b", "interleaved", "gpipe")


def default_intermediate(hidden: int) -> int:
    """Llama's rule: 8h/3 rounded up to a multiple (256 from h = 1024 on, 32 below)."""
    step = 256 if hidden >= 1024 else 32
    return step * math.ceil(8 * hidden / 3 / step)


def llama_config(
    layers: int, hidden: int, heads: int, vocab: int, *, kv_heads: int | None = None,
    intermediate: int | None = None, tied: bool = False, seq_len: int = 2048,
) -> dict[str, Any]:  # fmt: skip
    """A Hugging Face LlamaConfig as a dict (what config.json holds)."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "intermediate_size": intermediate or default_intermediate(hidden),
        "vocab_size": vocab,
        "max_position_embeddings": max(seq_len, 2048),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _int(config: dict[str, Any], key: str, where: str) -> int:
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{where}: config field {key!r} must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class ModelSpec:
    """A decoder: `config` is its Hugging Face config; the other fields are read from it once."""

    name: str
    config: dict[str, Any] = field(repr=False)
    seq_len: int = 2048
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        c, where = self.config, f"model {self.name}"
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: its config must be a JSON object")
        if c.get("model_type") not in ARCHITECTURES:
            raise ConfigError(
                f"{where}: model_type {c.get('model_type')!r} is not one the runtime builds; "
                f"allowed: {', '.join(ARCHITECTURES)}"
            )
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                    "vocab_size"):  # fmt: skip
            _int(c, key, where)
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"--seq-len must be a positive integer, got {self.seq_len!r}")
        if c.get("head_dim") is None and self.hidden % self.heads:
            raise ConfigError(f"{where}: hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"{where}: heads {self.heads} must be a multiple of kv heads {self.kv_heads}")

    @classmethod
    def llama(
        cls, name: str, layers: int, hidden: int, heads: int, seq_len: int = 2048, vocab: int = 51200,
        **kw: Any,
    ) -> ModelSpec:  # fmt: skip
        for flag, v in (("layers", layers), ("hidden", hidden), ("heads", heads), ("vocab", vocab)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{flag} must be a positive integer, got {v!r}")
        if hidden % heads:
            raise ConfigError(f"--hidden {hidden} must be divisible by --heads {heads}")
        return cls(name, llama_config(layers, hidden, heads, vocab, seq_len=seq_len, **kw), seq_len)

    @classmethod
    def preset(cls, name: str, seq_len: int = 2048, vocab: int | None = None) -> ModelSpec:
        if name not in PRESETS:
            raise ConfigError(
                f"unknown model {name!r}; presets: {', '.join(PRESETS)} (or a model folder or .gguf)"
            )
        layers, hidden, heads, kv = PRESETS[name]
        default_vocab = 256 if name.startswith("llama-") else 51200
        spec = cls.llama(name, layers, hidden, heads, seq_len, vocab or default_vocab, kv_heads=kv)
        return ModelSpec(name, spec.config, seq_len, {"kind": "preset", "name": name})

    # -- the architecture, read from the config ------------------------------------------------
    @property
    def arch(self) -> str:
        return str(self.config["model_type"])

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.heads)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hidden // self.heads)

    @property
    def intermediate(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def vocab(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def biases(self) -> dict[str, bool]:
        """Which projections carry a bias, per architecture (transformers' modeling files)."""
        c = self.config
        attn = bool(c.get("attention_bias", False))
        qkv = attn or self.arch == "qwen2"  # Qwen2's q/k/v always have biases, its o_proj none
        return {"qkv": qkv, "o": attn and self.arch != "qwen2", "mlp": bool(c.get("mlp_bias", False))}

    @property
    def matmul_params(self) -> int:
        """Weights of one layer's matrix multiplies: q, k, v, o and SwiGLU's gate, up and down."""
        h = self.hidden
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * self.intermediate

    @property
    def layer_params(self) -> int:
        """One decoder layer: the matrices, their biases, two RMSNorms (and Qwen3's q/k norms)."""
        b = self.biases
        p = self.matmul_params + 2 * self.hidden
        p += (self.q_dim + 2 * self.kv_dim) * b["qkv"] + self.hidden * b["o"]
        p += (2 * self.intermediate + self.hidden) * b["mlp"]
        if self.arch == "qwen3":
            p += 2 * self.head_dim
        return p

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The final norm and the output layer (whose matrix is the embedding's when tied)."""
        return self.hidden + (0 if self.tied else self.vocab * self.hidden)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.head_params


@dataclass(frozen=True)
class TrainingSpec:
    global_batch: int
    micro_batch: int = 1
    recompute: str = "none"
    dtype: str = "bf16"
    efficiency: float = 0.70  # achieved share of peak in matmuls; calibrate per cluster (gpu.efficiency)
    distributed_optimizer: bool = True  # optimizer state sharded over data-parallel ranks (ZeRO-1)
    reserve_gib: float = 2.0  # CUDA context, NCCL buffers, allocator slack
    schedule: str = "auto"
    virtual_stages: int = 2  # model chunks per rank under the interleaved schedule

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.micro_batch < 1:
            raise ConfigError(
                f"--global-batch and --micro-batch must be >= 1, got {self.global_batch}, {self.micro_batch}"
            )
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"--global-batch {self.global_batch} must be a multiple of --micro-batch {self.micro_batch}"
            )
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"--recompute {self.recompute!r}; allowed: {', '.join(RECOMPUTE)}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype {self.dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if not isinstance(self.virtual_stages, int) or self.virtual_stages < 2:
            raise ConfigError(f"--virtual-stages must be an integer >= 2, got {self.virtual_stages!r}")
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"--efficiency must be a share of peak in (0, 1], got {self.efficiency}")

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]
