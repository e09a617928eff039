"""Llama as a megatron-core GPTModel: TransformerConfig from a LlamaArch, then the model."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megalong import runtime
from megalong.config.arch import LlamaArch
from megalong.config.model import LOSS_CHUNK_TOKENS
from megalong.config.yarn import megatron_concentration, megatron_yarn_attributes
from megalong.errors import MegalongError
from megalong.model.chunked_loss import chunked_cross_entropy
from megalong.model.cp_layout import contiguous_rotary_embedding
from megalong.model.rope import rotate_half_rope
from megalong.model.spec import llama_block_spec


@dataclass(frozen=True)
class ModelOptions:
    """What, besides the architecture, decides the model that gets built."""

    seq_length: int
    padded_vocab_size: int
    attention: str = "s2"  # the pattern while training: "s2", "short" (ablation) or "full"
    group_size: Optional[int] = None  # S²-Attn group size G (None: seq_length // 4)
    # The pattern in eval mode: dense, or a grouped one for evaluations that ask for it, with G
    # = group_size, or group_size_ratio of each evaluated length when given.
    eval_attention: str = "full"
    group_size_ratio: Optional[float] = None
    attention_kernel: str = "auto"
    interpolation_factor: Optional[float] = None  # linear RoPE position interpolation
    transformer_impl: str = "local"  # or "transformer_engine"
    params_dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    recompute_method: str = "uniform"  # "uniform" | "block" (only the first N layers of a stage)
    recompute_num_layers: int = 1
    # With selective recompute: megatron's submodules to recompute (None: its default, core_attn).
    recompute_modules: Optional[tuple] = None
    # False when weights are loaded right after building (conversion, eval): skips random init.
    initialize: bool = True
    fp8_format: Optional[str] = None  # "hybrid" | "e4m3": FP8 GEMMs through Transformer Engine
    # Training/eval loss over this many tokens at a time (chunked_loss.py); 0: megatron's loss
    # on the whole [s, b, vocab] logits.
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS


@dataclass
class YarnTransformerConfig(TransformerConfig):
    """TransformerConfig with the yarn_* attributes megatron-core 0.16's GPTModel (building its
    YarnRotaryEmbedding) and attention (its mscale) read with getattr, declared so a copy of
    the config (dataclasses.replace) keeps them. config/yarn.py fills them from transformers'
    parameters."""

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True


def transformer_config(arch: LlamaArch, opts: ModelOptions) -> TransformerConfig:
    on_gpu = runtime.use_cuda()  # MEGALONG_DEVICE=cpu on a GPU host builds the CPU model
    runtime.apply_patches()  # idempotent: done by init_distributed, unless the caller skipped it
    # megalong's RoPE kernel in megatron's fused slot unless TE's is there (TE's needs CUDA).
    rope_kernel = runtime.fill_fused_rope_slot(rotate_half_rope) or on_gpu
    yarn = megatron_yarn_attributes(arch.yarn_rope) if arch.yarn_rope is not None else {}
    # megatron applies YaRN's attention factor (mscale) in its unfused RoPE only: a fused kernel
    # (megalong's or TE's) is bypassed with a warning at every call, so none is asked for.
    fused_rope = (opts.transformer_impl == "transformer_engine" or rope_kernel) and (
        not yarn or megatron_concentration(yarn) == 1.0)
    return (YarnTransformerConfig if yarn else TransformerConfig)(
        **yarn,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,  # Qwen2's q/k/v biases
        # Qwen3's per-head q/k RMSNorm (spec.py fills the slots); it also makes
        # finalize_model_grads sum the q/k norm gradients over TP (each rank sees its own heads).
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # On GPUs, megatron's own fused SwiGLU (no TE or apex needed): fewer passes over
        # [s, b, ffn]. Not its "native" fused cross entropy: its logits gradient reaches the
        # output layer's backward in a layout torch.matmul runs as N tiny GEMMs (most of an
        # H100 step, docs/PERF.md). The other fused kernels need TE/apex; the local spec runs
        # their plain-torch paths.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=False,
        # TE's fused RoPE kernel (megatron-LM's default) when TE is in use, checked against the
        # local spec in test_lora's TE test; otherwise megalong's (rope.py): megatron's unfused
        # path concatenates twice per q/k.
        # With YaRN's attention factor != 1, megatron's unfused path (it scales cos and sin).
        apply_rope_fusion=fused_rope,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        params_dtype=opts.params_dtype,
        pipeline_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=opts.sequence_parallel,
        calculate_per_token_loss=True,
        recompute_granularity=opts.recompute_granularity,
        recompute_method=opts.recompute_method if opts.recompute_granularity == "full" else None,
        recompute_num_layers=opts.recompute_num_layers if opts.recompute_granularity == "full" else None,
        recompute_modules=list(opts.recompute_modules) if opts.recompute_modules else None,
        init_method_std=0.02,
        perform_initialization=opts.initialize,
        fp8=opts.fp8_format,
    )


def build_llama(arch: LlamaArch, opts: ModelOptions, *, vp_stage=None) -> GPTModel:
    """This rank's pipeline stage of the model (pre/post-process decided by the PP rank)."""
    arch.check_sliding_window(opts.seq_length)  # every model built: training, eval, conversion
    config = transformer_config(arch, opts)
    num_layers_here = get_num_layers_to_build(config, vp_stage=vp_stage)
    group_size = opts.group_size or opts.seq_length // 4
    block_spec = llama_block_spec(
        impl=opts.transformer_impl,
        attention=opts.attention,
        group_size=group_size,
        kernel=opts.attention_kernel,
        eval_attention=opts.eval_attention,
        group_size_ratio=opts.group_size_ratio,
        num_layers_this_stage=num_layers_here,
        qk_layernorm=arch.qk_layernorm,
    )
    llama3 = arch.llama3_rope
    if llama3 is not None and (
        llama3.get("low_freq_factor") != 1.0
        or llama3.get("high_freq_factor") != 4.0
        or llama3.get("original_max_position_embeddings") != 8192
    ):
        raise MegalongError(
            f"llama3 rope scaling {llama3} is not supported: megatron-core implements only "
            "low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192"
        )
    if arch.yarn_rope is not None and opts.interpolation_factor is not None:
        raise MegalongError("YaRN cannot be combined with linear interpolation (factor "
                            f"{opts.interpolation_factor:g}); use one of them")
    rope = dict(
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
        seq_len_interpolation_factor=opts.interpolation_factor,
    )
    if arch.yarn_rope is None:  # YaRN's parameters are the config's yarn_* attributes
        rope.update(rope_scaling=llama3 is not None,
                    rope_scaling_factor=float(llama3["factor"]) if llama3 else 8.0)
    model = LlamaModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=opts.padded_vocab_size,
        max_sequence_length=max(opts.seq_length, arch.max_position_embeddings),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope" if arch.yarn_rope is None else "yarn",
        **rope,
    )
    model.loss_chunk_tokens = opts.loss_chunk_tokens
    model.real_vocab_size = arch.vocab_size
    if not opts.initialize:
        tag_tensor_parallel_weights(model)
    if model.post_process and opts.padded_vocab_size > arch.vocab_size:
        mask_padded_vocab(model.output_layer, arch.vocab_size)
    if config.context_parallel_size > 1:  # contiguous CP slices, not megatron's zig-zag
        model.rotary_pos_emb = contiguous_rotary_embedding(model, **rope)
    return model


class LlamaModel(GPTModel):
    """megatron-core's GPTModel, except that a loss with labels is computed from the final hidden
    states in token chunks (chunked_loss.py) instead of from the whole logits tensor. Logits
    (no labels), inference and multi-token prediction take GPTModel's own path."""

    loss_chunk_tokens: int = 0
    real_vocab_size: Optional[int] = None

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if (labels is None or not self.post_process or not self.loss_chunk_tokens
                or self.mtp_process or kwargs.get("inference_context") is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        *args, **kwargs)
        return self._chunked_loss(hidden_states, labels)

    def _chunked_loss(self, hidden_states, labels):
        from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                                   gather_from_sequence_parallel_region)

        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        # The output layer's own input handling: all-gather the sequence (SP) or enter the TP
        # region, whose backward reduces the vocab shards' partial input gradients.
        if self.output_layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden_states,
                                                          tensor_parallel_output_grad=True)
        elif tp_size > 1:
            hidden = copy_to_tensor_model_parallel_region(hidden_states)
        else:
            hidden = hidden_states
        loss = chunked_cross_entropy(
            hidden, weight, labels.transpose(0, 1),  # [s, b, h] and [s, b]
            vocab_start=parallel_state.get_tensor_model_parallel_rank() * weight.shape[0],
            vocab_size=self.real_vocab_size or self.vocab_size,
            chunk_tokens=self.loss_chunk_tokens,
            group=parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None,
        )
        return loss.transpose(0, 1).contiguous()  # [b, s], as GPTModel's loss


def tag_tensor_parallel_weights(model) -> None:
    """megatron-core tags TP-split weights (`tensor_model_parallel`, `partition_dim`) only while
    initialising them. Without the tags, grad-norm clipping and finalize_model_grads treat the
    shards as duplicates, so models built to be loaded into (no init) are tagged here."""
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    split_dim = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1}
    for module in model.modules():
        for kind, dim in split_dim.items():
            weight = getattr(module, "weight", None)
            if isinstance(module, kind) and weight is not None:
                set_tensor_model_parallel_attributes(weight, True, dim, 1)


def mask_padded_vocab(output_layer: torch.nn.Module, vocab_size: int) -> None:
    """Padded lm_head rows are not tokens: their logits become -inf on the rank that holds them,
    so no softmax (loss, perplexity, sampling) and no argmax ever sees them."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    def hook(module, _inputs, output):
        logits, bias = output
        local_vocab = logits.shape[-1]
        # runtime_gather_output=True (megatron's inference path) hands the hook all TP columns.
        gathered = local_vocab != module.output_size_per_partition
        first = 0 if gathered else tp_rank * local_vocab
        if first + local_vocab <= vocab_size:
            return output
        padded = torch.arange(first, first + local_vocab, device=logits.device) >= vocab_size
        if logits._base is not None or not torch.is_grad_enabled():  # inference; gathered views
            return logits.masked_fill(padded, float("-inf")), bias
        return _MaskPaddedLogits.apply(logits, padded), bias

    output_layer.register_forward_hook(hook)


class _MaskPaddedLogits(torch.autograd.Function):
    """logits with the padded columns at -inf, in place both ways: masked_fill would hold a
    second copy of the logits (the largest activation at long context) in the forward, and its
    backward another one. The output layer's backward needs its weight and input, not this
    tensor; the incoming gradient is the loss's own fresh buffer."""

    @staticmethod
    def forward(ctx, logits, padded):
        ctx.save_for_backward(padded)
        ctx.mark_dirty(logits)
        return logits.masked_fill_(padded, float("-inf"))

    @staticmethod
    def backward(ctx, grad):
        (padded,) = ctx.saved_tensors
        if not grad.is_contiguous():  # e.g. an expanded gradient of a sum: do not write into it
            return grad.masked_fill(padded, 0.0), None
        return grad.masked_fill_(padded, 0.0), None
