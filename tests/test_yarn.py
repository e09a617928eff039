"""YaRN next to linear interpolation: config.json both ways, the flags' rules, megatron's
attention factor against transformers', and logits against transformers' YaRN Llama."""

import json

import pytest
import torch

from conftest import make_hf_llama
from megalong.config.arch import PRESETS
from megalong.config.hf_config import arch_from_hf_config, hf_config_from_arch
from megalong.config.model import ModelConfig
from megalong.config.parallel import ParallelConfig
from megalong.config.yarn import attention_factor, megatron_concentration, megatron_yarn_attributes
from megalong.errors import MegalongError
from megalong.spawn import run_on_ranks
from test_hf_checkpoint import LLAMA2_7B
from test_model import VOCAB, hf_logits, megatron_logits_for_layouts

# transformers' yarn parameters, every rule of its attention factor: 0.1 ln s + 1; mscale
# pair (with truncate off and other betas); an explicit attention_factor.
YARN_CONFIGS = [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16,
     "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
     "attention_factor": 1.25},
]
MSCALE_CASES = YARN_CONFIGS + [
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0, "mscale_all_dim": 0.5},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.7},
    {"factor": 1.0, "original_max_position_embeddings": 4096},
]


@pytest.mark.parametrize("yarn", MSCALE_CASES)
def test_megatron_attention_factor_is_transformers(yarn):
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor)
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    attributes = megatron_yarn_attributes(yarn)
    megatron = _yarn_get_concentration_factor(attributes["yarn_rotary_scaling_factor"],
                                              attributes["yarn_mscale"],
                                              attributes["yarn_mscale_all_dim"])
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **yarn})
    _, hf = _compute_yarn_parameters(config)
    assert megatron == pytest.approx(hf, rel=1e-12, abs=0)
    assert megatron_concentration(attributes) == pytest.approx(attention_factor(yarn), rel=1e-12)


@pytest.mark.parametrize("form", ["rope_scaling", "rope_parameters"])
def test_yarn_config_reads_and_writes_both_forms(form):
    rope = dict(YARN_CONFIGS[1])
    cfg = dict(LLAMA2_7B, rope_theta=10000.0, **{form: rope})
    arch, factor = arch_from_hf_config(cfg, "c")
    assert factor is None
    assert arch.yarn_rope == {k: v for k, v in rope.items() if k != "rope_type"}
    back = hf_config_from_arch(arch, interpolation_factor=None)
    assert back["rope_scaling"] == {"type": "yarn", **rope}
    assert back["rope_parameters"] == {**rope, "rope_theta": 10000.0}
    assert back["max_position_embeddings"] == LLAMA2_7B["max_position_embeddings"]
    assert arch_from_hf_config(back, "back") == (arch, None)
    with pytest.raises(MegalongError, match="linear interpolation on top of YaRN"):
        hf_config_from_arch(arch, interpolation_factor=2.0)


def test_yarn_original_length_falls_back_as_transformers_does():
    no_original = {"rope_type": "yarn", "factor": 4.0}
    arch, _ = arch_from_hf_config(dict(LLAMA2_7B, rope_scaling=no_original), "c")
    assert arch.yarn_rope["original_max_position_embeddings"] == 4096
    top = dict(LLAMA2_7B, rope_scaling=dict(no_original, original_max_position_embeddings=2048),
               original_max_position_embeddings=1024)
    assert arch_from_hf_config(top, "c")[0].yarn_rope["original_max_position_embeddings"] == 1024


@pytest.mark.parametrize("change,message", [
    ({"factor": 0.5}, "yarn rope scaling factor must be a finite number >= 1"),
    ({"factor": None}, "lacks 'factor'"),
    ({"beta_fast": 1, "beta_slow": 4}, "beta_fast 1 must be at least beta_slow 4"),
    ({"truncate": "yes"}, "truncate must be true or false"),
    ({"attention_factor": -1.0}, "attention_factor must be a finite number > 0"),
    ({"factor": 1.0, "attention_factor": 1.5}, "scales attention only when factor > 1"),
    ({"low_freq_factor": 1.0}, "unknown keys ['low_freq_factor']"),
])
def test_bad_yarn_configs_are_refused(change, message):
    rope = {**YARN_CONFIGS[0], **change}
    with pytest.raises(MegalongError, match=message.replace("[", r"\[").replace("]", r"\]")):
        arch_from_hf_config(dict(LLAMA2_7B, rope_scaling=rope), "odd/config.json")
    scaling = dict(YARN_CONFIGS[0], beta_fast=32)
    disagreeing = dict(LLAMA2_7B, rope_scaling=scaling,
                       rope_parameters=dict(scaling, beta_fast=8))
    with pytest.raises(MegalongError, match="disagree"):
        arch_from_hf_config(disagreeing, "c")


def test_rope_type_flag_rules():
    arch = PRESETS["tiny"]  # max_position_embeddings 256
    plain = ModelConfig(seq_length=1024)
    assert plain.rope_for(arch) == (arch, 4.0)  # linear interpolation stays the default
    yarn_arch, factor = ModelConfig(seq_length=1024, rope_type="yarn").rope_for(arch)
    assert factor is None
    assert yarn_arch.yarn_rope == {"factor": 4.0, "original_max_position_embeddings": 256}
    flagged, _ = ModelConfig(seq_length=1024, rope_type="yarn", yarn_rotary_scaling_factor=8,
                             yarn_beta_fast=16, yarn_mscale=1, yarn_mscale_all_dim=0.5
                             ).rope_for(arch)
    assert flagged.yarn_rope == {"factor": 8.0, "original_max_position_embeddings": 256,
                                 "beta_fast": 16.0, "mscale": 1.0, "mscale_all_dim": 0.5}
    # A YaRN checkpoint keeps its YaRN and gets no default linear factor.
    assert ModelConfig(seq_length=4096).rope_for(yarn_arch) == (yarn_arch, None)
    assert ModelConfig(seq_length=4096, rope_type="yarn").rope_for(yarn_arch) == (yarn_arch, None)
    llama3 = arch.with_(llama3_rope={"factor": 8.0})
    refused = [
        (ModelConfig(seq_length=1024, rope_type="yarn", rotary_seq_len_interpolation_factor=2),
         arch, None, "YaRN cannot be combined with linear interpolation "
                     "(--rotary-seq-len-interpolation-factor factor 2)"),
        (ModelConfig(seq_length=1024, rope_type="yarn"), arch, 4.0,
         "YaRN cannot be combined with linear interpolation (the checkpoint's factor 4)"),
        (ModelConfig(rotary_seq_len_interpolation_factor=2), yarn_arch, None,
         "YaRN cannot be combined"),
        (ModelConfig(yarn_beta_fast=16), arch, None, "--yarn-beta-fast need --rope-type yarn"),
        (ModelConfig(rope_type="yarn", yarn_mscale=1), yarn_arch, None,
         "--yarn-mscale: the model's config already sets YaRN"),
        (ModelConfig(rope_type="rope"), yarn_arch, None, "the model's config uses YaRN"),
        (ModelConfig(rope_type="yarn"), llama3, None, "llama3"),
        (ModelConfig(seq_length=256, rope_type="yarn"), arch, None,
         "seq-length 256 is not beyond the model's original length 256"),
        (ModelConfig(rope_type="yarn", yarn_rotary_scaling_factor=0.5), arch, None,
         "factor must be a finite number >= 1"),
    ]
    for config, on, recorded, message in refused:
        with pytest.raises(MegalongError) as error:
            config.rope_for(on, recorded)
        assert message in str(error.value) and "\n" not in str(error.value), message


def yarn_logits(hf_dirs, tokens, layouts):
    """megatron_logits_for_layouts for each directory, in one spawn."""
    return [megatron_logits_for_layouts(hf_dir, tokens, layouts) for hf_dir in hf_dirs]


@pytest.fixture(scope="module")
def yarn_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("yarn")
    return [str(make_hf_llama(root / f"yarn{i}", rope_scaling=dict(rope, rope_theta=10000.0)))
            for i, rope in enumerate(YARN_CONFIGS)]


# Longer than the original 32 positions and than max_position_embeddings 128, so YaRN's
# interpolated frequencies and its attention factor both change the logits.
YARN_TOKENS = torch.randint(0, VOCAB, (2, 160), generator=torch.Generator().manual_seed(5))


@pytest.mark.slow
def test_yarn_logits_match_transformers_at_tp1_and_tp2(yarn_dirs):
    tp1 = run_on_ranks(yarn_logits, 1, yarn_dirs, YARN_TOKENS, [(1, 1, False, None)])[0]
    tp2 = run_on_ranks(yarn_logits, 2, yarn_dirs, YARN_TOKENS,
                       [(2, 1, False, None), (2, 1, True, None)])[0]
    for hf_dir, (one,), (two, two_sp) in zip(yarn_dirs, tp1, tp2):
        reference = hf_logits(hf_dir, YARN_TOKENS)
        for name, logits in [("tp1", one), ("tp2", two), ("tp2+sp", two_sp)]:
            assert (logits - reference).abs().max() <= 1e-4, (hf_dir, name)
        from transformers import AutoConfig, LlamaForCausalLM

        config = AutoConfig.from_pretrained(hf_dir)
        config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        plain = LlamaForCausalLM.from_pretrained(hf_dir, config=config).eval()
        with torch.no_grad():
            assert (plain(YARN_TOKENS).logits - reference).abs().max() > 1e-2, "YaRN must matter"


@pytest.mark.slow
def test_yarn_round_trip_through_megatron_tp2_keeps_the_config(yarn_dirs, tmp_path):
    from transformers import AutoConfig

    from megalong.config.checkpoint import read_metadata
    from megalong.conversion import hf_to_megatron, megatron_to_hf
    from test_convert import hf_state

    hf_dir = yarn_dirs[1]
    mc, back = tmp_path / "mc", tmp_path / "back"
    # seq-length beyond max_position_embeddings: no default linear factor on top of YaRN.
    hf_to_megatron(hf_dir, str(mc), parallel=ParallelConfig(tensor_model_parallel_size=2),
                   seq_length=512)
    meta = read_metadata(str(mc))
    assert meta.interpolation_factor is None and meta.arch.yarn_rope["factor"] == 8.0
    megatron_to_hf(str(mc), str(back))
    original, exported = hf_state(hf_dir), hf_state(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(tensor, exported[name]) for name, tensor in original.items())
    written = json.load(open(back / "config.json"))
    want = {k: v for k, v in YARN_CONFIGS[1].items()}
    assert written["rope_scaling"] == {"type": "yarn", **want}
    assert written["rope_parameters"] == {**want, "rope_theta": 10000.0}
    reread = AutoConfig.from_pretrained(back).rope_parameters
    assert {k: reread[k] for k in want} == want
    assert (hf_logits(str(back), YARN_TOKENS) - hf_logits(hf_dir, YARN_TOKENS)).abs().max() == 0
    with pytest.raises(MegalongError, match="YaRN cannot be combined"):
        hf_to_megatron(hf_dir, str(tmp_path / "linear"), interpolation_factor=2.0)
    assert not (tmp_path / "linear").exists()


@pytest.mark.slow
def test_yarn_context_parallel_equals_cp1(yarn_dirs, tmp_path):
    """The contiguous-CP YaRN embedding (ContiguousYarnRotaryEmbedding, (emb, mscale)): an
    S²-Attn step at CP=2 equals CP=1 (loss, gradients, logits)."""
    from megalong.conversion import hf_to_megatron
    from test_context_parallel import SEQ, rel_err, run_layouts

    ckpt = tmp_path / "mc"
    hf_to_megatron(yarn_dirs[0], str(ckpt), seq_length=SEQ)
    one, two = run_on_ranks(run_layouts, 2, str(ckpt), [(1, 1, 16, None), (1, 2, 16, None)])
    reference, cp2 = one[0], one[1]
    assert abs(cp2["loss"][0] - reference["loss"][0]) <= 1e-5
    assert abs(cp2["eval_loss"][0] - reference["eval_loss"][0]) <= 1e-5
    assert (cp2["logits"][..., :VOCAB] - reference["logits"][..., :VOCAB]).abs().max() <= 1e-5
    for name, grad in reference["grads"].items():
        assert rel_err(cp2["grads"][name], grad) <= 1e-5, name
