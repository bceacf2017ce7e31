"""What is trained and how: a GPT shape (Megatron-LM's presets or custom) and the batch settings."""

from __future__ import annotations

from dataclasses import dataclass

from wallbreak.errors import ConfigError

MASTER_PORT = 29500  # torchrun's rendezvous port in the node scripts (torchrun's own default too)

# Megatron-LM's standard GPT sizes (layers, hidden, heads); seq 2048, vocab 51200.
PRESETS: dict[str, tuple[int, int, int]] = {
    "gpt-1.7b": (24, 2304, 24),
    "gpt-3.6b": (30, 3072, 32),
    "gpt-7.5b": (36, 4096, 32),
    "gpt-18.4b": (40, 6144, 48),
    "gpt-39.1b": (48, 8192, 64),
    "gpt-76.1b": (60, 10240, 80),
}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
RECOMPUTE = ("none", "full")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    seq_len: int = 2048
    vocab: int = 51200

    def __post_init__(self) -> None:
        for field_name in ("layers", "hidden", "heads", "seq_len", "vocab"):
            v = getattr(self, field_name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{field_name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"--hidden {self.hidden} must be divisible by --heads {self.heads}")

    @classmethod
    def preset(cls, name: str) -> ModelSpec:
        if name not in PRESETS:
            raise ConfigError(f"unknown model {name!r}; presets: {', '.join(PRESETS)} (or give --layers ...)")
        layers, hidden, heads = PRESETS[name]
        return cls(name, layers, hidden, heads)

    @property
    def layer_params(self) -> int:
        """One transformer layer: QKV + proj (4h^2), 4h MLP (8h^2), biases and two layer norms (13h)."""
        return 12 * self.hidden**2 + 13 * self.hidden

    @property
    def embedding_params(self) -> int:
        return (self.vocab + self.seq_len) * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params


@dataclass(frozen=True)
class TrainingSpec:
    global_batch: int
    micro_batch: int = 1
    recompute: str = "none"
    dtype: str = "bf16"
    efficiency: float = 0.70  # achieved share of peak in matmuls; calibrate per cluster (gpu.efficiency)
    distributed_optimizer: bool = True  # optimizer state sharded over data-parallel ranks (ZeRO-1)
    reserve_gib: float = 2.0  # CUDA context, NCCL buffers, allocator slack

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
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"--efficiency must be a share of peak in (0, 1], got {self.efficiency}")

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]
