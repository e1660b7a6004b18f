"""Peak training memory, estimated from a model's config.json alone (no weights are loaded).

It models this project's trainer (tasks/engine/train_loop.py, tasks/engine/modeling.py) as it is; a test runs the
trainer on CPU and checks the estimate against it, and benchmarks/gpu_memory.py measures it on a
GPU (benchmarks/results/). What it counts:
- weights: full fine-tuning keeps fp32 master weights, plus on CUDA the bf16 copies autocast makes of
  every linear weight for the step, or (full_precision "bf16") bf16 weights only; LoRA freezes a base
  in the compute dtype (bf16 on CUDA, fp32 on CPU); QLoRA's linear layers are NF4 with double
  quantisation, everything else in the compute dtype, plus one dequantised weight at a time.
- trainable state: AdamW's two moments (fp32; bf16 with bf16 weights: tasks/engine/bf16_adamw.py), and
  the adapters' fp32 gradients (full fine-tuning's gradients are weighed against the activations
  instead: backward frees one as it fills the other).
- activations: what autograd keeps per token of a packed micro-batch, layer by layer, for the
  kernels the trainer uses (varlen FlashAttention on CUDA; Liger's RMSNorm/RoPE/SwiGLU when
  installed; LoRA dropout fused into the adapter); for each checkpointed layer only its input, plus
  one layer being recomputed (checkpointing may cover the first layers only); and the gradients
  backward has in flight inside a layer.
- logits: the fused loss (tasks/engine/loss.py) works a chunk of tokens at a time; it keeps the gradient of
  the hidden states, and of the head when the head trains.
- overhead: CUDA context and allocator slack (measured on an H200; expandable segments on), or
  on CPU the Python process and its libraries.
Pure: no torch, no Prefect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, computed_field

from tasks.planning.methods import Method

GIB = 2**30
FullPrecision = Literal["fp32", "bf16"]  # full fine-tuning's weights: fp32 master weights, or bf16 (bf16_adamw.py)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax
RUNTIME_OVERHEAD = {"cuda": int(1.0 * GIB), "cpu": int(1.5 * GIB)}  # CUDA context + allocator; Python + libraries
FRAGMENTATION = {"cuda": 0.01, "cpu": 0.0}  # allocator slack, a share of what is allocated
# Full fine-tuning with checkpointing interleaves recomputed layers with the growing fp32 gradients,
# which leaves more room unused between allocations (measured: 1.2-2.8 GiB more reserved than allocated).
CHECKPOINTED_FULL_FRAGMENTATION = 0.04
LOSS_CHUNK_BYTES = 512 * 2**20  # fp32 logits per chunk of the fused loss (tasks/engine/loss.py)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Other names some configs give the same sizes (GPT-2 and kin), read only for the conservative estimate.
FIELD_ALIASES = {"hidden_size": ("n_embd", "d_model"), "num_hidden_layers": ("n_layer", "num_layers"),
                 "num_attention_heads": ("n_head", "num_heads"),
                 "intermediate_size": ("ffn_hidden_size", "n_inner", "ffn_dim", "moe_intermediate_size")}
# How much the conservative estimate (a family without a formula) adds to what its formula gives.
MOE_BUFFERS_IN_FLIGHT = 6  # expert-intermediate buffers per routed token while backward is in an MoE layer
CONSERVATIVE_MARGIN = 1.25  # on activations and the loss
CONSERVATIVE_PARAMETER_MARGIN = 1.02  # on weights and optimizer states: biases, norms, buffers it cannot see


@dataclass(frozen=True)
class Family:
    """The layout of a decoder layer that changes what training keeps, as transformers builds it
    (read in transformers 5.24's models/<family>/modeling_*.py). Defaults are Llama's: two RMSNorms
    before attention and MLP, separate q/k/v and gate/up projections, no biases."""
    pre_norms: int = 2  # hidden-size norms on the residual stream before attention / MLP
    post_norms: int = 0  # norms on the attention / MLP outputs (Gemma 2/3, GLM-4 sandwich; OLMo 2 has only these)
    qk_norm: str = ""  # "head": an RMSNorm per head on q and k (Qwen3, Gemma 3); "full": over all heads (OLMo 2)
    fused_qkv: bool = False  # one q/k/v matrix (Phi-3): v is a view of its output, which stays alive whole
    fused_gate_up: bool = False  # one gate/up matrix (Phi-3, GLM-4)
    parallel: bool = False  # attention and MLP read one norm's output side by side (Cohere 2)
    layer_norm: bool = False  # LayerNorm (mean and variance) instead of RMSNorm
    qkv_bias: bool | None = None  # biases on q/k/v whatever the config says (Qwen2); None: attention_bias
    o_bias: bool | None = None  # None: attention_bias
    defaults: tuple = ()  # config fields the family's config class defaults (a saved config.json omits them)


TIED = ("tie_word_embeddings", True)
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True, o_bias=False),
    "qwen3": Family(qk_norm="head"),
    "gemma": Family(defaults=(TIED, ("head_dim", 256))),
    "phi3": Family(fused_qkv=True, fused_gate_up=True),
    "gemma2": Family(post_norms=2, defaults=(TIED, ("head_dim", 256))),
    "gemma3_text": Family(post_norms=2, qk_norm="head", defaults=(TIED, ("head_dim", 256))),
    "olmo2": Family(pre_norms=0, post_norms=2, qk_norm="full"),
    "granite": Family(),
    "smollm3": Family(defaults=(TIED,)),
    "glm4": Family(post_norms=2, fused_gate_up=True, o_bias=False,
                   defaults=(("head_dim", 128), ("attention_bias", True))),
    "cohere2": Family(pre_norms=1, parallel=True, layer_norm=True, defaults=(TIED, ("head_dim", 128))),
}
KNOWN_MODEL_TYPES = tuple(FAMILIES)
# What the conservative estimate assumes of a layout it does not know: every norm and copy above.
UNKNOWN_FAMILY = Family(pre_norms=2, post_norms=2, qk_norm="full", fused_qkv=True, layer_norm=True)
# Mixture-of-experts families: their layout is known (and their config's experts, top-k and shared
# experts are read), but their estimate stays conservative until GPU points verify it. Their heads
# are plain (the fused loss applies).
MOE_FAMILIES: dict[str, Family] = {
    "mixtral": Family(),
    "qwen2_moe": Family(qkv_bias=True, o_bias=False),
    "qwen3_moe": Family(qk_norm="head"),
}
MOE_MODEL_TYPES = tuple(MOE_FAMILIES)
# The trainer computes the loss from the final hidden states with its fused loss only for these
# families, whose logits transforms it knows (LOGIT_TRANSFORMS); any other family's own head makes
# its logits (tasks/engine/train_loop.py), at the cost of keeping them.
FUSED_LOSS_MODEL_TYPES = KNOWN_MODEL_TYPES + MOE_MODEL_TYPES
# Config fields that transform the logits: final soft-capping (Gemma 2/3), a scale (Cohere), a divisor (Granite).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Decoder-only causal LMs by model_type, for a config.json that names no `architectures` (tests check
# each is in transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES).
CAUSAL_LM_MODEL_TYPES = KNOWN_MODEL_TYPES + MOE_MODEL_TYPES + (
    "gpt2", "gpt_neox", "gptj", "falcon", "starcoder2", "stablelm", "olmo", "olmoe", "cohere", "granitemoe",
    "phi", "qwen3_next", "deepseek_v2", "deepseek_v3", "exaone4", "ministral", "gemma3", "glm",
    "hunyuan_v1_dense", "seed_oss", "apertus", "arcee", "ernie4_5", "dots1", "bitnet", "helium", "nemotron",
    "mamba", "mamba2", "falcon_mamba", "jamba", "falcon_h1",
)


class UnsupportedModelError(ValueError):
    """The config does not describe a decoder-only causal language model."""


def causal_lm_problem(config: dict) -> str | None:
    """Why `config` is not a decoder-only causal LM the trainer can load, or None when it is.

    Read from the config alone: its `architectures` (what the checkpoint was saved as), else its
    model_type against the causal-LM families transformers knows."""
    model_type = config.get("model_type", "?")
    if config.get("is_encoder_decoder"):
        return f"model_type {model_type!r} is an encoder-decoder model (is_encoder_decoder: true)"
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if architectures:
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return None
        if "text_config" in config and any(a.endswith("ForConditionalGeneration") for a in architectures):
            return None  # a multimodal wrapper around a text decoder
        return f"its architectures ({', '.join(architectures)}) name no causal LM (...ForCausalLM)"
    if model_type in CAUSAL_LM_MODEL_TYPES:
        return None
    return f"it names no architectures and model_type {model_type!r} is not a causal-LM family this project knows"


def _field(config: dict, name: str):
    for key in (name, *FIELD_ALIASES.get(name, ())):
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            return config[key]
    return None


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
    family: Family = Family()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Mixture of experts: every expert's weights are resident; each token runs experts_per_token of them.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    # Attention logit soft-capping (Gemma 2): only eager attention computes it, which keeps the
    # whole (heads x tokens x tokens) score matrix of a micro-batch (tasks/engine/attention.py).
    attention_softcapping: bool = False
    # Final logit soft-capping (Gemma 2/3): the fused loss keeps the cap's slope beside each chunk of logits.
    logit_softcapping: bool = False
    # State-space layers (Mamba and hybrids): the state size of their selective scan, 0 without.
    ssm_state_size: int = 0
    # False: no formula for this family; the estimate is a conservative one from its sizes, unverified.
    verified: bool = True

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        # Multimodal wrappers keep the language model's fields under text_config.
        config = {**config, **config.get("text_config", {})}
        model_type = config.get("model_type", "?")
        problem = causal_lm_problem(config)
        if problem:
            raise UnsupportedModelError(
                f"{source}: {problem}. This project fine-tunes decoder-only causal language models: a "
                "config.json whose architectures end in ForCausalLM (e.g. LlamaForCausalLM, Qwen3ForCausalLM, "
                "Gemma2ForCausalLM); use the causal-LM checkpoint of the model, or one of the supported "
                f"families ({', '.join(FUSED_LOSS_MODEL_TYPES)})."
            )
        family = FAMILIES.get(model_type) or MOE_FAMILIES.get(model_type)
        config = {**dict(family.defaults), **config} if family else config
        sizes = {f: _field(config, f) for f in REQUIRED_FIELDS}
        if family is None and isinstance(sizes["hidden_size"], int):  # sizes the conservative estimate assumes
            if sizes["intermediate_size"] is None:
                sizes["intermediate_size"] = 4 * sizes["hidden_size"]  # GPT-2's default MLP width
            if sizes["num_attention_heads"] is None:  # no attention (state-space models): heads of 128
                sizes["num_attention_heads"] = max(1, sizes["hidden_size"] // 128)
        missing = [f for f, v in sizes.items() if v is None]
        if missing:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} lacks {', '.join(missing)}; the memory estimator reads a "
                "decoder's sizes from these config.json fields (add them as the model's config class names them)."
            )
        heads = sizes["num_attention_heads"]
        experts = _field(config, "num_local_experts") or _field(config, "num_experts") \
            or _field(config, "n_routed_experts") or 0
        shared = _field(config, "shared_expert_intermediate_size") or (
            (_field(config, "n_shared_experts") or 0) * (_field(config, "moe_intermediate_size") or 0))
        bias = bool(config.get("attention_bias", False))
        qkv_bias = family.qkv_bias if family and family.qkv_bias is not None else bool(config.get("qkv_bias", bias))
        return cls(
            model_type=model_type,
            hidden_size=sizes["hidden_size"],
            intermediate_size=sizes["intermediate_size"],
            num_layers=sizes["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or sizes["hidden_size"] // heads,
            vocab_size=sizes["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            family=family or UNKNOWN_FAMILY,
            qkv_bias=qkv_bias,
            o_bias=family.o_bias if family and family.o_bias is not None else bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            num_experts=experts,
            experts_per_token=(_field(config, "num_experts_per_tok") or _field(config, "moe_topk") or 2)
            if experts else 0,
            expert_intermediate_size=(_field(config, "moe_intermediate_size") or sizes["intermediate_size"])
            if experts else 0,
            shared_expert_intermediate_size=shared if experts else 0,
            attention_softcapping=config.get("attn_logit_softcapping") is not None,
            logit_softcapping=config.get("final_logit_softcapping") is not None,
            ssm_state_size=next((config[k] for k in ("state_size", "ssm_state_size", "mamba_d_state")
                                 if isinstance(config.get(k), int)), 0) if family is None else 0,
            verified=model_type in FAMILIES,
        )

    @property
    def basis(self) -> str:
        """How the estimate for this model is made, for plan tables and manifests."""
        if self.verified:
            return f"formula for {self.model_type}"
        return (f"conservative, unverified: no memory formula for {self.model_type!r}; estimated from the "
                f"config's sizes{' with every expert resident' if self.num_experts else ''}, "
                f"+{CONSERVATIVE_MARGIN - 1:.0%} on activations")

    @property
    def fused_loss(self) -> bool:
        """Whether the trainer's fused loss makes the logits (else the model's own head: all kept)."""
        return self.model_type in FUSED_LOSS_MODEL_TYPES

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each nn.Linear in one decoder layer (what 4-bit quantisation and LoRA reach),
        named as the model names them. A mixture of experts' experts are not linear layers."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {"qkv_proj": (h, q + 2 * kv)} if self.family.fused_qkv and self.family is not UNKNOWN_FAMILY else \
            {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv)}
        shapes["o_proj"] = (q, h)
        if self.num_experts:
            if self.shared_expert_intermediate_size:
                s = self.shared_expert_intermediate_size
                shapes.update({"shared_expert.gate_proj": (h, s), "shared_expert.up_proj": (h, s),
                               "shared_expert.down_proj": (s, h), "shared_expert_gate": (h, 1)})
            return shapes
        if self.family.fused_gate_up:
            shapes["gate_up_proj"] = (h, 2 * i)
        else:
            shapes.update({"gate_proj": (h, i), "up_proj": (h, i)})
        shapes["down_proj"] = (i, h)
        return shapes

    @property
    def linear_parameters(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def expert_parameters(self) -> int:
        """Every expert's weights and the routers: parameters that are not in linear layers (so
        QLoRA leaves them in the compute dtype) and that LoRA on all-linear does not adapt."""
        h = self.hidden_size
        return self.num_layers * self.num_experts * (3 * h * self.expert_intermediate_size + h)

    @property
    def parameters(self) -> int:
        h = self.hidden_size
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        f = self.family
        norm_width = 2 if f is UNKNOWN_FAMILY else 1  # perhaps a LayerNorm with a bias: twice
        norms = ((f.pre_norms + f.post_norms) * self.num_layers + 1) * h * norm_width
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qk_norms = {"": 0, "head": 2 * self.head_dim, "full": q + kv}[f.qk_norm] * self.num_layers
        biases = self.num_layers * ((q + 2 * kv) * self.qkv_bias + h * self.o_bias
                                    + (2 * self.intermediate_size + h) * self.mlp_bias)
        return embeddings + self.linear_parameters + self.expert_parameters + norms + qk_norms + biases

    def lora_parameters(self, r: int, targets: list[str] | str = "all-linear") -> int:
        shapes = self.linear_shapes()
        # a mixture of experts: attention and the shared expert's MLP (tasks/engine/modeling.py, MOE_LORA_TARGETS)
        names = [n for n in shapes if n != "shared_expert_gate"] if targets == "all-linear" else \
            [n for n in shapes if n.split(".")[-1] in targets]
        return self.num_layers * sum(r * (a + b) for n, (a, b) in shapes.items() if n in names)


class MemoryEstimate(BaseModel):
    method: Method
    device: str
    tokens: int  # packed tokens per micro-batch
    gradient_checkpointing: bool
    checkpointed_layers: int = 0  # decoder layers recomputed in backward (the first ones), when checkpointing
    full_precision: FullPrecision = "fp32"  # full fine-tuning's weights (adapters: fp32)
    fused_kernels: bool
    weights: int
    trainable_state: int  # optimizer states (and the adapters' gradients)
    activations: int  # full fine-tuning: or the gradients (less the logits), whichever is larger
    logits: int
    overhead: int
    verified: bool = True  # False: no formula for the model's family; a conservative estimate (see basis)
    measured: bool = False  # True: made from a probe on the GPU (tasks/planning/measured.py), not a formula
    basis: str = ""  # how the estimate was made (ModelShape.basis, or the probe's figures)

    @computed_field  # plan tables and manifests say it in words
    @property
    def kind(self) -> str:
        if self.measured:
            return "measured (probe)"
        return "formula" if self.verified else "conservative (unverified)"

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
    checkpointed_layers: int | None = None,
    objective: str = "sft",
    full_precision: FullPrecision = "fp32",
) -> MemoryEstimate:
    """Peak memory of one GPU (or the CPU) in a training step on micro-batches of `tokens` packed tokens.

    `checkpointed_layers`: with gradient checkpointing, how many decoder layers (the first ones) are
    recomputed; the rest keep their activations (tasks/engine/modeling.checkpoint_layers). Default: all.

    `fused_kernels`: whether Liger's kernels run (tasks/engine/kernels.py); by default, on CUDA.
    `num_gpus` > 1: one process per GPU (tasks/engine/distributed.py). Full fine-tuning is sharded (FSDP2):
    each GPU keeps 1/n of the weights, gradients and optimizer states, plus the layer being gathered;
    adapters run data-parallel (DDP): every GPU holds the whole base, plus a second copy of the
    adapters' gradients for the all-reduce.

    `objective`: dpo and orpo make their log-probs with the model's own head (tasks/engine/preference.py),
    not the fused loss; DPO's full fine-tuning also holds a frozen copy of the base as its reference, as the weights
    (tasks/train.preference_objective), where adapters need none (the base with the adapter switched off).

    `full_precision`: full fine-tuning's weights: "fp32" (master weights, bf16 autocast on CUDA) or
    "bf16" (bf16 weights, gradients and AdamW moments; tasks/engine/bf16_adamw.py). Adapters ignore it.
    """
    method = Method(method)  # a ValueError naming the value when it is no method
    layers = shape.num_layers
    checkpointed = checkpointed_count(layers, gradient_checkpointing, checkpointed_layers)
    fused = device == "cuda" if fused_kernels is None else fused_kernels and device == "cuda"
    compute, stream = _element_bytes(method, device, full_precision)
    master = method == Method.FULL and stream == 4  # fp32 master weights (a bf16 full run has none)
    params, linear = shape.parameters, shape.linear_parameters
    unquantized = linear + shape.expert_parameters  # matmul weights (experts run on autocast copies too)
    adapters = shape.lora_parameters(lora_r, lora_targets) if method.trains_adapter else 0
    if method == Method.FULL:
        # Autocast's bf16 copies of the linear weights live until backward reaches their layer; a
        # checkpointed layer's forward keeps none, so of those only the recomputed layer's copies exist.
        per_layer_copies = 2 * unquantized // layers
        copies = 0 if device != "cuda" or not master else per_layer_copies * (layers - checkpointed + (1 if checkpointed else 0))
        weights = stream * params + copies + (stream * params if objective == "dpo" else 0)  # the reference: as the weights
        trainable = 2 * stream * params  # two AdamW moments; the gradients are counted with the activations
    else:
        base = compute * params
        if method.quantized:
            biggest = max(a * b for a, b in shape.linear_shapes().values())  # dequantised one at a time
            # (experts are no linear layers: bitsandbytes leaves them in the compute dtype)
            base = int(NF4_BYTES_PER_PARAM * linear) + compute * (params - linear + biggest)
        weights = base + 4 * adapters + (2 * adapters if device == "cuda" else 0)  # + autocast copies
        trainable = 12 * adapters
    per_layer = _layer_activation_bytes(shape, method, fused, stream, compute, lora_r if method.trains_adapter else 0)
    # Backward also holds gradients in flight inside the layer it is in, the largest being the MLP's
    # (one intermediate-sized buffer per token): small next to all layers' activations, not next to
    # checkpointing's one layer at a time (which it recomputes, so holds twice). A mixture of experts
    # holds more: each routed copy of a token's gate and up outputs, the activation and their gradients
    # (measured on the H200, mixtral 4 layers, QLoRA with checkpointing: 6.7% under with one buffer).
    in_flight = tokens * compute * max(shape.intermediate_size if not shape.num_experts else 0,
                                       MOE_BUFFERS_IN_FLIGHT * shape.experts_per_token * shape.expert_intermediate_size,
                                       shape.shared_expert_intermediate_size)
    recomputed = tokens * per_layer if checkpointed else 0
    activations = saved_by_forward(shape, tokens, checkpointed, per_layer, stream, fused) + recomputed + in_flight
    if shape.attention_softcapping:  # eager attention: the score matrices of each plain layer, and
        # with checkpointing the recomputed layer's scores and their gradient
        scored = layers - checkpointed + (2 if checkpointed else 0)
        activations += eager_attention_bytes(shape, tokens, compute) * scored
    logits = sum(_loss_bytes(shape, method, compute, stream, tokens, fused=objective == "sft"))
    if not shape.verified:
        activations, logits = int(activations * CONSERVATIVE_MARGIN), int(logits * CONSERVATIVE_MARGIN)
        weights = int(weights * CONSERVATIVE_PARAMETER_MARGIN)
        trainable = int(trainable * CONSERVATIVE_PARAMETER_MARGIN)
    if method == Method.FULL:
        # Backward frees each layer's activations as it fills that layer's gradients, so the step
        # holds (most of) the activations or the fp32 gradients, not both: the larger counts. The
        # vocabulary matrix's gradient is formed once more than it is kept (twice when tied).
        vocab_gradient = stream * shape.vocab_size * shape.hidden_size * (2 if shape.tied_embeddings else 1)
        activations = max(activations, stream * params // num_gpus + vocab_gradient - logits)
    if num_gpus > 1:
        if method == Method.FULL:  # FSDP2: shards, plus gathered whole: the root (embeddings, head, final norm)
            layer = 4 * (linear // shape.num_layers)  # and two layers (one in use, one prefetched)
            weights = 4 * params // num_gpus + copies + 2 * layer + 4 * (params - linear)
            trainable = 8 * params // num_gpus
        else:  # DDP: the all-reduce buckets hold the adapters' gradients once more
            trainable += 4 * adapters
    return MemoryEstimate(
        method=method, device=device, tokens=tokens, gradient_checkpointing=bool(checkpointed),
        checkpointed_layers=checkpointed, full_precision=full_precision if method == Method.FULL else "fp32",
        fused_kernels=fused, weights=weights, trainable_state=trainable, activations=activations, logits=logits,
        overhead=overhead_bytes(device, method, checkpointed, weights + trainable + activations + logits),
        verified=shape.verified, basis=shape.basis,
    )


def overhead_bytes(device: str, method: Method, checkpointed: int, allocated: int) -> int:
    """What the process holds beyond the allocator's allocations: the runtime (CUDA context, or Python
    and its libraries) and the allocator's slack, a share of the `allocated` bytes."""
    fragmentation = FRAGMENTATION[device]
    if device == "cuda" and method == Method.FULL and checkpointed:
        fragmentation += CHECKPOINTED_FULL_FRAGMENTATION
    return RUNTIME_OVERHEAD[device] + int(fragmentation * allocated)


def kept_for_backward(shape: ModelShape, method: Method | str, device: str, tokens: int, gradient_checkpointing: bool,
                      lora_r: int = 16, fused_kernels: bool = False, checkpointed_layers: int | None = None,
                      full_precision: FullPrecision = "fp32") -> int:
    """What autograd keeps from the forward pass of one micro-batch of `tokens` packed tokens for backward:
    the layers' activations (or their inputs, with checkpointing), eager attention's score matrices and
    the loss's. The part of the estimate tests measure with saved-tensor hooks on the trainer's own forward."""
    method = Method(method)
    compute, stream = _element_bytes(method, device, full_precision)
    fused = fused_kernels and device == "cuda"
    per_layer = _layer_activation_bytes(shape, method, fused, stream, compute, lora_r if method.trains_adapter else 0)
    checkpointed = checkpointed_count(shape.num_layers, gradient_checkpointing, checkpointed_layers)
    kept = saved_by_forward(shape, tokens, checkpointed, per_layer, stream, fused)
    if shape.attention_softcapping:
        kept += (shape.num_layers - checkpointed) * eager_attention_bytes(shape, tokens, compute)
    kept += _loss_bytes(shape, method, compute, stream, tokens)[1]
    return kept if shape.verified else int(kept * CONSERVATIVE_MARGIN)


def _element_bytes(method: Method, device: str, full_precision: FullPrecision) -> tuple[int, int]:
    """(compute, stream): bytes per element of a matmul output (bf16 on CUDA, or in a bf16 full run;
    else fp32), and of the residual stream (fp32 with fp32 master weights or on the CPU)."""
    if method == Method.FULL and full_precision == "bf16":
        return 2, 2
    compute = 2 if device == "cuda" else 4
    return compute, 4 if method == Method.FULL or device == "cpu" else compute


def saved_by_forward(shape: ModelShape, tokens: int, checkpointed: int, per_layer: int, stream: int,
                     fused: bool = True) -> int:
    """What autograd keeps from the forward pass for backward: a plain layer's activations, and only
    the input of each of the `checkpointed` layers (tests/test_memory.py measures it with saved-tensor hooks);
    with a 16-bit stream and unfused norms, the final norm's fp32 copy of its input as well."""
    final_norm = 4 * shape.hidden_size if stream == 2 and not fused else 0
    return tokens * (checkpointed * shape.hidden_size * stream + (shape.num_layers - checkpointed) * per_layer
                     + final_norm)


def checkpointed_count(layers: int, gradient_checkpointing: bool, checkpointed_layers: int | None) -> int:
    """How many of `layers` decoder layers are recomputed: none without checkpointing, else
    `checkpointed_layers` (all when not given)."""
    if not gradient_checkpointing:
        return 0
    return layers if checkpointed_layers is None else max(1, min(layers, checkpointed_layers))


def _layer_activation_bytes(shape: ModelShape, method: Method, fused: bool, stream: int, compute: int,
                            lora_r: int) -> int:
    """Bytes autograd keeps per token for one decoder layer."""
    f = shape.family
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    # Each norm keeps its input (unfused: an fp32 copy and its normalised output as well; a
    # LayerNorm its centred input too). A pre-norm's output is kept by the projections that read it;
    # under autocast with fp32 weights (full fine-tuning) each projection keeps its own bf16 cast of
    # it: 3 for q/k/v, 2 for gate/up. Without pre-norms (OLMo 2) they keep the residual stream instead.
    norm = stream * h if fused else 4 * h + stream * h
    if f.layer_norm and not fused:
        norm += 4 * h
    if method == Method.FULL and not fused:  # a trained norm weight keeps its normalised input for its gradient
        norm += stream * h
    if method == Method.FULL and stream != compute:  # autocast over fp32 weights
        norm_outputs = 5 * compute * h
    else:
        norm_outputs = (1 if f.parallel else 2) * stream * h
    # FlashAttention (varlen on CUDA; SDPA's flash kernel on CPU): q, k, v, the output and a float
    # log-sum-exp per head; key/value heads are not repeated for GQA.
    attention = compute * (2 * q + 2 * kv) + 4 * shape.num_heads
    if shape.attention_softcapping:  # eager attention repeats key/value heads (the scores: eager_attention_bytes)
        attention += compute * 2 * (q - kv)
    if f.qk_norm:  # an RMSNorm on q and k keeps their inputs
        attention += (compute if fused else 4 + compute) * (q + kv)
    if f.fused_qkv:  # v is a view of the fused q/k/v output, which so stays alive whole
        attention += compute * (q + kv)
    if shape.num_experts:
        # the router's logits and probabilities (fp32); for each of a token's top-k experts: its
        # gathered input, gate/up and their product (grouped matmuls); a shared expert as a dense MLP
        e = shape.expert_intermediate_size
        mlp = 12 * shape.num_experts + compute * shape.experts_per_token * (h + 3 * e)
        if method == Method.FULL:  # the experts' weights train: their matmuls keep inputs for the weight gradients
            mlp += compute * shape.experts_per_token * (h + e)
        if shape.shared_expert_intermediate_size:  # its MLP, and its sigmoid gate's output and gated input
            mlp += compute * (4 * shape.shared_expert_intermediate_size + 2 * h)
    else:
        mlp = compute * (3 if fused else 4) * i  # gate, up (and the activation, unfused), their product
    adapters = compute * 7 * lora_r  # each adapter's rank-r intermediate
    # a selective scan keeps about three (intermediate x state) fp32 tensors per token (measured on
    # transformers' reference scan; the mamba_ssm kernels keep less)
    ssm = 4 * 3 * i * shape.ssm_state_size
    return ssm + (f.pre_norms + f.post_norms) * norm + norm_outputs + attention + mlp + adapters


def eager_attention_bytes(shape: ModelShape, tokens: int, compute: int) -> int:
    """Eager attention (soft-capped logits) keeps a layer's score matrices for backward, for the whole
    packed micro-batch, one tokens x tokens matrix per head each: tanh's output (the soft-capped scores),
    softmax's fp32 output, and in 16-bit training the probabilities cast back for the product with the
    values (measured on the H200: gemma2-2b LoRA, 8,192 tokens, 138 GiB; without that copy the estimate
    was 23% under)."""
    cast_copy = compute if compute != 4 else 0
    return shape.num_heads * tokens * tokens * (compute + 4 + cast_copy)


def _head_gradient_bytes(shape: ModelShape, compute: int, stream: int) -> int:
    """A training head's gradient, summed in fp32, and with fp32 master weights their compute-dtype copy."""
    return shape.vocab_size * shape.hidden_size * (4 + compute if stream == 4 else 4)


def _loss_bytes(shape: ModelShape, method: Method, compute: int, stream: int, tokens: int,
                fused: bool = True) -> tuple[int, int]:
    """The fused loss, as (working, kept): a chunk of logits (fp32, and the compute-dtype gradient)
    while it runs; the answer tokens' hidden states and their gradient, and with a training head,
    its gradient and a compute-dtype copy. (Measured, the two add up: the peak holds both.)"""
    if not (shape.fused_loss and fused):
        # the model's own head (tasks/engine/train_loop.py): the logits' log-softmax (fp32) is kept,
        # and their gradient made in backward; the head keeps its input
        working = tokens * shape.vocab_size * (4 + compute)
        kept = tokens * shape.vocab_size * 4 + tokens * shape.hidden_size * stream
        if method == Method.FULL:
            kept += _head_gradient_bytes(shape, compute, stream)
        return working, kept
    chunk = min(tokens, max(64, LOSS_CHUNK_BYTES // (4 * shape.vocab_size)))
    working = chunk * shape.vocab_size * (6 if compute == 2 else 4)  # fp32 logits + bf16 source/gradient
    if shape.logit_softcapping:
        working += chunk * shape.vocab_size * 4  # the soft cap's slope (fp32)
    kept = 2 * tokens * shape.hidden_size * stream
    if method == Method.FULL:
        kept += _head_gradient_bytes(shape, compute, stream)
    return working, kept
