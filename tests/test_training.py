"""The trainer: every parallel layout trains to the single-rank losses, bf16 follows float32,
exact resume, the preprocess -> train -> export -> HF loop, the torchrun launcher, and bad
input."""

import os
import re
import subprocess
import sys

import pytest
import torch

from megalong.config.job import JobConfig
from megalong.config.parallel import ParallelConfig
from megalong.spawn import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "examples", "pretrain_longlora.py")
LAUNCHER = os.path.join(ROOT, "examples", "pretrain_longlora.sh")


def train_args(load, corpus, tokenizer, *extra, iters=5):
    return ["--load", load, "--data-path", corpus, "--tokenizer", tokenizer, "--seq-length", "64",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "2e-4", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
            "--min-lr", "2e-5", "--split", "90,10,0",
            # Adam turns float noise in near-zero gradients into full-size steps; a larger eps
            # damps that, so layouts that differ only in summation order stay comparable.
            "--adam-eps", "1e-5", *extra]


def train_layouts(argv_list):
    """On every rank: train once per argv (re-laying out the same ranks); the losses of each."""
    from megalong.cli.train import main

    return [main(argv) for argv in argv_list]


def rel_close(a, b, tol=1e-5):
    return all(abs(x - y) <= tol * abs(y) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.slow
def test_parallel_layouts_train_to_the_single_rank_losses(tiny_megatron_ckpt, corpus, sp_model):
    # LoRA+ (the default) with S²-Attn; that training lowers the loss is test_s2_model's job.
    base = train_args(tiny_megatron_ckpt, corpus, sp_model, "--attention", "s2")
    (reference,), = run_on_ranks(train_layouts, 1, [base])
    two = run_on_ranks(train_layouts, 2, [
        base + ["--tensor-model-parallel-size", "2"],
        base + ["--pipeline-model-parallel-size", "2"],
        base,  # data parallel 2
        # 4 micro-batches in flight through 1F1B, each layer recomputed
        base + ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full"],
        # megatron's selective recompute of every submodule a Llama layer has, under TP
        base + ["--tensor-model-parallel-size", "2", "--recompute-granularity", "selective",
                "--recompute-modules", "core_attn", "layernorm", "mlp"],
    ])[0]
    (tp2_dp2,), *_ = run_on_ranks(train_layouts, 4, [base + ["--tensor-model-parallel-size", "2"]])
    assert len(reference) == 5
    for name, losses in zip(["tp2", "pp2", "dp2", "pp2 recompute", "tp2 selective", "tp2xdp2"],
                            [*two, tp2_dp2]):
        assert rel_close(losses, reference), (name, losses, reference)


@pytest.mark.slow
def test_resume_is_exact_and_crosses_tensor_parallel_sizes(tiny_megatron_ckpt, corpus, sp_model,
                                                           tmp_path):
    full, part, part_tp2 = (str(tmp_path / n) for n in ("full", "part", "part_tp2"))
    base = train_args(tiny_megatron_ckpt, corpus, sp_model, iters=10)
    (uninterrupted, first, resumed), = run_on_ranks(train_layouts, 1, [
        base + ["--save", full],
        base + ["--save", part, "--save-interval", "5", "--exit-interval", "5"],
        [*train_args(part, corpus, sp_model, iters=10), "--save", part],
    ])
    assert first == uninterrupted[:5]
    assert resumed == uninterrupted[5:], "resume must be bit for bit"
    # A checkpoint written by two TP ranks resumes on one: the first steps after it continue the
    # TP=2 run (weights, Adam moments and schedule carried over). Later steps drift apart at the
    # level of float summation order, which Adam amplifies, so they get a looser bound.
    tp2 = base + ["--tensor-model-parallel-size", "2"]
    tp2_uninterrupted, _ = run_on_ranks(train_layouts, 2, [
        tp2, tp2 + ["--save", part_tp2, "--save-interval", "5", "--exit-interval", "5"]])[0]
    (resumed_tp1,), = run_on_ranks(train_layouts, 1, [train_args(part_tp2, corpus, sp_model, iters=10)])
    assert rel_close(resumed_tp1[:2], tp2_uninterrupted[5:7]), (resumed_tp1, tp2_uninterrupted)
    assert rel_close(resumed_tp1, tp2_uninterrupted[5:], tol=1e-4), (resumed_tp1, tp2_uninterrupted)


def heldout_loss(load, tokens):
    """megalong's mean token loss of `tokens` [b, s+1] with the checkpoint's weights (TP=1)."""
    from megalong import runtime
    from megalong.model.forward import run_microbatches
    from megalong.build import load_model
    from megalong.source import resolve_model_source

    runtime.init_distributed(ParallelConfig())
    model = load_model(resolve_model_source(load=load), seq_length=tokens.shape[1] - 1)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(tokens.shape[0], tokens.shape[1] - 1)}
    with torch.no_grad():
        (out,) = run_microbatches(model, [batch], forward_only=True)
    return (out["loss_sum"] / out["num_tokens"]).item()


@pytest.mark.slow
def test_preprocess_train_export_and_hf_agrees(tiny_megatron_ckpt, demo_jsonl, sp_model, tmp_path):
    from transformers import LlamaForCausalLM

    prefix, save, exported = tmp_path / "data" / "demo", tmp_path / "run", tmp_path / "hf"
    tools = os.path.join(ROOT, "tools")
    subprocess.run([sys.executable, os.path.join(tools, "preprocess_data.py"), "--input", demo_jsonl,
                    "--output-prefix", prefix, "--tokenizer", sp_model], check=True, timeout=120)
    run_on_ranks(train_layouts, 1, [train_args(tiny_megatron_ckpt, str(prefix), sp_model,
                                               "--save", str(save))])
    subprocess.run([sys.executable, os.path.join(tools, "checkpoint_convert.py"), "megatron-to-hf",
                    "--load", save, "--out", exported, "--merge-lora"], check=True, timeout=120)
    from megalong.data.tokenizer import load_tokenizer

    text = "The held-out sentence is not in the training data: 12345 zebras."
    ids = load_tokenizer(sp_model).encode(text * 3)[:65]
    tokens = torch.tensor([ids])
    (ours,) = run_on_ranks(heldout_loss, 1, str(save), tokens)
    model = LlamaForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
        theirs = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:]).item()
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (ours, theirs)


def _losses_from_log(stderr: str) -> list[float]:
    return [float(x) for x in re.findall(r"iter \d+/\d+ \| loss ([0-9.]+)", stderr)]


@pytest.mark.slow
def test_launcher_two_nodes_equal_one_node(tiny_megatron_ckpt, corpus, sp_model, tmp_path):
    from megalong.runtime import free_port

    flags = train_args(tiny_megatron_ckpt, corpus, sp_model, "--save", str(tmp_path / "x"),
                       "--tensor-model-parallel-size", "2")
    env = {**os.environ, "MODEL": "tiny", "SEQ_LEN": "64", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "MEGALONG_DEVICE": "cpu"}
    one = subprocess.run(["bash", LAUNCHER, *flags], env={**env, "NPROC_PER_NODE": "4",
                         "MASTER_PORT": str(free_port())}, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    port = str(free_port())
    flags[flags.index("--save") + 1] = str(tmp_path / "y")
    nodes = [subprocess.Popen(["bash", LAUNCHER, *flags], env={
        **env, "NNODES": "2", "NODE_RANK": str(rank), "NPROC_PER_NODE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[1] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-2000:] + logs[1][-2000:]
    single, multi = _losses_from_log(one.stderr), _losses_from_log(logs[1])
    assert len(single) == 5 and rel_close(multi, single), (multi, single)


@pytest.mark.parametrize("case, fragment", [
    ("missing data", "does not exist"),
    ("empty data", "no tokens"),
    ("vocab mismatch", "do not belong together"),
    ("global batch", "not divisible by micro batch"),
    ("group size", "not a multiple of group size"),
    ("no iters", "--train-iters is required"),
    ("bad load", "latest_checkpointed_iteration.txt"),
    ("data from another tokenizer", "tokenized with another tokenizer"),
])
def test_bad_training_input_is_one_line(case, fragment, tiny_megatron_ckpt, corpus, sp_model,
                                        demo_jsonl, tmp_path):
    args = train_args(tiny_megatron_ckpt, corpus, sp_model)
    if case == "missing data":
        args[args.index("--data-path") + 1] = str(tmp_path / "nothing")
    elif case == "empty data":
        empty = tmp_path / "empty"
        open(f"{empty}.bin", "wb").close()
        _write_empty_index(f"{empty}.idx")
        args[args.index("--data-path") + 1] = str(empty)
    elif case == "vocab mismatch":
        from megalong.data.demo_text import demo_documents
        from megalong.data.tokenizer import train_sentencepiece

        big = train_sentencepiece(demo_documents("topics"), 2000, str(tmp_path / "tok"))
        args[args.index("--tokenizer") + 1] = big
    elif case == "global batch":
        args[args.index("--global-batch-size") + 1] = "3"
        args += ["--micro-batch-size", "2"]
    elif case == "group size":
        args += ["--attention", "s2", "--group-size", "24"]
    elif case == "no iters":
        i = args.index("--train-iters")
        del args[i:i + 2]
    elif case == "bad load":
        args[args.index("--load") + 1] = str(tmp_path)
    elif case == "data from another tokenizer":
        from megalong.data.demo_text import demo_documents
        from megalong.data.preprocess import preprocess_to_indexed
        from megalong.data.tokenizer import train_sentencepiece

        big = train_sentencepiece(demo_documents("topics"), 2000, str(tmp_path / "tok"))
        preprocess_to_indexed([demo_jsonl], str(tmp_path / "big"), big, progress=None)
        args[args.index("--data-path") + 1] = str(tmp_path / "big")
    result = subprocess.run([sys.executable, ENTRY, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (case, result.stderr[-2000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, (case, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "import torch" not in result.stderr


def _write_empty_index(path):
    """A valid megatron .idx holding no documents."""
    import numpy as np

    with open(path, "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00")
        handle.write(np.array([1], dtype=np.uint64).tobytes())
        handle.write(np.array([8], dtype=np.uint8).tobytes())  # uint16 code
        handle.write(np.array([0], dtype=np.uint64).tobytes())
        handle.write(np.array([1], dtype=np.uint64).tobytes())
        handle.write(np.array([0], dtype=np.int64).tobytes())


@pytest.mark.slow
def test_sft_data_trains_end_to_end(tiny_megatron_ckpt, sp_model, tmp_path):
    import json
    import math

    records = [{"instruction": f"Repeat the word number {i}.", "input": "",
                "output": f"word {i} " * 6} for i in range(8)]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(records))
    args = train_args(tiny_megatron_ckpt, "unused", sp_model, "--attention", "s2", iters=3)
    i = args.index("--data-path")
    args[i:i + 2] = ["--sft-data", str(data)]
    (losses,), = run_on_ranks(train_layouts, 1, [args])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_bf16_trains_like_float32(tiny_megatron_ckpt, corpus, sp_model):
    # --bf16 (GPU runs, and the CPU benchmarks on CPUs with bf16 GEMMs): bf16 weights and
    # activations, float32 main weights in the optimizer. Its losses must follow float32's far
    # more closely than a run that barely updates does, or bf16 updates are being lost.
    base = train_args(tiny_megatron_ckpt, corpus, sp_model, "--attention", "s2",
                      "--lr", "2e-3", "--min-lr", "2e-4")
    (fp32, bf16, frozen), = run_on_ranks(train_layouts, 1, [
        base, base + ["--bf16"], base + ["--bf16", "--lr", "1e-12", "--min-lr", "0"]])
    assert bf16 != fp32, "bf16 must round somewhere"
    # Iterations 1-2 see at most one update; from 3 on the updates show.
    bf16_drift = sum(abs(a - b) for a, b in zip(bf16[2:], fp32[2:]))
    update_effect = sum(abs(a - b) for a, b in zip(frozen[2:], fp32[2:]))
    assert bf16_drift <= 0.25 * update_effect, (fp32, bf16, frozen)


# ------------------------------------------------------------------ overlapped DDP communication


OVERLAP_FLAGS = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]


def test_ddp_config_carries_the_overlap_flags():
    from megalong.training import setup
    from megalong.cli.train import build_parser

    def job(argv):
        return JobConfig.from_args(build_parser().parse_args(argv))

    plain = setup.ddp_config(job([]))
    assert not (plain.overlap_grad_reduce or plain.overlap_param_gather
                or plain.use_distributed_optimizer)
    for pp, aligned in ((1, False), (2, True)):
        config = setup.ddp_config(job(OVERLAP_FLAGS + ["--pipeline-model-parallel-size", str(pp)]))
        assert config.overlap_grad_reduce and config.overlap_param_gather
        assert config.use_distributed_optimizer
        assert config.align_param_gather == aligned, pp


class _RecordingDDP:
    """Stands in for megatron's DDP wrapper (the distributed optimizer needs GPUs): records the
    forward pre-hook switches and names its sync functions."""

    def __init__(self, events, name="chunk"):
        self.events, self.name = events, name

    def disable_forward_pre_hook(self, param_sync=True):
        self.events.append(f"disable(param_sync={param_sync})")

    def enable_forward_pre_hook(self):
        self.events.append("enable")

    def no_sync(self):
        pass

    def start_grad_sync(self):
        pass

    def start_param_sync(self):
        pass


def test_schedules_get_megatron_lm_sync_functions():
    from types import SimpleNamespace

    from megalong.training import setup
    from megalong.cli.train import build_parser

    parser = build_parser()
    for flags, pp, grad, param in (([], 1, False, False), (OVERLAP_FLAGS, 1, True, False),
                                   (OVERLAP_FLAGS, 2, True, True)):
        ddp = _RecordingDDP([])
        config = SimpleNamespace(no_sync_func=None, grad_sync_func=None, param_sync_func=None)
        job = JobConfig.from_args(parser.parse_args(flags + ["--pipeline-model-parallel-size",
                                                              str(pp)]))
        setup.set_schedule_sync_funcs(config, [ddp], setup.ddp_config(job))
        assert config.no_sync_func == ddp.no_sync
        assert (config.grad_sync_func == ddp.start_grad_sync) == grad, (flags, pp)
        assert (config.param_sync_func == ddp.start_param_sync) == param, (flags, pp)


@pytest.mark.parametrize("flags, synced", [(OVERLAP_FLAGS, True), ([], False)])
def test_parameters_are_gathered_before_saving_and_evaluating(flags, synced, monkeypatch):
    """With --overlap-param-gather the step leaves parameters to the next forward's pre-hooks:
    saves (which exports read) and evaluations gather them first, then re-enable the hooks."""
    from megalong import checkpoint
    from megalong.training import loop
    from megalong.cli.train import build_parser

    events = []
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda *a, **k: events.append("save"))
    monkeypatch.setattr(loop, "_evaluate", lambda trainer: events.append("evaluate") or 1.0)
    job = JobConfig.from_args(build_parser().parse_args(flags + ["--save", "unused"]))
    trainer = loop.Trainer(job, None, None, [None], [_RecordingDDP(events)], None, None, None, None)
    loop.save(trainer, 3)
    loop.evaluate(trainer)
    if synced:
        assert events == ["disable(param_sync=True)", "save", "enable",
                          "disable(param_sync=True)", "evaluate", "enable"]
    else:
        assert events == ["save", "evaluate"]


@pytest.mark.slow
def test_torchrun_runs_the_launcher_as_typed(tiny_megatron_ckpt, corpus, sp_model, tmp_path):
    """`torchrun [flags] examples/pretrain_longlora.sh [flags]`: torchrun runs the file with
    Python on every rank; it trains (the recipe's flags, then the command line's)."""
    from megalong.runtime import free_port

    flags = train_args(tiny_megatron_ckpt, corpus, sp_model, "--save", str(tmp_path / "run"),
                       "--tensor-model-parallel-size", "2", iters=2)
    env = {**os.environ, "MODEL": "tiny", "SEQ_LEN": "64", "OMP_NUM_THREADS": "1",
           "MEGALONG_DEVICE": "cpu"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master-port",
                str(free_port())]
    trained = subprocess.run([*torchrun, "--nproc-per-node", "2", LAUNCHER, *flags], env=env,
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert len(_losses_from_log(trained.stderr)) == 2, trained.stderr[-3000:]
    assert os.path.isdir(tmp_path / "run" / "iter_0000002")
    helped = subprocess.run([*torchrun, "--nproc-per-node", "1", LAUNCHER, "--help"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr[-3000:]
    for needle in ("usage:", "MODEL", "SEQ_LEN", "--seq-length", "--tensor-model-parallel-size"):
        assert needle in helped.stdout, needle


def test_recipes_give_the_documented_layouts():
    from megalong.errors import MegalongError
    from megalong.recipes import recipe_argv

    def flag(argv, name):
        return argv[len(argv) - 1 - argv[::-1].index(name) + 1] if name in argv else None

    seven = recipe_argv({"MODEL": "llama2-7b", "SEQ_LEN": "32768"})
    assert flag(seven, "--tensor-model-parallel-size") == "2" and "--sequence-parallel" in seven
    assert "--bf16" in seven and flag(seven, "--recompute-granularity") == "full"
    assert flag(recipe_argv({"MODEL": "llama2-7b", "SEQ_LEN": "102400"}),
                "--tensor-model-parallel-size") == "8"
    seventy = recipe_argv({"MODEL": "llama2-70b", "SEQ_LEN": "32768", "NNODES": "2"})
    assert flag(seventy, "--tensor-model-parallel-size") == "8"
    assert flag(seventy, "--pipeline-model-parallel-size") == "2"
    tiny = recipe_argv({"MODEL": "tiny", "SEQ_LEN": "64", "LOAD": "ckpt", "DATA_PATH": "0.5 a 0.5 b",
                        "CP": "2"})
    assert flag(tiny, "--load") == "ckpt" and "--model" not in tiny and "--bf16" not in tiny
    assert tiny[tiny.index("--data-path") + 1:tiny.index("--data-path") + 5] == ["0.5", "a", "0.5", "b"]
    assert flag(tiny, "--context-parallel-size") == "2"
    with pytest.raises(MegalongError, match="unknown MODEL=gpt2"):
        recipe_argv({"MODEL": "gpt2"})
    with pytest.raises(MegalongError, match="TP=two is not a whole number"):
        recipe_argv({"MODEL": "tiny", "TP": "two"})
