"""Peak training memory, estimated from a model's config.json alone (no weights are loaded).

It models this project's trainer (tasks/engine/train_loop.py, tasks/engine/modeling.py) as it is; a test runs the
trainer on CPU and checks the estimate against it, and benchmarks/gpu_memory.py measures it on a
GPU (benchmarks/results/). What it counts:
- weights: full fine-tuning keeps fp32 master weights, plus on CUDA the bf16 copies autocast makes of
  every linear weight for the step; LoRA freezes a base in the compute dtype (bf16 on CUDA, fp32
  on CPU); QLoRA's linear layers are NF4 with double quantisation, everything else in the compute
  dtype, plus one dequantised weight at a time.
- trainable state: AdamW's two fp32 moments, and the adapters' fp32 gradients (full fine-tuning's
  gradients are weighed against the activations instead: backward frees one as it fills the other).
- activations: what autograd keeps per token of a packed micro-batch, layer by layer, for the
  kernels the trainer uses (varlen FlashAttention on CUDA; Liger's RMSNorm/RoPE/SwiGLU when
  installed; LoRA dropout fused into the adapter); with gradient checkpointing, each layer's input
  plus one layer being recomputed; and the gradients backward has in flight inside a layer.
- logits: the fused loss (tasks/engine/loss.py) works a chunk of tokens at a time; it keeps the gradient of
  the hidden states, and of the head when the head trains.
- overhead: CUDA context and allocator slack (measured on an H200; expandable segments on), or
  on CPU the Python process and its libraries.
Pure: no torch, no Prefect.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, computed_field

from tasks.planning.methods import Method

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax
RUNTIME_OVERHEAD = {"cuda": int(1.0 * GIB), "cpu": int(1.5 * GIB)}  # CUDA context + allocator; Python + libraries
FRAGMENTATION = {"cuda": 0.01, "cpu": 0.0}  # allocator slack, a share of what is allocated
# Full fine-tuning with checkpointing interleaves recomputed layers with the growing fp32 gradients,
# which leaves more room unused between allocations (measured: 1.2-2.8 GiB more reserved than allocated).
CHECKPOINTED_FULL_FRAGMENTATION = 0.04
LOSS_CHUNK_BYTES = 512 * 2**20  # fp32 logits per chunk of the fused loss (tasks/engine/loss.py)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Decoder layouts the estimate is written for: pre-norm attention (GQA or not) and a gated MLP.
# (phi3 fuses q/k/v and gate/up into single matrices of the same total size.)
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


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
        model_type = config.get("model_type", "?")
        missing = [f for f in REQUIRED_FIELDS if not isinstance(config.get(f), int)]
        if model_type not in KNOWN_MODEL_TYPES or missing:
            problem = f"lacks {', '.join(missing)}" if missing else "is not an architecture the estimator knows"
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} {problem}; the memory estimator supports "
                f"{', '.join(KNOWN_MODEL_TYPES)} (decoder-only, gated MLP); open an issue with the config.json "
                "to have it added."
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
    method: Method
    device: str
    tokens: int  # packed tokens per micro-batch
    gradient_checkpointing: bool
    fused_kernels: bool
    weights: int
    trainable_state: int  # optimizer states (and the adapters' gradients)
    activations: int  # full fine-tuning: or the gradients (less the logits), whichever is larger
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
    method: Method | str,
    device: str,
    tokens: int,
    gradient_checkpointing: bool,
    lora_r: int = 16,
    lora_targets: list[str] | str = "all-linear",
    fused_kernels: bool | None = None,
    num_gpus: int = 1,
) -> MemoryEstimate:
    """Peak memory of one GPU (or the CPU) in a training step on micro-batches of `tokens` packed tokens.

    `fused_kernels`: whether Liger's kernels run (tasks/engine/kernels.py); by default, on CUDA.
    `num_gpus` > 1: one process per GPU (tasks/engine/distributed.py). Full fine-tuning is sharded (FSDP2):
    each GPU keeps 1/n of the weights, gradients and optimizer states, plus the layer being gathered;
    adapters run data-parallel (DDP): every GPU holds the whole base, plus a second copy of the
    adapters' gradients for the all-reduce.
    """
    method = Method(method)  # a ValueError naming the value when it is no method
    fused = device == "cuda" if fused_kernels is None else fused_kernels and device == "cuda"
    compute = 2 if device == "cuda" else 4  # bytes per element of a matmul output: bf16 autocast, or fp32
    stream = 4 if method == Method.FULL or device == "cpu" else compute  # the residual stream: fp32 master weights
    params, linear = shape.parameters, shape.linear_parameters
    adapters = shape.lora_parameters(lora_r, lora_targets) if method.trains_adapter else 0
    if method == Method.FULL:
        # Autocast's bf16 copies of the linear weights live until backward reaches their layer; with
        # checkpointing the forward keeps nothing, so only the recomputed layer's copies exist.
        copies = 0 if device != "cuda" else 2 * linear // (shape.num_layers if gradient_checkpointing else 1)
        weights = 4 * params + copies
        trainable = 8 * params  # two AdamW moments; the fp32 gradients are counted with the activations
    else:
        base = compute * params
        if method.quantized:
            biggest = max(a * b for a, b in shape.linear_shapes().values())  # dequantised one at a time
            base = int(NF4_BYTES_PER_PARAM * linear) + compute * (params - linear + biggest)
        weights = base + 4 * adapters + (2 * adapters if device == "cuda" else 0)  # + autocast copies
        trainable = 12 * adapters
    per_layer = _layer_activation_bytes(shape, method, fused, stream, compute, lora_r if method.trains_adapter else 0)
    # Backward also holds gradients in flight inside the layer it is in, the largest being the MLP's
    # (one intermediate-sized buffer per token): small next to all layers' activations, not next to
    # checkpointing's one layer at a time (which it recomputes, so holds twice).
    in_flight = tokens * compute * shape.intermediate_size
    recomputed = tokens * per_layer if gradient_checkpointing else 0
    activations = saved_by_forward(shape, tokens, gradient_checkpointing, per_layer, stream) + recomputed + in_flight
    logits = sum(_loss_bytes(shape, method, compute, stream, tokens))
    if method == Method.FULL:
        # Backward frees each layer's activations as it fills that layer's gradients, so the step
        # holds (most of) the activations or the fp32 gradients, not both: the larger counts. The
        # vocabulary matrix's gradient is formed once more than it is kept (twice when tied).
        vocab_gradient = 4 * shape.vocab_size * shape.hidden_size * (2 if shape.tied_embeddings else 1)
        activations = max(activations, 4 * params // num_gpus + vocab_gradient - logits)
    if num_gpus > 1:
        if method == Method.FULL:  # FSDP2: shards, plus gathered whole: the root (embeddings, head, final norm)
            layer = 4 * (linear // shape.num_layers)  # and two layers (one in use, one prefetched)
            weights = 4 * params // num_gpus + copies + 2 * layer + 4 * (params - linear)
            trainable = 8 * params // num_gpus
        else:  # DDP: the all-reduce buckets hold the adapters' gradients once more
            trainable += 4 * adapters
    allocated = weights + trainable + activations + logits
    fragmentation = FRAGMENTATION[device]
    if device == "cuda" and method == Method.FULL and gradient_checkpointing:
        fragmentation += CHECKPOINTED_FULL_FRAGMENTATION
    return MemoryEstimate(
        method=method, device=device, tokens=tokens, gradient_checkpointing=gradient_checkpointing,
        fused_kernels=fused, weights=weights, trainable_state=trainable, activations=activations, logits=logits,
        overhead=RUNTIME_OVERHEAD[device] + int(fragmentation * allocated),
    )


def saved_by_forward(shape: ModelShape, tokens: int, gradient_checkpointing: bool, per_layer: int,
                     stream: int) -> int:
    """What autograd keeps from the forward pass for backward: every layer's activations, or with
    checkpointing only each layer's input (tests/test_memory.py measures it with saved-tensor hooks)."""
    if gradient_checkpointing:
        return tokens * shape.num_layers * shape.hidden_size * stream
    return tokens * shape.num_layers * per_layer


def _layer_activation_bytes(shape: ModelShape, method: Method, fused: bool, stream: int, compute: int,
                            lora_r: int) -> int:
    """Bytes autograd keeps per token for one decoder layer."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    # Each norm keeps its input (unfused: an fp32 copy and its normalised output as well). Its output
    # is kept by the projections that read it; under autocast with fp32 weights (full fine-tuning)
    # each projection keeps its own bf16 cast of it: 3 for q/k/v, 2 for gate/up.
    norm = stream * h if fused else 4 * h + stream * h
    if method == Method.FULL and compute == 2:  # autocast
        norm_outputs = 5 * compute * h
    else:
        norm_outputs = 2 * stream * h
    # FlashAttention (varlen on CUDA; SDPA's flash kernel on CPU): q, k, v, the output and a float
    # log-sum-exp per head; key/value heads are not repeated for GQA.
    attention = compute * (2 * q + 2 * kv) + 4 * shape.num_heads
    if shape.model_type == "qwen3":  # a per-head RMSNorm on q and k keeps their inputs
        attention += (compute if fused else 4 + compute) * (q + kv)
    if shape.model_type == "phi3":  # v is a view of the fused q/k/v output, which so stays alive whole
        attention += compute * (q + kv)
    mlp = compute * (3 if fused else 4) * i  # gate, up (and the activation, unfused), their product
    adapters = compute * 7 * lora_r  # each adapter's rank-r intermediate
    return 2 * norm + norm_outputs + attention + mlp + adapters


def _loss_bytes(shape: ModelShape, method: Method, compute: int, stream: int, tokens: int) -> tuple[int, int]:
    """The fused loss, as (working, kept): a chunk of logits (fp32, and the compute-dtype gradient)
    while it runs; the answer tokens' hidden states and their gradient, and with a training head,
    its gradient and a compute-dtype copy. (Measured, the two add up: the peak holds both.)"""
    chunk = min(tokens, max(64, LOSS_CHUNK_BYTES // (4 * shape.vocab_size)))
    working = chunk * shape.vocab_size * (6 if compute == 2 else 4)  # fp32 logits + bf16 source/gradient
    kept = 2 * tokens * shape.hidden_size * stream
    if method == Method.FULL:
        kept += shape.vocab_size * shape.hidden_size * (4 + compute)
    return working, kept
