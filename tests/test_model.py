"""Megatron Llama vs HF transformers' LlamaForCausalLM on the same weights, at every layout."""

import pytest
import torch

from megalong.spawn import run_on_ranks
from megalong.config.parallel import ParallelConfig

VOCAB = 1001


def hf_logits(hf_dir, tokens, rope_factor=None, dtype=torch.float32):
    """HF transformers' logits (float32), optionally re-loaded with linear rope scaling
    `rope_factor`, computed in `dtype`."""
    from transformers import LlamaForCausalLM

    kwargs = {}
    if rope_factor:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(hf_dir)
        config.rope_parameters = {"rope_type": "linear", "factor": rope_factor,
                                  "rope_theta": 10000.0}
        kwargs["config"] = config
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=dtype, **kwargs).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits_for_layouts(hf_dir, tokens, layouts):
    """On every rank: for each (tp, pp, sp, factor[, params dtype]) build, load HF weights,
    return float32 logits."""
    from megalong import runtime
    from megalong.convert.hf_checkpoint import HFCheckpointReader
    from megalong.config.hf_config import arch_from_hf_config
    from megalong.config.arch import padded_vocab_size
    from megalong.convert.model_io import load_hf_weights
    from model_logits import full_logits
    from megalong.model.llama import ModelOptions, build_llama

    results = []
    for tp, pp, sp, factor, *dtype in layouts:
        runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        reader = HFCheckpointReader(hf_dir)
        arch, _ = arch_from_hf_config(reader.config, hf_dir)
        padded = padded_vocab_size(arch.vocab_size, 128, tp)
        opts = ModelOptions(seq_length=tokens.shape[1], padded_vocab_size=padded, attention="full",
                            sequence_parallel=sp, interpolation_factor=factor, initialize=False,
                            params_dtype=dtype[0] if dtype else torch.float32)
        model = build_llama(arch, opts)
        load_hf_weights(model, reader.get, arch, padded)
        model.eval()
        logits = full_logits(model, tokens)
        if logits is not None:
            assert torch.isinf(logits[..., VOCAB:]).all(), "padded vocab must be masked"
            logits = logits[..., :VOCAB].float()
        results.append(logits)
    return results


@pytest.mark.slow
def test_tp1_matches_hf_with_and_without_interpolation_and_in_bf16(tiny_hf_dir, tiny_tokens):
    (plain, interpolated, bf16), = run_on_ranks(
        megatron_logits_for_layouts, 1, tiny_hf_dir, tiny_tokens,
        [(1, 1, False, None), (1, 1, False, 4.0), (1, 1, False, None, torch.bfloat16)])
    reference = hf_logits(tiny_hf_dir, tiny_tokens)
    assert (plain - reference).abs().max() <= 1e-4
    reference4 = hf_logits(tiny_hf_dir, tiny_tokens, rope_factor=4.0)
    assert (interpolated - reference4).abs().max() <= 1e-4
    # The factor must matter, or the test above proves nothing about interpolation.
    assert (reference4 - reference).abs().max() > 1e-2
    # bf16 (how the benchmarks and GPU runs train): no further from the float32 logits than HF's
    # own bf16 forward is, so no part of the model silently runs at a lower precision than HF's.
    hf_bf16_error = (hf_logits(tiny_hf_dir, tiny_tokens, dtype=torch.bfloat16) - reference).abs()
    error = (bf16 - reference).abs()
    assert 0 < hf_bf16_error.max() and 0 < error.max()
    assert error.max() <= 2 * hf_bf16_error.max() and error.mean() <= 2 * hf_bf16_error.mean()


@pytest.mark.slow
def test_tp2_sp_and_pp2_match_hf(tiny_hf_dir, tiny_tokens):
    layouts = [(2, 1, False, None), (2, 1, True, None), (1, 2, False, None)]
    per_rank = run_on_ranks(megatron_logits_for_layouts, 2, tiny_hf_dir, tiny_tokens, layouts)
    reference = hf_logits(tiny_hf_dir, tiny_tokens)
    tp2, tp2_sp, _ = per_rank[0]
    pp2 = per_rank[1][2]  # the last pipeline stage holds the logits
    assert per_rank[0][2] is None
    for name, logits in [("tp2", tp2), ("tp2+sp", tp2_sp), ("pp2", pp2)]:
        assert (logits - reference).abs().max() <= 1e-4, name
    assert torch.equal(per_rank[0][0], per_rank[1][0]), "TP ranks must agree"


@pytest.mark.slow
def test_llama3_rope_and_tied_embeddings_match_hf(tiny_llama3_dir):
    # Long enough (1024) that llama3's scaling of the low frequencies changes the logits.
    tokens = torch.randint(0, VOCAB, (1, 1024), generator=torch.Generator().manual_seed(3))
    (logits,), = run_on_ranks(megatron_logits_for_layouts, 1, tiny_llama3_dir, tokens,
                              [(1, 1, False, None)])
    reference = hf_logits(tiny_llama3_dir, tokens)
    assert (logits - reference).abs().max() <= 1e-4
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama3_dir)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    unscaled = LlamaForCausalLM.from_pretrained(tiny_llama3_dir, config=config).eval()
    with torch.no_grad():
        assert (unscaled(tokens).logits - reference).abs().max() > 1e-2, "llama3 scaling must matter"


# The settings transformer_config takes from the device policy.
DEVICE_DEPENDENT = ("bias_activation_fusion", "use_cpu_initialization", "apply_rope_fusion",
                    "gradient_accumulation_fusion", "masked_softmax_fusion")


def built_with_and_without_a_visible_gpu(hf_dir, tokens):
    """On this CPU host, then with torch.cuda.is_available forced true (a GPU host whose ranks
    run with MEGALONG_DEVICE=cpu, as run_on_ranks sets): each model's device-dependent config,
    parameter devices and logits."""
    import os

    from megalong import runtime

    results = []
    for gpu_visible in (False, True):
        torch.cuda.is_available = lambda: gpu_visible  # this rank's own process
        (logits,) = megatron_logits_for_layouts(hf_dir, tokens, [(1, 1, False, None)])
        from megalong.model.llama import ModelOptions, transformer_config
        from megalong.config.arch import PRESETS

        config = transformer_config(PRESETS["tiny"], ModelOptions(seq_length=64,
                                                                  padded_vocab_size=1024))
        results.append({"config": {name: getattr(config, name) for name in DEVICE_DEPENDENT},
                        "logits": logits})
    assert os.environ["MEGALONG_DEVICE"] == "cpu" and not runtime.use_cuda()
    del os.environ["MEGALONG_DEVICE"]
    results.append(runtime.use_cuda())  # the forced GPU is seen once CPU is not asked for
    return results


@pytest.mark.slow
def test_cpu_forced_on_a_gpu_host_builds_the_cpu_model(tiny_hf_dir, tiny_tokens):
    (cpu_host, gpu_host_cpu_forced, gpu_seen), = run_on_ranks(
        built_with_and_without_a_visible_gpu, 1, tiny_hf_dir, tiny_tokens)
    assert gpu_seen
    assert gpu_host_cpu_forced["config"] == cpu_host["config"]
    assert cpu_host["config"]["use_cpu_initialization"]
    assert torch.equal(gpu_host_cpu_forced["logits"], cpu_host["logits"])
