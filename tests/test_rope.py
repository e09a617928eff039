"""megalong's RoPE kernel (model/rope.py) against megatron's unfused RoPE: the same outputs and
gradients bit for bit, on strided q/k views of a GQA qkv output, with interpolated positions."""

import pytest
import torch

from test_attention import model_parallel  # noqa: F401  (fixture)


def _rope_and_grad(fn, t, freqs, grad):
    t = t.detach().requires_grad_()
    out = fn(t, freqs)
    out.backward(grad)
    return out, t.grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_equals_megatron_unfused_rope(dtype, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megalong.model.rope import rotate_half_rope
    from megalong.runtime import adapt_megatron_to_cpu

    if device == "cpu":
        adapt_megatron_to_cpu()  # RotaryEmbedding allocates on torch.cuda.current_device()
    seq, batch, heads, kv_heads, dim = 40, 2, 6, 2, 16
    gen = torch.Generator().manual_seed(0)
    # megatron's qkv output: per kv group, its query heads then k then v; q and k are views.
    qkv = torch.randn(seq, batch, kv_heads, (heads // kv_heads + 2) * dim, generator=gen)
    qkv = (qkv * 4).to(device, dtype)
    query = qkv[..., : heads // kv_heads * dim].reshape(seq, batch, heads, dim)
    key = qkv[..., heads // kv_heads * dim: -dim]
    assert not key.is_contiguous()
    freqs = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, seq_len_interpolation_factor=4.0,
                            rotary_base=10000, use_cpu_initialization=device == "cpu")(seq)
    for t in (query, key):
        grad = torch.randn(t.shape, generator=gen).to(device, dtype)
        out, got = _rope_and_grad(rotate_half_rope, t, freqs, grad)
        assert type(out.grad_fn).__name__ == "RotateHalfRopeBackward"  # not the fallback
        want_out, want = _rope_and_grad(_apply_rotary_pos_emb_bshd, t, freqs, grad)
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(out, t)


def test_interleaved_or_partial_rope_goes_to_megatron():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megalong.model.rope import rotate_half_rope

    gen = torch.Generator().manual_seed(1)
    t = torch.randn(8, 1, 2, 8, generator=gen)
    for freqs, interleaved in ((torch.rand(8, 1, 1, 8, generator=gen), True),
                               (torch.rand(8, 1, 1, 4, generator=gen), False)):
        got = rotate_half_rope(t, freqs, interleaved=interleaved)
        want = _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_models_use_the_kernel(model_parallel):  # noqa: F811
    from megatron.core.models.common.embeddings import rope_utils

    from megalong.config.arch import LlamaArch
    from megalong.model.llama import ModelOptions, transformer_config
    from megalong.model.rope import rotate_half_rope

    arch = LlamaArch(vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=1,
                     num_attention_heads=4, num_kv_heads=2)
    config = transformer_config(arch, ModelOptions(seq_length=16, padded_vocab_size=64))
    assert config.apply_rope_fusion
    assert rope_utils.fused_apply_rotary_pos_emb is rotate_half_rope
