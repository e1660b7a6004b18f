"""Peak training memory, estimated from a model's config.json alone (no weights are loaded).

It models this project's trainer (tasks/trainer.py) as it is:
- full:  fp32 master weights, fp32 grads, AdamW fp32 states (16 B/param); on CUDA a bf16 autocast
         copy of every linear weight as well.
- lora:  frozen base in the compute dtype (bf16 on CUDA, fp32 on CPU); adapters fp32 with
         grads and AdamW states (16 B/adapter param).
- qlora: lora on a base whose linear layers are NF4 with double quantisation; the other base
         parameters (embeddings, norms) are upcast to fp32 by peft's prepare_model_for_kbit_training.
Activations are what autograd keeps for a Llama-style decoder layer, for every token of the
largest micro-batch; with gradient checkpointing, only each layer's input plus one layer.
Logits are counted for every token: the worst case, since the trainer projects to the vocabulary
only where a row has an answer token. benchmarks/results/ holds measured peaks to compare with.
Pure: no torch, no Prefect.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, computed_field

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax
RUNTIME_OVERHEAD = {"cuda": int(0.75 * GIB), "cpu": int(1.5 * GIB)}  # allocator/context; Python + libraries
FRAGMENTATION = {"cuda": 0.10, "cpu": 0.0}
LOSS_CHUNK_BYTES = 512 * 2**20  # fp32 logits per chunk of the fused loss (tasks/loss.py)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class UnsupportedModelError(ValueError):
    """The config does not describe a decoder-only transformer this estimator knows."""


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        # Multimodal wrappers keep the language model's fields under text_config.
        config = {**config, **config.get("text_config", {})}
        missing = [f for f in REQUIRED_FIELDS if not isinstance(config.get(f), int)]
        if missing:
            raise UnsupportedModelError(
                f"{source}: model_type {config.get('model_type', '?')!r} lacks {', '.join(missing)}; "
                "the memory estimator supports decoder-only Llama-style configs "
                "(llama, mistral, qwen2, qwen3, gemma). Set method explicitly and memory_budget_gib "
                "generously to skip the estimate's guidance, or file an issue with the config."
            )
        heads = config["num_attention_heads"]
        return cls(
            model_type=config.get("model_type", "unknown"),
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_parameters(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def parameters(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return embeddings + self.linear_parameters + norms

    def lora_parameters(self, r: int, targets: list[str] | str = "all-linear") -> int:
        names = LINEAR_NAMES if targets == "all-linear" else [n for n in LINEAR_NAMES if n in targets]
        return self.num_layers * sum(r * (a + b) for n, (a, b) in self.linear_shapes().items() if n in names)


class MemoryEstimate(BaseModel):
    method: str
    device: str
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    weights: int
    trainable_state: int  # trainable weights' grads and optimizer states (and fp32 copies)
    activations: int
    logits: int
    overhead: int

    @computed_field  # included in model_dump(), so manifests and reports carry it
    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations + self.logits + self.overhead

    @property
    def gib(self) -> float:
        return self.total / GIB


def estimate_memory(
    shape: ModelShape,
    method: str,
    device: str,
    micro_batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    lora_r: int = 16,
    lora_targets: list[str] | str = "all-linear",
    lora_dropout: float = 0.05,
) -> MemoryEstimate:
    compute = 2 if device == "cuda" else 4  # bytes per activation element: bf16 autocast, or fp32
    params, linear = shape.parameters, shape.linear_parameters
    adapters = shape.lora_parameters(lora_r, lora_targets) if method != "full" else 0
    if method == "full":
        weights = 4 * params + (2 * linear if device == "cuda" else 0)
        trainable = 12 * params  # grads + two AdamW moments
    elif method == "lora":
        weights = compute * params + 4 * adapters
        trainable = 12 * adapters
    elif method == "qlora":
        biggest = max(a * b for a, b in shape.linear_shapes().values())  # one dequantised weight at a time
        weights = int(NF4_BYTES_PER_PARAM * linear) + 4 * (params - linear) + compute * biggest + 4 * adapters
        trainable = 12 * adapters
    else:
        raise ValueError(f"unknown method {method!r}")
    tokens = micro_batch_size * seq_len
    per_layer = _layer_activation_bytes(shape, compute, tokens, device, method, lora_dropout, lora_r)
    if gradient_checkpointing:
        activations = tokens * (shape.num_layers * shape.hidden_size * compute + per_layer)
    else:
        activations = tokens * shape.num_layers * per_layer
    # The loss is fused with the vocabulary projection (tasks/loss.py): a chunk of fp32 logits and its
    # gradient at a time, the gradient for the hidden states, and the head's fp32 gradient when it trains.
    chunk = min(tokens, max(64, LOSS_CHUNK_BYTES // (4 * shape.vocab_size)))
    logits = chunk * shape.vocab_size * (4 + compute) + tokens * shape.hidden_size * compute
    if method == "full":
        logits += 4 * shape.vocab_size * shape.hidden_size
    base = weights + trainable + activations + logits
    return MemoryEstimate(
        method=method, device=device, micro_batch_size=micro_batch_size, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, weights=weights, trainable_state=trainable,
        activations=activations, logits=logits,
        overhead=RUNTIME_OVERHEAD[device] + int(FRAGMENTATION[device] * base),
    )


def _layer_activation_bytes(shape: ModelShape, compute: int, packed_tokens: int, device: str,
                            method: str, lora_dropout: float, lora_r: int) -> int:
    """Bytes autograd keeps per token for one decoder layer (rows packed `packed_tokens` to a pass)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    # norm outputs; q/k before and after RoPE; v; k/v repeated for GQA; attention output; MLP gate,
    # up, activation and product.
    elements = 2 * h + 3 * q + 3 * kv + 2 * q + 4 * i
    if device == "cpu":
        elements += 2 * shape.num_heads * packed_tokens  # CPU SDPA with a block mask materialises scores
    if method != "full":
        elements += 7 * lora_r  # LoRA A outputs
        if lora_dropout > 0:
            elements += 5 * h + q + i  # a dropout copy of each target's input
    return elements * compute + 2 * h * 4  # RMSNorm keeps fp32 inputs
