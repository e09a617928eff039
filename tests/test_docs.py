"""The docs run: every shell command in README.md and docs/guide/*.md that can run on a CPU is
executed here on tiny stand-ins; the flag reference is regenerated and compared; the Slurm batch
script trains a tiny model under a fake srun/scontrol.

Conventions for shell blocks (```bash, ```sh, ```console) in those files — every one must be
classified, or test_every_shell_block_is_classified fails:
- ```bash cpu-test         executed (with `bash -euo pipefail`, from the repository root) in file
                           order, each block in its own shell; it must exit 0.
- ```bash cpu-test exit=N  must exit N, and every line of the ```text block right after it must
                           appear in its output (the variables below substituted).
- ```bash cpu-test output  exits 0, and the ```text block right after it is its output (every
                           line must appear): documented figures cannot go stale.
- `<!-- gpu-only -->` on the line before a block: needs GPUs; not run.
- `<!-- not-tested: REASON -->` on the line before a block: not run, for the stated reason (sets
  the reader's paths, starts a server, submits to a cluster, ...).
- `<!-- cpu-test-setup` ... `-->`: hidden commands run at that point, in order with the blocks
  (they stand in for what a GPU-only step above would have left behind).
cpu-test blocks see these variables, standing in for the reader's real files:
  WORK              an empty directory (one per document)
  HF_MODEL          a tiny HF Llama directory with a sentencepiece tokenizer.model
                    (stands in for Llama-2-7b-hf and Llama-2-70b-hf)
  TEXT              a jsonl corpus, one {"text": ...} per line
  EVAL_TOKENS       a flat uint16 token file (LongLoRA's pg19/test.bin format) for HF_MODEL
  LONGLORA_ADAPTER  an adapter in LongLoRA's released form for HF_MODEL: adapter_config.json +
                    adapter_model.bin (LoRA r=8 on q,k,v,o) + trainable_params.bin (embedding
                    with the added pad row, norms)
and `python` is this interpreter; commands run on CPU (MEGALONG_DEVICE=cpu) with small settings
given as environment (QUICKSTART_ITERS=2).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SBATCH = os.path.join(ROOT, "examples", "slurm_pretrain_longlora.sbatch")


def doc_files() -> list[str]:
    guide = os.path.join(ROOT, "docs", "guide")
    names = sorted(n for n in os.listdir(guide) if n.endswith(".md")) if os.path.isdir(guide) else []
    return ["README.md", *(os.path.join("docs", "guide", n) for n in names)]


# ------------------------------------------------------------------------------ markdown blocks

@dataclass
class Block:
    path: str
    line: int          # 1-based line of the opening fence (or of the setup comment)
    lang: str
    tags: list
    text: str
    marker: str = ""   # "gpu-only", "not-tested: ...", "setup" or ""
    expect: list = field(default_factory=list)  # lines the stderr must contain (exit=N)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def exit_code(self) -> int:
        for tag in self.tags:
            if tag.startswith("exit="):
                return int(tag[5:])
        return 0

    @property
    def runs(self) -> bool:
        return self.marker == "setup" or "cpu-test" in self.tags


_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w-]*)\s*(.*)$")
_MARKER = re.compile(r"^\s*<!--\s*(gpu-only|not-tested:.*?)\s*-->\s*$")


def parse_blocks(path: str) -> list[Block]:
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    blocks, i, previous = [], 0, ""
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("<!-- cpu-test-setup"):
            end = next(j for j in range(i, len(lines)) if lines[j].strip().endswith("-->"))
            body = "\n".join(lines[i + 1:end])
            blocks.append(Block(path, i + 1, "bash", [], body, marker="setup"))
            i, previous = end + 1, ""
            continue
        fence = _FENCE.match(line)
        if not fence:
            if line.strip():
                previous = line
            i += 1
            continue
        ticks, lang, info = fence.group(2), fence.group(3), fence.group(4).split()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), len(lines))
        body = "\n".join(lines[i + 1:end])
        marker = _MARKER.match(previous)
        blocks.append(Block(path, i + 1, lang, info, body, marker.group(1) if marker else ""))
        i, previous = end + 1, ""
    for block, following in zip(blocks, blocks[1:]):
        if (block.exit_code or "output" in block.tags) and following.lang == "text":
            block.expect = [ln.strip() for ln in following.text.splitlines() if ln.strip()]
    return blocks


def shell_blocks(path: str) -> list[Block]:
    return [b for b in parse_blocks(path) if b.lang in SHELL_LANGS or b.marker == "setup"]


# ------------------------------------------------------------------------------ fast checks

def test_every_shell_block_is_classified():
    unclassified, empty_reason = [], []
    for path in doc_files():
        for block in shell_blocks(path):
            if block.marker.startswith("not-tested:") and not block.marker[11:].strip():
                empty_reason.append(block.where)
            if not block.runs and not block.marker:
                unclassified.append(block.where)
            if block.runs and block.marker and block.marker != "setup":
                unclassified.append(block.where + " (both cpu-test and a marker)")
    assert not unclassified, ("shell blocks must be ```bash cpu-test or follow <!-- gpu-only --> / "
                              "<!-- not-tested: reason --> (conventions: tests/test_docs.py's "
                              f"docstring): {unclassified}")
    assert not empty_reason, f"not-tested needs a reason: {empty_reason}"


def test_exit_blocks_are_followed_by_their_message():
    missing = [b.where for path in doc_files() for b in shell_blocks(path)
               if b.runs and (b.exit_code or "output" in b.tags) and not b.expect]
    assert not missing, f"```bash cpu-test exit=N / output needs a ```text block after it: {missing}"


def test_flags_doc_is_current():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gen_flags_doc
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    committed = open(gen_flags_doc.DEFAULT_OUT, encoding="utf-8").read()
    assert committed == gen_flags_doc.render(), \
        "docs/guide/flags.md is stale: run python tools/gen_flags_doc.py and commit it"


def test_sbatch_script_parses():
    result = subprocess.run(["bash", "-n", SBATCH], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_outside_slurm_is_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", SBATCH], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: SLURM_JOB_NODELIST is not set"), result.stderr


def test_guides_link_to_files_that_exist():
    broken = []
    for path in doc_files():
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(path), target)):
                broken.append(f"{path}: {target}")
    assert not broken, broken


def _message_pattern(node) -> str:
    """A regex for the strings an AST expression can produce: literal text exact, anything
    computed (f-string fields, names, calls, conditionals) as a lazy wildcard."""
    import ast

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_message_pattern(v) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message_pattern(node.left) + _message_pattern(node.right)
    return ".*?"


def error_patterns() -> list:
    """Every message megalong can print as `error: ...`: MegalongError raises in the package and
    the CLIs, and `echo "error: ..."` in the shell launchers."""
    import ast
    import glob

    patterns = []
    files = [*glob.glob(os.path.join(ROOT, "megalong", "**", "*.py"), recursive=True),
             *glob.glob(os.path.join(ROOT, "tools", "*.py")), *glob.glob(os.path.join(ROOT, "examples", "*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MegalongError"
                    and node.args):
                patterns.append(re.compile(_message_pattern(node.args[0]) + "$", re.S))
    for path in glob.glob(os.path.join(ROOT, "examples", "*.sh")) + [SBATCH]:
        for text in re.findall(r'echo "error: (.*?)" >&2', open(path, encoding="utf-8").read()):
            parts = re.split(r"\$\{?\w+\}?|\$\(.*?\)", text)
            patterns.append(re.compile(".*?".join(map(re.escape, parts)) + "$", re.S))
    return patterns


def test_documented_errors_are_what_megalong_prints():
    patterns = error_patterns()
    assert len(patterns) > 100
    unknown = []
    for path in doc_files():
        for block in parse_blocks(path):
            for line in block.text.splitlines() if block.lang == "text" else []:
                if line.startswith("error: ") and not any(
                        p.match(line[len("error: "):]) for p in patterns):
                    unknown.append(f"{block.where}: {line}")
    assert not unknown, f"documented errors that no raise site produces: {unknown}"


# ------------------------------------------------------------------------------ the stand-ins

def _write_longlora_adapter(hf_dir: str, out: str) -> None:
    """LongLoRA's release form for hf_dir: PEFT LoRA (r=8, alpha=16, q,k,v,o) in adapter_model.bin,
    the trained embedding (one added pad row) and norms in trainable_params.bin."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM.from_pretrained(hf_dir)
    model.resize_token_embeddings(model.config.vocab_size + 1)  # LongLoRA's [PAD]: 32001
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "embed" in name or "norm" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(out, safe_serialization=False, save_embedding_layers=False)
    with open(os.path.join(out, "adapter_config.json"), "w") as handle:  # an older peft's, as theirs
        json.dump({"base_model_name_or_path": hf_dir, "bias": "none", "fan_in_fan_out": False,
                   "inference_mode": True, "init_lora_weights": True, "lora_alpha": 16,
                   "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": 8,
                   "revision": None, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                   "task_type": "CAUSAL_LM"}, handle)
    extras = {name: param.detach().clone() for name, param in model.named_parameters()
              if "embed" in name or "norm" in name}
    torch.save(extras, os.path.join(out, "trainable_params.bin"))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, sp_model, demo_jsonl, corpus):
    from conftest import make_hf_llama

    root = tmp_path_factory.mktemp("docs")
    hf_dir = str(root / "Llama-2-7b-hf")
    make_hf_llama(hf_dir, vocab=1000, layers=2, heads=4, kv_heads=4, hidden=64, ffn=160)
    shutil.copyfile(sp_model, os.path.join(hf_dir, "tokenizer.model"))
    adapter = str(root / "Llama-2-7b-longlora-32k")
    _write_longlora_adapter(hf_dir, adapter)
    eval_tokens = str(root / "pg19_test.bin")
    shutil.copyfile(corpus + ".bin", eval_tokens)  # a uint16 IndexedDataset .bin is a flat file
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    shim.chmod(0o755)
    return {"HF_MODEL": hf_dir, "TEXT": demo_jsonl, "EVAL_TOKENS": eval_tokens,
            "LONGLORA_ADAPTER": adapter, "BIN": str(bin_dir)}


def _env(stand_ins, work) -> dict:
    from megalong.runtime import free_port

    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL", "SEQ_LEN", "LOAD", "SAVE", "DATA_PATH", "TP", "PP", "CP")}
    env.update({name: value for name, value in stand_ins.items() if name != "BIN"})
    env.update(WORK=work, PATH=stand_ins["BIN"] + os.pathsep + env.get("PATH", ""),
               PYTHON=sys.executable, MEGALONG_PYTHON=sys.executable, MEGALONG_DEVICE="cpu",
               OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), QUICKSTART_ITERS="2",
               MEGALONG_QUICKSTART_DIR=os.path.join(work, "quickstart"))
    return env


def _expand(text: str, env: dict) -> str:
    return re.sub(r"\$(\w+)|\$\{(\w+)\}",
                  lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def _runnable_docs() -> list[str]:
    return [p for p in doc_files() if any(b.runs for b in shell_blocks(p))]


# ------------------------------------------------------------------------------ the docs run

@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", _runnable_docs())
def test_cpu_commands_in_docs_run(path, stand_ins, tmp_path):
    work = str(tmp_path / "work")
    os.makedirs(work)
    env = _env(stand_ins, work)
    for block in shell_blocks(path):
        if not block.runs:
            continue
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        output = f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        assert result.returncode == block.exit_code, (
            f"{block.where}: exit {result.returncode}, expected {block.exit_code}\n{block.text}\n{output}")
        printed = " ".join((result.stdout + "\n" + result.stderr).split())
        for line in block.expect:
            assert " ".join(_expand(line, env).split()) in printed, \
                f"{block.where}: the documented message is not what it prints:\n{line}\n{output}"


# ------------------------------------------------------------------------------ Slurm

FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: the command once per node of the allocation, in parallel, with that node's SLURM_*.
while [[ $# -gt 0 && "$1" == -* ]]; do echo "$1" >> "$FAKE_SLURM_LOG"; shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_STEP_ID=0 "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: only `scontrol show hostnames LIST` (a comma-separated list here).
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: $*" >&2; exit 1; }
tr ',' '\\n' <<< "$3"
"""


@pytest.mark.slow
def test_sbatch_trains_tiny_model_on_two_fake_nodes(tiny_megatron_ckpt, corpus, sp_model, tmp_path):
    from megalong.runtime import free_port
    from test_training import _losses_from_log, train_args

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    save, log = tmp_path / "run", tmp_path / "srun_options.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "MASTER_ADDR", "NNODES", "NODE_RANK", "LOCAL_RANK")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_LOG=str(log),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2", SLURM_NNODES="2",
               SLURM_SUBMIT_DIR=ROOT, NPROC_PER_NODE="1", MASTER_PORT=str(free_port()),
               MODEL="tiny", SEQ_LEN="64", PYTHON=sys.executable, MEGALONG_DEVICE="cpu",
               OMP_NUM_THREADS="1")
    flags = train_args(tiny_megatron_ckpt, corpus, sp_model, "--save", str(save), "--save-interval", "5")
    result = subprocess.run(["bash", SBATCH, *flags], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 node(s), master 127.0.0.1:" in result.stderr
    assert "--ntasks-per-node=1" in log.read_text().split()
    losses = _losses_from_log(result.stderr)
    assert len(losses) == 5 and all(0 < loss < 20 for loss in losses), result.stderr[-3000:]
    assert open(save / "latest_checkpointed_iteration.txt").read().strip() == "5"
    meta = json.load(open(save / "iter_0000005" / "megalong.json"))
    assert meta["arch"]["num_layers"] == 2


def test_multi_node_guides_name_both_socket_interfaces():
    """CPU-tensor collectives go to gloo beside NCCL: a multi-node user must set the interface
    of both, or gloo may pick one the other nodes cannot reach."""
    for name in ("cluster.md", "troubleshooting.md"):
        with open(os.path.join(ROOT, "docs", "guide", name)) as handle:
            text = handle.read()
        assert "GLOO_SOCKET_IFNAME" in text and "NCCL_SOCKET_IFNAME" in text, name
