"""Memory and FLOPs of one training step before launching it (torch-free; tools/plan.py).

Counts are per GPU (one tensor/context/pipeline-parallel rank) for megalong's own layout:
megatron-core local or TE layers, LoRA+ adapters (DESIGN.md §7) or full fine-tuning, megatron
DDP with fp32 gradient buffers, megatron's Adam, S²-Attn or dense attention through a flash-style
kernel (no N x N matrix is ever stored). See docs/PERF.md for how close it comes to measured
peaks.

What is planned is a training job's own typed configuration (megalong/config/job.py), read under
its flags' names:

    job = JobConfig().with_flags(seq_length=32768, tensor_model_parallel_size=8, bf16=True,
                                 sequence_parallel=True, recompute_granularity="full")
    memory_breakdown(PlanConfig(PRESETS["llama2-70b"], job))
"""

from dataclasses import dataclass
from typing import Dict, Optional

from megalong.config import weight_map
from megalong.config.arch import VOCAB_DIVISIBLE_BY, LlamaArch
from megalong.config.job import JobConfig
from megalong.config.lora import LoraConfig
from megalong.config.model import ModelConfig
from megalong.config.parallel import ParallelConfig
from megalong.config.training import TrainingConfig
from megalong.errors import MegalongError


# The recompute choices the planner tells apart (recompute_flags: as training's flags).
RECOMPUTE = ("full", "selective", "none")
GIB = 2**30


def recompute_flags(recompute: str, layers: Optional[int] = None) -> dict:
    """A recompute choice as TrainingConfig's flags: full | selective | none, and with full
    `layers` K: megatron's block method, only the first K layers of each stage (None: every
    layer, the uniform method)."""
    if recompute not in RECOMPUTE:
        raise MegalongError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    return {"recompute_granularity": None if recompute == "none" else recompute,
            "recompute_method": "uniform" if layers is None else "block",
            "recompute_num_layers": 1 if layers is None else layers}


@dataclass(frozen=True)
class PlanConfig:
    """A training job (its typed configuration) on an architecture, and where it runs. The
    planner reads the job's concerns: parallel (tensor / context / pipeline sizes, sequence
    parallel), model (seq_length, attention, S²-Attn group size), training (micro_batch_size,
    bf16, recompute_granularity / recompute_method / recompute_num_layers, loss_chunk_tokens)
    and lora (lora_rank, lora_targets, trainable_params, full_finetune). With uniform full
    recompute it re-runs one layer at a time (recompute_num_layers is not modelled)."""
    arch: LlamaArch
    job: JobConfig
    # A GPU run: torch's fused RMSNorm and megatron's fused SwiGLU (megalong uses them on GPUs),
    # and the GPU attention kernels' contiguous copies of S²-Attn's folded q/k/v.
    gpu: bool = True
    vocab_divisible_by: int = VOCAB_DIVISIBLE_BY  # Megatron-LM's --make-vocab-size-divisible-by

    def __post_init__(self):
        arch, parallel, training = self.arch, self.parallel, self.training
        tp = parallel.tensor_model_parallel_size
        pp = parallel.pipeline_model_parallel_size
        cp = parallel.context_parallel_size
        if training.recompute_granularity not in ("full", "selective", None):
            raise MegalongError(f"recompute_granularity must be full, selective or None (no "
                                f"recompute), got {training.recompute_granularity!r}")
        if training.recompute_method not in ("uniform", "block"):
            raise MegalongError(f"recompute_method must be uniform or block, got "
                                f"{training.recompute_method!r}")
        if (training.recompute_granularity == "selective"
                and training.recompute_modules not in (None, ("core_attn",))):
            raise MegalongError(f"the planner models selective recompute of core_attn only, got "
                                f"recompute_modules {' '.join(training.recompute_modules)}")
        if self.model.attention not in ("s2", "full"):
            raise MegalongError(f"attention must be s2 or full, got {self.model.attention!r}")
        for name, value in (("tensor_model_parallel_size", tp), ("context_parallel_size", cp),
                            ("pipeline_model_parallel_size", pp),
                            ("micro_batch_size", training.micro_batch_size),
                            ("seq_length", self.seq_length)):
            if value < 1:
                raise MegalongError(f"{name} must be >= 1, got {value}")
        if arch.num_attention_heads % tp or arch.num_kv_heads % tp:
            raise MegalongError(f"tp {tp} must divide the {arch.num_attention_heads} query heads "
                                f"and {arch.num_kv_heads} kv heads")
        if arch.num_layers % pp:
            raise MegalongError(f"pp {pp} must divide the {arch.num_layers} layers")
        if self.seq_length % cp:
            raise MegalongError(f"cp {cp} must divide seq-length {self.seq_length}")
        if training.recompute_method == "block" and (
                training.recompute_granularity != "full"
                or not 0 < training.recompute_num_layers <= self.stage_layers):
            raise MegalongError(
                f"recompute_method block needs recompute_granularity full and "
                f"recompute_num_layers in 1..{self.stage_layers} (the layers of a stage), got "
                f"recompute_granularity {training.recompute_granularity}, recompute_num_layers "
                f"{training.recompute_num_layers}")
        self.lora.validate()
        self.group_size  # noqa: B018  (an S²-Attn group size that does not fit N is an error)

    # The job's concerns.
    @property
    def parallel(self) -> ParallelConfig:
        return self.job.parallel

    @property
    def model(self) -> ModelConfig:
        return self.job.model

    @property
    def training(self) -> TrainingConfig:
        return self.job.training

    @property
    def lora(self) -> LoraConfig:
        return self.job.lora

    # What the formulas derive from them.
    @property
    def seq_length(self) -> int:
        return self.model.seq_length_for(self.arch)

    @property
    def tokens(self) -> int:
        """T: the tokens of one micro-batch on this rank (its context-parallel slice)."""
        return (self.seq_length // self.parallel.context_parallel_size
                * self.training.micro_batch_size)

    @property
    def stage_layers(self) -> int:
        return self.arch.num_layers // self.parallel.pipeline_model_parallel_size

    @property
    def recompute(self) -> str:
        """full | selective | none (recompute_granularity)."""
        return self.training.recompute_granularity or "none"

    @property
    def recomputed_layers(self) -> int:
        """Layers per stage whose forward runs again in the backward (full recompute)."""
        if self.recompute != "full":
            return 0
        if self.training.recompute_method == "block":
            return self.training.recompute_num_layers
        return self.stage_layers

    @property
    def recompute_label(self) -> str:
        if self.recompute == "full" and self.training.recompute_method == "block":
            return f"block {self.training.recompute_num_layers}"
        return self.recompute

    @property
    def fused(self) -> bool:
        return self.gpu

    @property
    def group_size(self) -> Optional[int]:
        """S²-Attn's G (None with dense attention)."""
        return self.model.group_size_for(self.seq_length)

    @property
    def adapted_parts(self) -> tuple:
        """The HF linears that carry LoRA adapters (none with full fine-tuning)."""
        return () if self.lora.full_finetune else self.lora.options().parts

    @property
    def param_bytes(self) -> int:
        return 2 if self.training.bf16 else 4

    @property
    def padded_vocab(self) -> int:
        return self.arch.padded_vocab(self.vocab_divisible_by,
                                      self.parallel.tensor_model_parallel_size)


# ------------------------------------------------------------------- parameters


def layer_linear_params(arch: LlamaArch) -> Dict[str, int]:
    """Weights of one layer's linears (whole, not TP shards), by megatron linear (the weight map's
    shapes): linear_qkv, linear_proj, linear_fc1 (gate+up), linear_fc2."""
    return weight_map.linear_params(arch)


def lora_part_params(arch: LlamaArch, rank: int) -> Dict[str, tuple]:
    """(A params, B params, whether A is TP-split, whether B is TP-split) per HF part.
    Column-parallel bases split B, row-parallel bases split A (DESIGN.md §7)."""
    result = {}
    for part, (fan_in, fan_out) in weight_map.linear_shapes(arch).items():
        column = weight_map.LINEARS[weight_map.PART_TO_LINEAR[part]].tp_dim == 0
        result[part] = (rank * fan_in, fan_out * rank, not column, column)
    return result


def adapter_params(cfg: PlanConfig, *, per_rank: bool) -> int:
    """LoRA parameters of one layer (this TP rank's shard when per_rank)."""
    tp = cfg.parallel.tensor_model_parallel_size
    total = 0
    for part in cfg.adapted_parts:
        a, b, a_split, b_split = lora_part_params(cfg.arch, cfg.lora.lora_rank)[part]
        div_a = tp if per_rank and a_split else 1
        div_b = tp if per_rank and b_split else 1
        total += a // div_a + b // div_b
    return total


def parameter_counts(cfg: PlanConfig) -> Dict[str, int]:
    """Parameters held by the busiest rank (first pipeline stage with the embedding, last with
    the lm_head; with pp = 1 both), split by kind, and what trains."""
    arch, tp, pp = cfg.arch, cfg.parallel.tensor_model_parallel_size, \
        cfg.parallel.pipeline_model_parallel_size
    H = arch.hidden_size
    layers = cfg.stage_layers
    linear = sum(layer_linear_params(arch).values()) // tp
    norms = 2 * H
    vocab_rows = cfg.padded_vocab // tp
    embedding = vocab_rows * H
    lm_head = 0 if arch.tie_word_embeddings else vocab_rows * H
    stages = []
    extras = cfg.lora.trainable_extras
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        base = layers * (linear + norms) + (embedding if first else 0) \
            + ((lm_head + H) if last else 0)
        if arch.tie_word_embeddings and last and not first:
            base += embedding  # megatron keeps a copy of the tied weight on the last stage
        adapters = layers * adapter_params(cfg, per_rank=True)
        if cfg.lora.full_finetune:
            trainable = base
        else:
            trainable = adapters
            if "norm" in extras:
                trainable += layers * norms + (H if last else 0)
            if "embed" in extras and (first or arch.tie_word_embeddings and last):
                trainable += embedding
        stages.append({"base": base, "adapters": adapters, "trainable": trainable})
    return max(stages, key=lambda s: s["base"] + s["adapters"])


# ------------------------------------------------------------------- FLOPs


def attention_pairs(seq_length: int, group_size: int, attention: str) -> Dict[str, float]:
    """Causal (query, key) pairs one head computes: dense N(N+1)/2; S²-Attn's unshifted heads
    N/G groups of G(G+1)/2, shifted heads N/G - 1 whole groups plus two half groups."""
    N, G = seq_length, group_size
    if attention == "full":
        dense = N * (N + 1) / 2
        return {"unshifted": dense, "shifted": dense}
    whole = G * (G + 1) / 2
    half = (G // 2) * (G // 2 + 1) / 2
    return {"unshifted": (N // G) * whole, "shifted": (N // G - 1) * whole + 2 * half}


def step_flops(cfg: PlanConfig) -> Dict[str, float]:
    """FLOPs of one micro-batch's forward + backward over the whole model (all ranks):
    model = 2P forward + 2P input gradient + 2P_trainable weight gradient per token, P the
    matmul parameters (linears, adapters, lm_head; not the embedding lookup), plus attention:
    4 d per (query, key) pair and head forward (QK^T and PV), twice that backward.
    hardware adds what recompute repeats (full: the forward, without attention's when it is
    kept; selective: attention's forward)."""
    arch = cfg.arch
    micro_batch, attention = cfg.training.micro_batch_size, cfg.model.attention
    tokens = cfg.seq_length * micro_batch
    linears = arch.num_layers * sum(layer_linear_params(arch).values())
    lm_head = cfg.padded_vocab * arch.hidden_size
    adapters = arch.num_layers * adapter_params(cfg, per_rank=False)
    matmul = linears + lm_head + adapters
    trainable_matmul = matmul if cfg.lora.full_finetune else adapters
    pairs = attention_pairs(cfg.seq_length, cfg.group_size, attention)
    nh = arch.num_attention_heads
    unshifted = nh // 2 if attention == "s2" else nh
    head_pairs = unshifted * pairs["unshifted"] + (nh - unshifted) * pairs["shifted"]
    attn_fwd = 4 * arch.head_dim * head_pairs * arch.num_layers * micro_batch
    dense_fwd = 2 * matmul * tokens
    model = dense_fwd + 2 * matmul * tokens + 2 * trainable_matmul * tokens + 3 * attn_fwd
    share = cfg.recomputed_layers / cfg.stage_layers  # block: some layers only
    repeat = {"full": share * (dense_fwd + attn_fwd), "selective": attn_fwd,
              "none": 0.0}[cfg.recompute]
    return {"model": float(model), "hardware": float(model + repeat),
            "attention": float(3 * attn_fwd), "matmul_params": matmul,
            "trainable_matmul_params": trainable_matmul,
            "per_gpu_model": float(model) / cfg.parallel.model_parallel_size}


# ------------------------------------------------------------------- memory


def _widths(cfg: PlanConfig) -> Dict[str, float]:
    """Per-token widths (elements) of this rank's tensors."""
    arch, tp = cfg.arch, cfg.parallel.tensor_model_parallel_size
    return {
        "hidden": arch.hidden_size / tp if cfg.parallel.sequence_parallel else arch.hidden_size,
        "hidden_full": arch.hidden_size,
        "q": arch.q_size / tp,
        "kv": arch.kv_size / tp,
        "qkv": arch.qkv_size / tp,
        "ffn": arch.ffn_hidden_size / tp,
        "vocab": cfg.padded_vocab / tp,
    }


def _norm_saved(cfg: PlanConfig) -> int:
    """Bytes per element an RMSNorm keeps: torch's fused kernel (GPU) its input; the plain path
    (CPU) its float32 input (a copy in bf16; the input itself in fp32) and the normalised value."""
    a = cfg.param_bytes
    if cfg.fused:
        return a
    return 4 + a


def layer_activation_bytes(cfg: PlanConfig) -> Dict[str, float]:
    """Bytes one layer keeps for its backward (no recompute), by tensor, for this rank's
    tokens T = N/cp x micro-batch. What megalong's local layer saves (local spec, our RMSNorm,
    megatron's SelfAttention, S2CoreAttention, SwiGLUMLP, LoRA hooks):
    - each RMSNorm: its float32 input (the input itself in fp32) and the normalised value, or
      with torch's fused kernel (GPUs) the input alone;
    - the norm output, when a weight gradient needs it (LoRA A on qkv, or full fine-tuning);
    - V: S2CoreAttention copies it out of the qkv output, which the kernel's views of V would
      otherwise keep; on CPU the qkv output is then freed (measured). On GPUs the plan counts the
      whole qkv output, as the H100 measured before the copy, until a GPU run shows the saving;
    - RoPE'd q and k, the attention kernel's output and the [s, b, heads*d] output megatron's
      proj consumes (saved when proj or its adapter trains);
    - S²-Attn: the shifted half's end groups copied into one piece (G tokens), and on GPUs the
      kernels' contiguous copies of the folded q, k, v;
    - SwiGLU: fc1's output, plus silu's output unless fused (megatron's fused kernel on GPUs,
      model/swiglu.py's Function on CPU); fc2's input when fc2 trains.
    Frozen linears save no input (megatron's frozen-weight path)."""
    a, T = cfg.param_bytes, cfg.tokens
    w = _widths(cfg)
    full_finetune, parts = cfg.lora.full_finetune, set(cfg.adapted_parts)
    trains = (lambda *names: full_finetune or bool(parts & set(names)))
    out = {
        "norms": 2 * _norm_saved(cfg) * T * w["hidden"],
        "qkv_input": a * T * w["hidden"] if trains("q", "k", "v") else 0.0,
        "value": a * T * (w["qkv"] if cfg.gpu else w["kv"]),
        "rope_qk": a * T * (w["q"] + w["kv"]),
        "attention_output": a * T * w["q"] * (2 if trains("o") else 1),
        "mlp_input": a * T * w["hidden"] if trains("gate", "up") else 0.0,
        "swiglu": a * T * w["ffn"] * (2 if cfg.fused else 3),
        "fc2_input": a * T * w["ffn"] if trains("down") else 0.0,
    }
    if cfg.model.attention == "s2":
        shifted_heads = (w["q"] / 2 + w["kv"])  # the shifted half's q, k and v
        out["s2_end_groups"] = a * cfg.group_size * cfg.training.micro_batch_size \
            * shifted_heads if cfg.parallel.context_parallel_size == 1 else 0.0
        if cfg.gpu:  # cuDNN/flash SDPA saves contiguous copies of the strided group views
            out["s2_kernel_inputs"] = a * T * (w["q"] + 2 * w["kv"])
    return out


def _loss_bytes(cfg: PlanConfig, T: int, w: Dict[str, float]) -> float:
    """The loss's own tensors: the logits (and their float32 copy in bf16) of the whole sequence
    or of one chunk; a chunked loss also holds the input gradient it forms in the forward."""
    a = cfg.param_bytes
    chunk = cfg.training.loss_chunk_tokens
    rows = min(T, chunk) if chunk else T
    logits = a * rows * w["vocab"] + (4 * rows * w["vocab"] if a != 4 else 0.0)
    return logits + (a * T * w["hidden_full"] if chunk else 0.0)


def memory_breakdown(cfg: PlanConfig) -> Dict[str, float]:
    """Peak bytes on the busiest rank, by kind. Activations follow the recompute choice:
    none keeps every layer's tensors; selective recomputes core attention (the kernel output is
    not kept); full keeps each layer's input and re-runs one layer at a time in the backward.
    The peak is the larger of two moments of the step: the loss (logits, and their float32
    copy in bf16, with every checkpoint alive) and a layer's backward (its saved tensors plus
    the gradients in flight)."""
    a, T = cfg.param_bytes, cfg.tokens
    w = _widths(cfg)
    counts = parameter_counts(cfg)
    layers = cfg.stage_layers
    # 1F1B: the first stage holds the activations of up to pp micro-batches.
    in_flight = cfg.parallel.pipeline_model_parallel_size
    weights = counts["base"] * cfg.param_bytes
    adapters = counts["adapters"] * cfg.param_bytes
    gradients = counts["trainable"] * 4  # megatron DDP's float32 gradient buffer
    # Adam moments (+ fp32 master weights in bf16)
    optimizer = counts["trainable"] * (8 + (4 if cfg.training.bf16 else 0))

    per_layer = layer_activation_bytes(cfg)
    saved = sum(per_layer.values())
    if cfg.recompute == "selective":
        saved -= a * T * w["q"]  # the kernel's output is recomputed
    # Gradients in flight inside a layer's backward: the residual stream's gradient twice, fc1's
    # output gradient, the attention kernel's q/k/v gradients and their unfolded copies.
    layer_backward = a * T * (2 * w["hidden"] + 2 * w["ffn"] + 2 * (w["q"] + 2 * w["kv"]))
    logits = _loss_bytes(cfg, T, w)
    final_norm = _norm_saved(cfg) * T * w["hidden"]
    # Recomputed layers keep their input; the others (all of them without full recompute) keep
    # their saved tensors. The backward of a recomputed layer holds its saved tensors again.
    recomputed = cfg.recomputed_layers
    checkpoint = a * T * w["hidden"]
    kept = (recomputed * checkpoint + (layers - recomputed) * saved) * in_flight
    loss_moment = kept + final_norm + logits
    layer_moment = kept + (saved if recomputed else 0.0) + layer_backward
    activations = max(loss_moment, layer_moment)
    # Of the activations: what the attention kernels add beyond q/k/v (their outputs, S²'s copied
    # end groups), for the layer in flight.
    attention_workspace = (per_layer.get("s2_end_groups", 0.0) + per_layer["attention_output"]
                           + per_layer.get("s2_kernel_inputs", 0.0))
    return {"weights": weights, "adapters": adapters, "gradients": gradients,
            "optimizer": optimizer, "activations": activations,
            "attention_workspace": attention_workspace,
            "total": weights + adapters + gradients + optimizer + activations}


def fits(cfg: PlanConfig, gpu_bytes: float) -> bool:
    return memory_breakdown(cfg)["total"] <= gpu_bytes
