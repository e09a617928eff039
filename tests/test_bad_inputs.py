"""A catalogue of bad inputs across every CLI: each is one subprocess that must end with a one-line
`error: ...` naming the problem, exit code 2, no traceback, nothing (half-)written, and — except
where the problem can only show while the data is processed — without importing torch.
docs/RELIABILITY.md lists them with their messages."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "examples/pretrain_longlora.py"
CONVERT = "tools/checkpoint_convert.py"
PREPROCESS = "tools/preprocess_data.py"
TOKENIZER = "tools/train_tokenizer.py"
RANDOM_MODEL = "tools/make_random_model.py"
EVAL = "tools/eval_ppl.py"
PASSKEY = "tools/passkey.py"
GENERATE = "tools/generate.py"

# Runs a CLI as `python SCRIPT ARGS` would, then reports on stdout whether torch was imported.
WRAPPER = ("import atexit, runpy, sys\n"
           "atexit.register(lambda: print('MODULES:' + ('torch' if 'torch' in sys.modules "
           "else 'no-torch')))\n"
           "sys.argv = sys.argv[1:]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@dataclass
class Case:
    script: str
    argv: list
    fragment: str  # in the error line
    outputs: list = field(default_factory=list)  # must not exist afterwards
    torch_free: bool = True  # False: the problem shows only while the data is processed
    env: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_megatron_ckpt, tiny_hf_dir, corpus, sp_model, demo_jsonl):
    """Inputs shared by the cases (none of them is modified by a case)."""
    d = tmp_path_factory.mktemp("bad")
    w = {"d": d, "ckpt": tiny_megatron_ckpt, "hf": tiny_hf_dir, "corpus": corpus, "tok": sp_model,
         "jsonl": demo_jsonl}
    (d / "a_file").write_text("not a directory")
    (d / "garbage.model").write_text("not a sentencepiece model")
    (d / "empty.txt").write_text("")
    (d / "empty_sft.json").write_text("[ ]\n")
    (d / "prose.txt").write_text("Once upon a time.\n")
    (d / "prompt.txt").write_text("The capital of France is")
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "no closing brace"\n')
    (d / "busy").mkdir()
    (d / "busy" / "keep.txt").write_text("user data")
    (d / "gpt2").mkdir()
    (d / "gpt2" / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    (d / "dora").mkdir()
    (d / "dora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
         "use_dora": True}))
    import numpy as np

    np.array([5, 2000, 7] * 200, dtype=np.uint16).tofile(d / "other_vocab.bin")
    from megalong.data.demo_text import demo_documents
    from megalong.data.tokenizer import train_sentencepiece

    w["big_tok"] = train_sentencepiece(demo_documents("topics"), 2000, str(d / "big_tok"))
    w["truncated"] = _damaged_copy(tiny_megatron_ckpt, d / "truncated", truncate=True)
    w["bad_tracker"] = _damaged_copy(tiny_megatron_ckpt, d / "bad_tracker", tracker="last")
    w["lora_ckpt"] = _lora_copy(tiny_megatron_ckpt, d / "lora_ckpt")
    return w


def _damaged_copy(source, target, *, truncate=False, tracker=None):
    shutil.copytree(source, target)
    if truncate:
        shard = os.path.join(target, "iter_0000000", "__0_0.distcp")
        with open(shard, "r+b") as handle:
            handle.truncate(os.path.getsize(shard) // 2)
    if tracker is not None:
        (target / "latest_checkpointed_iteration.txt").write_text(tracker)
    return str(target)


def _lora_copy(source, target):
    """A checkpoint whose metadata says it carries rank-8 LoRA adapters on q,k,v,o (with its
    manifest updated, so it is intact): only the metadata is read before the error."""
    from megalong.checkpoint_manifest import file_entries, list_files, write_manifest

    shutil.copytree(source, target)
    directory = os.path.join(target, "iter_0000000")
    meta_path = os.path.join(directory, "megalong.json")
    meta = json.load(open(meta_path))
    meta["lora"] = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "parts": ["q", "k", "v", "o"],
                    "trainable_params": ["embed", "norm"]}
    with open(meta_path, "w") as handle:
        json.dump(meta, handle)
    write_manifest(directory, file_entries(directory, list_files(directory)))
    return str(target)


def _train(w, *extra, load=None, data=True):
    argv = ["--load", load or w["ckpt"], "--tokenizer", w["tok"], "--seq-length", "64",
            "--train-iters", "2", "--global-batch-size", "4"]
    if data:
        argv += ["--data-path", w["corpus"]]
    return argv + list(extra)


def _cases(w) -> dict:
    d = w["d"]
    out = str(d / "out")
    save = str(d / "save")
    return {
        # ---- training: paths, formats, mismatches
        "train: missing data prefix": Case(TRAIN, _train(w, data=False) + [
            "--data-path", str(d / "nothing")], "does not exist", [save]),
        "train: tokenizer file is not sentencepiece": Case(TRAIN, _train(w, "--tokenizer",
            str(d / "garbage.model")), "not a readable sentencepiece model"),
        "train: tokenizer of another vocabulary": Case(TRAIN, _train(w, "--tokenizer",
            w["big_tok"]), "do not belong together"),
        "train: empty SFT data": Case(TRAIN, _train(w, "--sft-data", str(d / "empty_sft.json"),
            data=False), "holds no records"),
        "train: SFT data not json": Case(TRAIN, _train(w, "--sft-data", str(d / "prose.txt"),
            data=False), "is not json or jsonl"),
        "train: unpaired data weights": Case(TRAIN, _train(w, data=False) + [
            "--data-path", "0.5", w["corpus"], "0.5"], "weights and prefixes must pair up"),
        "train: truncated checkpoint": Case(TRAIN, _train(w, load=w["truncated"]),
            "__0_0.distcp is truncated"),
        "train: tracker file is garbage": Case(TRAIN, _train(w, load=w["bad_tracker"]),
            "not an iteration number"),
        "train: LoRA checkpoint, other adapter shape": Case(TRAIN, _train(
            w, "--lora-rank", "4", load=w["lora_ckpt"]), "the adapters would not fit"),
        "train: YaRN with linear interpolation": Case(TRAIN, _train(
            w, "--rope-type", "yarn", "--yarn-rotary-scaling-factor", "2",
            "--rotary-seq-len-interpolation-factor", "2"),
            "YaRN cannot be combined with linear interpolation"),
        "train: a YaRN parameter without --rope-type yarn": Case(TRAIN, _train(
            w, "--yarn-beta-fast", "16"), "--yarn-beta-fast need --rope-type yarn"),
        "train: LoRA checkpoint with --full-finetune": Case(TRAIN, _train(
            w, "--full-finetune", load=w["lora_ckpt"]), "would drop the adapters"),
        # ---- training: parallel sizes and S²-Attn groups
        "train: TP does not divide the heads": Case(TRAIN, _train(
            w, "--tensor-model-parallel-size", "3"), "does not divide num_attention_heads 8"),
        "train: world size vs TP": Case(TRAIN, _train(w, "--tensor-model-parallel-size", "2"),
            "world size 3 is not divisible", env={"WORLD_SIZE": "3"}),
        "train: CP slice not a multiple of G/2": Case(TRAIN, _train(
            w, "--context-parallel-size", "3"), "use --context-parallel-size in {2, 4, 8}"),
        "train: odd S²-Attn group": Case(TRAIN, _train(w, "--group-size-ratio", "0.3"),
            "must be even"),
        "train: the short pattern under CP": Case(TRAIN, _train(
            w, "--attention", "short", "--context-parallel-size", "2"),
            "--attention short is an ablation pattern and is not supported under context parallel"),
        "train: sequence parallel without TP": Case(TRAIN, _train(w, "--sequence-parallel"),
            "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        "train: Transformer Engine absent": Case(TRAIN, _train(
            w, "--transformer-impl", "transformer_engine"), "needs Transformer Engine"),
        # ---- training: out-of-range flags and outputs
        "train: LoRA dropout out of range": Case(TRAIN, _train(w, "--lora-dropout", "1.5"),
            "--lora-dropout must be in [0, 1)"),
        "train: negative --max-skipped-steps": Case(TRAIN, _train(w, "--max-skipped-steps", "-1"),
            "--max-skipped-steps must be >= 0"),
        "train: negative --loss-chunk-tokens": Case(TRAIN, _train(w, "--loss-chunk-tokens", "-5"),
            "--loss-chunk-tokens must be >= 0"),
        "train: block recompute without full": Case(TRAIN, _train(w, "--recompute-method", "block"),
            "--recompute-method block needs --recompute-granularity full"),
        "train: recompute modules without selective recompute": Case(TRAIN, _train(
            w, "--recompute-modules", "mlp"), "add --recompute-granularity selective"),
        "train: flash-attn kernel in float32": Case(TRAIN, _train(w, "--attention-kernel", "flash"),
            "runs in half precision only; add --bf16"),
        "train: TE attention kernel in float32": Case(TRAIN, _train(w, "--attention-kernel", "te"),
            "runs in half precision only; add --bf16"),
        "train: GPU attention kernel on CPU": Case(TRAIN, _train(
            w, "--attention-kernel", "flash", "--bf16"), "runs on CUDA GPUs only"),
        "train: parameter-gather overlap without the distributed optimizer": Case(TRAIN, _train(
            w, "--overlap-param-gather"), "add --use-distributed-optimizer and --overlap-grad-reduce"),
        "train: zero collective timeout": Case(TRAIN, _train(
            w, "--distributed-timeout-minutes", "0"), "--distributed-timeout-minutes must be > 0"),
        "train: --load-fallback without --load": Case(TRAIN, [
            "--model", "tiny", "--data-path", w["corpus"], "--tokenizer", w["tok"],
            "--seq-length", "64", "--train-iters", "2", "--load-fallback"],
            "--load-fallback needs --load"),
        "train: --save under a file": Case(TRAIN, _train(w, "--save", str(d / "a_file" / "run")),
            "cannot write to"),
        # ---- checkpoint_convert
        "convert: HF dir of a non-Llama model": Case(CONVERT, [
            "hf-to-megatron", "--hf-dir", str(d / "gpt2"), "--out", out], "'gpt2' is not supported",
            [out]),
        "convert: --out under a file": Case(CONVERT, [
            "hf-to-megatron", "--hf-dir", w["hf"], "--out", str(d / "a_file" / "mc")],
            "is a file, not a directory"),
        "convert: interpolation factor below 1": Case(CONVERT, [
            "hf-to-megatron", "--hf-dir", w["hf"], "--out", out,
            "--rotary-seq-len-interpolation-factor", "0.5"], "must be >= 1", [out]),
        "convert: DoRA adapter": Case(CONVERT, [
            "hf-to-megatron", "--hf-dir", w["hf"], "--out", out, "--peft-adapter",
            str(d / "dora")], "use_dora is not supported", [out]),
        "convert: export of an HF dir": Case(CONVERT, [
            "megatron-to-hf", "--load", w["hf"], "--out", out],
            "latest_checkpointed_iteration.txt is missing", [out]),
        "convert: export of a truncated checkpoint": Case(CONVERT, [
            "megatron-to-hf", "--load", w["truncated"], "--out", out], "is truncated", [out]),
        # ---- preprocess_data
        "preprocess: glob matches nothing": Case(PREPROCESS, [
            "--input", str(d / "nothing*.jsonl"), "--output-prefix", str(d / "data" / "c"),
            "--tokenizer", w["tok"]], "matches no files", [str(d / "data")]),
        "preprocess: empty input": Case(PREPROCESS, [
            "--input", str(d / "empty.txt"), "--output-prefix", str(d / "data" / "c"),
            "--tokenizer", w["tok"]], "input is empty", [str(d / "data")]),
        "preprocess: zero workers": Case(PREPROCESS, [
            "--input", w["jsonl"], "--output-prefix", str(d / "data" / "c"), "--tokenizer",
            w["tok"], "--workers", "0"], "--workers 0 must be at least 1", [str(d / "data")]),
        "preprocess: broken jsonl line": Case(PREPROCESS, [
            "--input", str(d / "broken.jsonl"), "--output-prefix", str(d / "data" / "c"),
            "--tokenizer", w["tok"]], "broken.jsonl:2: invalid JSON",
            [str(d / "data" / "c.bin"), str(d / "data" / "c.idx")], torch_free=False),
        # ---- train_tokenizer
        "tokenizer: vocabulary too small": Case(TOKENIZER, [
            "--demo-text", "--vocab-size", "10", "--out", out], "use at least 300", [out]),
        "tokenizer: empty input": Case(TOKENIZER, [
            "--input", str(d / "empty.txt"), "--vocab-size", "1000", "--out", out], "no text",
            [out]),
        # ---- make_random_model
        "random model: --out not empty": Case(RANDOM_MODEL, [
            "--model", "tiny", "--out", str(d / "busy")], "pass --overwrite"),
        "random model: negative std": Case(RANDOM_MODEL, [
            "--model", "tiny", "--out", out, "--std", "-1"], "--std must be > 0", [out]),
        # ---- eval_ppl, passkey, generate
        "eval: data of another vocabulary": Case(EVAL, [
            "--load", w["ckpt"], "--data", str(d / "other_vocab.bin"), "--seq-lengths", "32"],
            "outside the model's vocabulary"),
        "eval: HF dir of a non-Llama model": Case(EVAL, [
            "--hf-dir", str(d / "gpt2"), "--data", w["corpus"], "--seq-lengths", "32"],
            "'gpt2' is not supported"),
        "eval: --json under a file": Case(EVAL, [
            "--load", w["ckpt"], "--data", w["corpus"], "--seq-lengths", "32", "--json",
            str(d / "a_file" / "ppl.json")], "is a file, not a directory"),
        "eval: S²-Attn groups that do not fit a length": Case(EVAL, [
            "--load", w["ckpt"], "--data", w["corpus"], "--seq-lengths", "32,48",
            "--eval-attention", "s2", "--group-size", "32"], "seq-length 48 is not a multiple"),
        "eval: a group size with dense attention": Case(EVAL, [
            "--load", w["ckpt"], "--data", w["corpus"], "--seq-lengths", "32",
            "--group-size", "8"], "apply to --eval-attention s2 or short only"),
        "eval: truncated checkpoint": Case(EVAL, [
            "--load", w["truncated"], "--data", w["corpus"], "--seq-lengths", "32"],
            "__0_0.distcp is truncated"),
        "passkey: depth out of range": Case(PASSKEY, [
            "--load", w["ckpt"], "--tokenizer", w["tok"], "--lengths", "256", "--depths", "1.5"],
            "--depths must lie in [0, 1]"),
        "passkey: length shorter than the prompt": Case(PASSKEY, [
            "--load", w["ckpt"], "--tokenizer", w["tok"], "--lengths", "10"], "use lengths of at least"),
        "generate: top-p of zero": Case(GENERATE, [
            "--load", w["ckpt"], "--tokenizer", w["tok"], "--prompt-file", str(d / "prompt.txt"),
            "--temperature", "0.7", "--top-p", "0"], "--top-p must lie in (0, 1]"),
        "generate: tokenizer of another vocabulary": Case(GENERATE, [
            "--load", w["ckpt"], "--tokenizer", w["big_tok"], "--prompt-file",
            str(d / "prompt.txt")], "do not belong together"),
    }


def _placeholder_world() -> dict:
    keys = ("ckpt", "hf", "corpus", "tok", "jsonl", "big_tok", "truncated", "bad_tracker",
            "lora_ckpt")
    return {"d": pathlib.Path("/placeholder"), **{key: f"/placeholder/{key}" for key in keys}}


CASE_IDS = list(_cases(_placeholder_world()))


def test_the_catalogue_covers_every_cli_with_at_least_twenty_inputs():
    scripts = {case.script for case in _cases(_placeholder_world()).values()}
    clis = {TRAIN, CONVERT, PREPROCESS, TOKENIZER, RANDOM_MODEL, EVAL, PASSKEY, GENERATE}
    assert scripts == clis, clis ^ scripts
    assert len(CASE_IDS) >= 20


@pytest.mark.parametrize("name", CASE_IDS)
def test_bad_input_fails_in_one_line_and_writes_nothing(name, world):
    case = _cases(world)[name]
    before = set(os.listdir(world["d"]))
    env = {**os.environ, "MEGALONG_DEVICE": "cpu", **case.env}
    env.pop("RANK", None)
    if "WORLD_SIZE" not in case.env:
        env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-c", WRAPPER, os.path.join(ROOT, case.script),
                             *case.argv], capture_output=True, text=True, timeout=180, env=env,
                            cwd=str(world["d"]))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (name, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
    assert lines and lines[-1].startswith("error: ") and case.fragment in lines[-1], (name, lines)
    if case.torch_free:
        assert lines == lines[-1:], (name, lines)  # the error is all there is
        assert "MODULES:no-torch" in result.stdout, (name, "imported torch before failing")
    for path in case.outputs:
        assert not os.path.exists(path), (name, path)
    after = set(os.listdir(world["d"]))
    assert not {p for p in after - before if ".tmp" in p}, (name, after - before)
    assert (world["d"] / "busy" / "keep.txt").read_text() == "user data"
