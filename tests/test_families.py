"""Mistral, Qwen2/2.5 and Qwen3 (issue 24): config.json <-> LlamaArch, the weight map against
transformers' classes, logits parity at TP=1 and TP=2 (+SP) in one spawn per TP size, and the
HF -> megatron (TP=2) -> HF round trip."""

import json
import os

import pytest

from megalong.config import weight_map
from megalong.config.arch import FAMILIES, PRESETS, LlamaArch, validate_tp
from megalong.config.hf_config import arch_from_hf_config, hf_config_from_arch
from megalong.config.parallel import ParallelConfig
from megalong.errors import MegalongError
from conftest import randomize_

# Tiny random configs: GQA, head_dim set explicitly and != hidden/heads, vocab odd.
TINY = dict(vocab_size=1001, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
            rms_norm_eps=1e-5)
FAMILY_KWARGS = {
    "mistral": dict(sliding_window=None),
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=False, sliding_window=4096),
    "qwen3": dict(attention_bias=False, use_sliding_window=False, sliding_window=4096),
}


def hf_classes(family):
    import transformers

    name = FAMILIES[family].architecture
    return getattr(transformers, name.replace("ForCausalLM", "Config")), getattr(transformers, name)


def random_hf_model(family, seed=0, **changes):
    """A random model of `family` (conftest.randomize_: biases and norms random too, so a wrong
    layout cannot hide)."""
    import torch

    config_cls, model_cls = hf_classes(family)
    torch.manual_seed(seed)
    return randomize_(model_cls(config_cls(**{**TINY, **FAMILY_KWARGS[family], **changes})))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    dirs = {}
    for family in FAMILY_KWARGS:
        path = tmp_path_factory.mktemp("hf") / family
        random_hf_model(family).save_pretrained(path, safe_serialization=True)
        dirs[family] = str(path)
    return dirs


# Position scaling on other families: linear interpolation (LongLoRA's) and YaRN.
ROPE_VARIANTS = {
    ("mistral", "linear"): {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    ("qwen3", "yarn"): {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                        "rope_theta": 10000.0},
}


@pytest.fixture(scope="module")
def rope_variant_dirs(tmp_path_factory):
    """"family/variant" -> an HF directory of that family with that rope scaling."""
    dirs = {}
    for (family, variant), rope in ROPE_VARIANTS.items():
        path = tmp_path_factory.mktemp("hf") / f"{family}-{variant}"
        random_hf_model(family, seed=7, rope_parameters=rope).save_pretrained(
            path, safe_serialization=True)
        dirs[f"{family}/{variant}"] = str(path)
    return dirs


# ------------------------------------------------------------------------------ config.json


def _config_dict(family, **changes):
    config_cls, _ = hf_classes(family)
    cfg = config_cls(**{**TINY, **FAMILY_KWARGS[family], **changes}).to_dict()
    cfg["architectures"] = [FAMILIES[family].architecture]
    return cfg


@pytest.mark.parametrize("family", list(FAMILY_KWARGS))
def test_config_round_trips_and_loads_as_the_family_class(family, tmp_path):
    from transformers import AutoConfig

    arch, factor = arch_from_hf_config(_config_dict(family), "c")
    assert factor is None and arch.family == family and arch.head_dim == 24
    assert arch.sliding_window is None
    assert arch.qkv_bias == (family == "qwen2") and arch.qk_layernorm == (family == "qwen3")
    cfg = hf_config_from_arch(arch, interpolation_factor=4.0)
    assert cfg["model_type"] == family and cfg["architectures"] == [FAMILIES[family].architecture]
    assert cfg["head_dim"] == 24
    assert arch_from_hf_config(cfg, "c") == (arch, 4.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is hf_classes(family)[0] and loaded.head_dim == 24
    assert loaded.sliding_window is None and loaded.rope_parameters["factor"] == 4.0
    assert arch_from_hf_config(loaded.to_dict(), "again") == (arch, 4.0)


def test_sliding_window_is_decided_as_transformers_does():
    # MistralConfig's default is 4096 (Mistral-7B-v0.1 uses it): in effect, refused past it.
    cfg = _config_dict("mistral")
    del cfg["sliding_window"]
    arch, _ = arch_from_hf_config(cfg, "c")
    assert arch.sliding_window == 4096
    arch.check_sliding_window(4096)
    with pytest.raises(MegalongError, match="sliding_window 4096 is in effect.* 8192 exceeds it"):
        arch.check_sliding_window(8192)
    assert arch_from_hf_config(_config_dict("mistral", sliding_window=None), "c")[0].sliding_window is None
    # Qwen2.5/Qwen3 carry sliding_window with use_sliding_window false: full attention.
    for family in ("qwen2", "qwen3"):
        cfg = _config_dict(family)
        assert cfg["sliding_window"] is None or not cfg["use_sliding_window"]
        assert arch_from_hf_config(dict(cfg, sliding_window=131072), "c")[0].sliding_window is None
        on = dict(cfg, use_sliding_window=True, sliding_window=64, max_window_layers=1)
        on.pop("layer_types", None)
        assert arch_from_hf_config(on, "c")[0].sliding_window == 64
        assert arch_from_hf_config(dict(on, max_window_layers=2), "c")[0].sliding_window is None
        assert arch_from_hf_config(dict(on, layer_types=["full_attention"] * 2), "c")[0].sliding_window is None


def test_training_refuses_lengths_past_the_window():
    from megalong.config.model import ModelConfig

    arch = PRESETS["mistral-7b"].with_(sliding_window=4096)
    fields = {f: getattr(ModelConfig(), f) for f in ModelConfig.__dataclass_fields__}
    with pytest.raises(MegalongError, match="sliding_window 4096.*--seq-length 8192"):
        ModelConfig(**dict(fields, seq_length=8192)).validate(arch, ParallelConfig())


@pytest.mark.parametrize(
    "family,change,message",
    [
        ("llama", {"model_type": "gpt2"},
         "model_type 'gpt2' is not supported; megalong converts model_type llama, mistral, qwen2, qwen3"),
        ("mistral", {"model_type": "mixtral"}, "model_type 'mixtral' is not supported"),
        ("qwen3", {"architectures": ["Qwen2ForCausalLM"]}, "do not include Qwen3ForCausalLM"),
        ("qwen3", {"attention_bias": True}, "attention_bias is True; megalong supports only False"),
        ("qwen2", {"num_experts": 8}, "num_experts is 8; megalong supports dense models only"),
        ("mistral", {"num_local_experts": 8}, "num_local_experts is 8"),
        ("qwen2", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}, "rope type 'dynamic' is not supported"),
        ("mistral", {"sliding_window": "big"}, "sliding_window must be null or a positive integer"),
    ],
)
def test_refused_family_configs(family, change, message):
    cfg = _config_dict("mistral" if family == "llama" else family)
    with pytest.raises(MegalongError, match=message):
        arch_from_hf_config(dict(cfg, **change), "odd/config.json")


def test_refusals_need_no_torch():
    import subprocess
    import sys

    code = ("import sys; from megalong.config.hf_config import arch_from_hf_config as a\n"
            "from megalong.errors import MegalongError\n"
            "try: a({'model_type': 'gemma'}, 'c')\n"
            "except MegalongError as e: assert 'gemma' in str(e)\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_presets_split_over_their_heads():
    qwen = PRESETS["qwen2.5-7b"]
    assert (qwen.num_attention_heads, qwen.num_kv_heads, qwen.family) == (28, 4, "qwen2")
    for tp in (1, 2, 4):
        validate_tp(qwen, tp, 1)
    with pytest.raises(MegalongError, match="use one of"):
        validate_tp(qwen, 8, 1)
    assert PRESETS["qwen3-8b"].qk_layernorm and PRESETS["qwen3-8b"].head_dim == 128
    assert PRESETS["mistral-7b"].sliding_window is None


# ------------------------------------------------------------------------------ the weight map


@pytest.mark.parametrize("family", list(FAMILY_KWARGS))
def test_weight_map_is_the_family_class_parameters(family):
    import torch

    config_cls, model_cls = hf_classes(family)
    with torch.device("meta"):
        model = model_cls(config_cls(**{**TINY, **FAMILY_KWARGS[family]}))
    arch, _ = arch_from_hf_config(_config_dict(family), "c")
    tie = arch.tie_word_embeddings
    hf = {name: tuple(p.shape) for name, p in model.state_dict().items()
          if not (tie and name == "lm_head.weight")}
    assert dict(weight_map.hf_tensor_shapes(arch)) == hf
    for name, shape in hf.items():
        assert weight_map.hf_tensor_shape(name, arch) == shape
    llama = LlamaArch(64, 2, 4, 2, 160, 1001)
    assert weight_map.hf_tensor_shape("model.layers.0.self_attn.q_norm.weight", llama) is None
    assert weight_map.hf_tensor_shape("model.layers.0.self_attn.q_proj.bias", llama) is None


# ------------------------------------------------------------------------------ logits parity


def family_logits(dirs, tokens, layouts):
    """On every rank, per (tp, sequence_parallel[, pp]) and family: the model loaded from the HF
    directory, its logits (None on ranks without the output)."""
    from megalong import runtime
    from megalong.build import load_model
    from megalong.source import resolve_model_source
    from model_logits import full_logits

    out = []
    for tp, sp, *pp in layouts:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                  pipeline_model_parallel_size=pp[0] if pp else 1)
        runtime.init_distributed(parallel)
        for family, hf_dir in dirs.items():
            source = resolve_model_source(hf_dir=hf_dir, parallel=parallel)
            model = load_model(source, seq_length=tokens.shape[1], sequence_parallel=sp)
            logits = full_logits(model, tokens)
            out.append((tp, sp, *pp, family,
                        None if logits is None else logits[..., :source.arch.vocab_size]))
    return out


def _hf_logits(family, hf_dir, tokens):
    import torch

    _, model_cls = hf_classes(family)
    model = model_cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.slow
def test_logits_equal_transformers_at_tp1_tp2_sp_and_pp2(family_dirs, rope_variant_dirs):
    """Each family, and two of them with linear interpolation and YaRN ("family/variant")."""
    import torch

    from megalong.spawn import run_on_ranks

    from megalong.source import resolve_model_source

    assert resolve_model_source(hf_dir=rope_variant_dirs["mistral/linear"]).interpolation_factor == 4
    assert resolve_model_source(hf_dir=rope_variant_dirs["qwen3/yarn"]).arch.yarn_rope["factor"] == 4
    dirs = {**family_dirs, **rope_variant_dirs}
    tokens = torch.randint(0, 1001, (2, 64), generator=torch.Generator().manual_seed(3))
    reference = {name: _hf_logits(name.split("/")[0], d, tokens) for name, d in dirs.items()}
    results = run_on_ranks(family_logits, 1, dirs, tokens, [(1, False)])[0]
    # TP=2 (+SP), then PP=2, whose logits are on the last stage (rank 1).
    per_rank = run_on_ranks(family_logits, 2, dirs, tokens, [(2, False), (2, True), (1, False, 2)])
    results += [r for r in per_rank[0] if len(r) == 4]
    results += [r[:2] + r[3:] for r in per_rank[1] if len(r) == 5]
    assert len(results) == 4 * len(dirs)
    for tp, sp, name, logits in results:
        assert (logits - reference[name]).abs().max() <= 1e-4, (tp, sp, name)


# ------------------------------------------------------------------------------ round trip


def export_all(pairs):
    """On one rank: megatron_to_hf for every (checkpoint, out) pair."""
    from megalong.conversion import megatron_to_hf

    for load, out in pairs:
        megatron_to_hf(load, out)


@pytest.mark.slow
def test_round_trip_tp2_is_bit_exact(family_dirs, tmp_path):
    import torch
    from safetensors.torch import load_file

    from megalong.conversion import hf_to_megatron
    from megalong.spawn import run_on_ranks

    def state(directory):
        return {k: v for name in os.listdir(directory) if name.endswith(".safetensors")
                for k, v in load_file(os.path.join(directory, name)).items()}

    for family, src in family_dirs.items():  # one spawn of two ranks each
        hf_to_megatron(src, str(tmp_path / family), seq_length=64,
                       parallel=ParallelConfig(tensor_model_parallel_size=2))
    run_on_ranks(export_all, 1, [(str(tmp_path / f), str(tmp_path / f"{f}-back")) for f in family_dirs])
    for family, src in family_dirs.items():
        back = tmp_path / f"{family}-back"
        original, exported = state(src), state(back)
        assert sorted(original) == sorted(exported), family
        for name, tensor in original.items():
            assert torch.equal(tensor, exported[name]), (family, name)
        config = json.load(open(back / "config.json"))
        assert config["architectures"] == [FAMILIES[family].architecture] and config["head_dim"] == 24
        _, model_cls = hf_classes(family)
        assert type(model_cls.from_pretrained(back)) is model_cls


def test_recipes_and_planner_know_the_families():
    from megalong.recipes import RECIPE_MODELS, parallel_flags

    for model, long_tp in (("mistral-7b", "8"), ("qwen2.5-7b", "4"), ("qwen3-8b", "8")):
        assert model in RECIPE_MODELS
        assert parallel_flags(model, 32768, {})[1] == "2"
        assert parallel_flags(model, 131072, {})[1] == long_tp
        tp = int(long_tp)
        validate_tp(PRESETS[model], tp, 1)


# ------------------------------------------------------------------------------ training step


STEP_SEQ = 64


def _step_batches():
    import torch

    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 1001, (2, STEP_SEQ + 1), generator=gen)
        loss_mask = (torch.rand(2, STEP_SEQ, generator=gen) > 0.2).float()
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": loss_mask})
    return out


def family_train_steps(ckpts, layouts):
    """On every rank, per (tp, sp, cp, families): the trainer (build_trainer: S²-Attn, LoRA+ with
    embedding and every norm trainable) of each family's checkpoint, adapters re-initialised
    with B random (so A gets gradients too), one forward/backward of the same micro-batches
    (every data-parallel replica sees them all), through megatron DDP and finalize_model_grads.
    Returns (layout, family, loss, {trainable name: gradient gathered over TP}) on each rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megalong.config.checkpoint import read_metadata
    from megalong.config.job import JobConfig
    from megalong.lora.apply import init_lora
    from megalong.model.forward import run_microbatches
    from megalong.training.setup import build_trainer
    from test_lora import _gathered

    out = []
    for tp, sp, cp, families in layouts:
        for family in families:
            job = JobConfig().with_flags(
                load=ckpts[family], seq_length=STEP_SEQ, attention="s2", train_iters=1,
                tensor_model_parallel_size=tp, sequence_parallel=sp, context_parallel_size=cp,
                micro_batch_size=2, lora_b_lr_ratio=16.0)
            job = job.resolved(int(os.environ["WORLD_SIZE"]), read_metadata(ckpts[family]).arch,
                               with_data=False)
            trainer = build_trainer(job, datasets=(None, None))
            model = trainer.models[0]
            init_lora(model, seed=11, b_std=0.3)
            for ddp in trainer.ddp_models:
                ddp.zero_grad_buffer()
            outputs = run_microbatches(trainer.ddp_models, _step_batches(), forward_only=False)
            total = torch.tensor([sum(float(o["loss_sum"]) for o in outputs),
                                  sum(float(o["num_tokens"]) for o in outputs)], dtype=torch.float64)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            params = dict(model.named_parameters())
            grads = {n: _gathered(p.main_grad, p) for n, p in sorted(params.items()) if p.requires_grad}
            out.append(((tp, sp, cp), family, (total[0] / total[1]).item(), grads))
    return out


@pytest.mark.slow
def test_training_step_is_the_same_at_tp2_sp_and_cp2(family_dirs, tmp_path):
    """Qwen2 (q/k/v biases, tied embedding) and Qwen3 (q/k norms, trainable in LoRA+'s "norm"
    group): the loss and every trainable gradient of an S²-Attn + LoRA+ step at TP=2, TP=2 + SP
    and (Qwen3) CP=2 equal TP=1's (DP=2 of identical replicas) within 1e-5 — the q/k norms'
    gradients, partial per TP rank (each holds its heads), summed over TP by
    finalize_model_grads."""
    from megalong.conversion import hf_to_megatron
    from megalong.spawn import run_on_ranks

    families = ("qwen2", "qwen3")
    ckpts = {}
    for family in families:
        ckpts[family] = str(tmp_path / family)
        hf_to_megatron(family_dirs[family], ckpts[family], seq_length=STEP_SEQ)
    layouts = [(1, False, 1, families), (2, False, 1, families), (2, True, 1, families),
               (1, False, 2, ("qwen3",))]
    per_rank = run_on_ranks(family_train_steps, 2, ckpts, layouts, timeout_s=300)
    reference = {family: (loss, grads) for layout, family, loss, grads in per_rank[0]
                 if layout == (1, False, 1)}
    assert any("q_layernorm" in n for n in reference["qwen3"][1])
    assert any("embedding" in n for n in reference["qwen2"][1])
    checked = 0
    for results in per_rank:
        for layout, family, loss, grads in results:
            want_loss, want = reference[family]
            assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (layout, family, loss, want_loss)
            assert grads.keys() == want.keys(), (layout, family)
            for name, grad in want.items():
                assert grad.abs().max() > 0, (family, name)
                err = ((grads[name] - grad).norm() / grad.norm()).item()
                assert err <= 1e-5, (layout, family, name, err)
            checked += 1
    assert checked == 2 * 7


# ------------------------------------------------------------------------------ PEFT export


def convert_all(argv_list):
    """On one rank: `checkpoint_convert.py` (megalong.cli.convert) once per argv."""
    from megalong.cli.convert import main

    for argv in argv_list:
        main(argv)


@pytest.mark.slow
def test_peft_adapter_export_loads_on_the_family_base(family_dirs, tmp_path):
    """Mistral (head_dim), Qwen2 (biases, tied embedding) and Qwen3 (q/k norms among the trained
    extras): a TP=2 checkpoint with adapters on every linear and perturbed embedding and norms,
    exported with `megatron-to-hf --peft-adapter` (loaded with peft.PeftModel.from_pretrained on
    the family's HF base) and merged (`--out --merge-lora`, loaded as the family's class), gives
    megalong's logits both ways."""
    import torch
    from peft import PeftModel

    from megalong.spawn import run_on_ranks
    from test_lora_export import make_lora_checkpoints

    families = ("mistral", "qwen2", "qwen3")
    tokens = torch.randint(0, 1001, (2, 32), generator=torch.Generator().manual_seed(4))
    jobs = [(family_dirs[f], str(tmp_path / f)) for f in families]
    references = run_on_ranks(make_lora_checkpoints, 2, jobs, tokens)[0]
    run_on_ranks(convert_all, 1, [["megatron-to-hf", "--load", str(tmp_path / f), "--peft-adapter",
                                   str(tmp_path / f"{f}-adapter"), "--merge-lora",
                                   "--out", str(tmp_path / f"{f}-merged")] for f in families])
    for family, reference in zip(families, references):
        _, model_cls = hf_classes(family)
        base = model_cls.from_pretrained(family_dirs[family], dtype=torch.float32).eval()
        with torch.no_grad():
            assert (base(tokens).logits - reference).abs().max() > 1e-2, family
        merged = model_cls.from_pretrained(tmp_path / f"{family}-merged", dtype=torch.float32).eval()
        with torch.no_grad():
            assert (merged(tokens).logits - reference).abs().max() <= 1e-4, family
        model = PeftModel.from_pretrained(base, str(tmp_path / f"{family}-adapter")).eval()
        with torch.no_grad():
            assert (model(tokens).logits - reference).abs().max() <= 1e-4, family
        config = json.load(open(tmp_path / f"{family}-adapter" / "adapter_config.json"))
        norms = ["q_norm", "k_norm"] if family == "qwen3" else []
        assert set(config["modules_to_save"]) == {"embed_tokens", "input_layernorm",
                                                  "post_attention_layernorm", "norm", *norms}
