"""Llama layer specs: megatron-core's ModuleSpec tree with our S²-Attn core attention,
SP-aware RMSNorm and SwiGLU MLP in the slots (compose, don't subclass)."""

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megalong.attention.core_attention import S2CoreAttention
from megalong.attention.kernels import PACKAGE_LOAD_ERRORS
from megalong.config.weight_map import te_module_prefixes
from megalong.errors import MegalongError
from megalong.model.norm import RMSNorm
from megalong.model.swiglu import SwiGLUMLP


# Checkpoints written with the local spec load into the TE spec and back: the local norm keys are
# stored under the TE names (megatron's own local spec does the same; the weight map's TE aliases).
NORM_KEYS_TO_TE = te_module_prefixes()


def core_attention_spec(attention: str, group_size, kernel: str, eval_attention: str = "full",
                        group_size_ratio=None) -> ModuleSpec:
    return ModuleSpec(
        module=S2CoreAttention,
        params={"attention": attention, "group_size": group_size, "kernel": kernel,
                "eval_attention": eval_attention, "group_size_ratio": group_size_ratio},
    )


def local_layer_spec(core_attention: ModuleSpec, qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron-core modules only: runs on CPU and GPU. With `qk_layernorm` (Qwen3) our RMSNorm
    normalises each q and k head (megatron builds it with the head dim)."""
    qk_norm = RMSNorm if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=SwiGLUMLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=NORM_KEYS_TO_TE,
        ),
    )


def _te_missing(err: BaseException) -> MegalongError:
    return MegalongError(
        "--transformer-impl transformer_engine needs Transformer Engine (pip install "
        f"'megalong[gpu]'; GPU only); import failed: {type(err).__name__}: {err}; use "
        "--transformer-impl local")


def te_layer_spec(core_attention: ModuleSpec, qk_layernorm: bool = False) -> ModuleSpec:
    """Transformer Engine linears (norm fused into qkv and fc1); our core attention. The norm
    type reaches TE's fused layernorm-linear through `config.normalization` (megatron-core
    0.16's spec function takes no normalization argument)."""
    try:
        from megatron.core.models.gpt import gpt_layer_specs
    except PACKAGE_LOAD_ERRORS as err:  # megatron imports TE at module level, catching ImportError
        raise _te_missing(err) from err
    if not gpt_layer_specs.HAVE_TE:  # its spec function would raise NameError (TESpecProvider)
        try:
            import transformer_engine.pytorch  # noqa: F401  (only to name why it failed)
            err = ImportError("megatron-core could not import its Transformer Engine extensions")
        except PACKAGE_LOAD_ERRORS as import_err:
            err = import_err
        raise _te_missing(err)
    spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def llama_block_spec(*, impl: str, attention: str, group_size, kernel: str,
                     num_layers_this_stage: int, qk_layernorm: bool = False,
                     eval_attention: str = "full", group_size_ratio=None) -> TransformerBlockSubmodules:
    core = core_attention_spec(attention, group_size, kernel, eval_attention, group_size_ratio)
    spec = local_layer_spec if impl == "local" else te_layer_spec
    layer = spec(core, qk_layernorm)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers_this_stage, layer_norm=RMSNorm
    )
