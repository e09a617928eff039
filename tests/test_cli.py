"""The console scripts setup.py installs: each runs --help without importing torch, and each is
the module its tools/ or examples/ shim runs."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIMS = {"megalong-train": "examples/pretrain_longlora.py",
         "megalong-convert": "tools/checkpoint_convert.py",
         "megalong-eval-ppl": "tools/eval_ppl.py", "megalong-passkey": "tools/passkey.py",
         "megalong-generate": "tools/generate.py", "megalong-preprocess": "tools/preprocess_data.py",
         "megalong-tokenizer": "tools/train_tokenizer.py", "megalong-plan": "tools/plan.py",
         "megalong-report": None}


def console_scripts() -> dict:
    """name -> module, from setup.py's entry points (evaluated the way setup() sees them)."""
    text = (ROOT / "setup.py").read_text()
    pairs = re.findall(r'\("([\w-]+)", "(\w+)"\)', text[text.index("console_scripts"):])
    return {f"megalong-{name}": f"megalong.cli.{module}" for name, module in pairs}


def test_setup_declares_every_command():
    assert set(console_scripts()) == set(SHIMS)


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_console_script_prints_its_help(name):
    script = pathlib.Path(sys.executable).parent / name
    assert script.exists(), f"{script} is not installed: run pip install -e . (tests/run.sh does)"
    probe = ("import runpy, sys; sys.argv = [sys.argv[1], '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as end:\n    assert end.code in (0, None), end.code\n"
             "assert 'torch' not in sys.modules, 'torch imported for --help'\n")
    result = subprocess.run([sys.executable, "-c", probe, str(script)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "RANK": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.mark.parametrize("name, shim", [(n, s) for n, s in sorted(SHIMS.items()) if s])
def test_shims_are_thin(name, shim):
    """tools/*.py and examples/*.py only import their command (no sys.path edits)."""
    tree = ast.parse((ROOT / shim).read_text())
    imports = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imports == [console_scripts()[name]], imports
    assert "sys.path" not in (ROOT / shim).read_text()


def test_train_recipe_comes_first_and_the_command_line_wins(monkeypatch):
    from megalong.cli.train import build_parser, with_recipe
    from megalong.config.job import JobConfig

    for name in ("TP", "PP", "SEQ_LEN", "MODEL", "LOAD", "DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert with_recipe(["--model", "tiny"]) == ["--model", "tiny"]  # no recipe: unchanged
    argv = with_recipe(["--recipe", "llama2-7b", "--seq-length", "131072", "--lr", "1e-4"])
    job = JobConfig.from_args(build_parser().parse_args(argv))
    # The 7B recipe at 128k: TP=8 with SP, bf16, full recompute (recipes.py); --lr overrides it.
    assert job.parallel.tensor_model_parallel_size == 8 and job.parallel.sequence_parallel
    assert job.training.bf16 and job.training.recompute_granularity == "full"
    assert job.model.seq_length == 131072 and job.training.lr == 1e-4
    short = JobConfig.from_args(build_parser().parse_args(
        with_recipe(["--recipe", "llama2-7b", "--seq-length", "32768"])))
    assert short.parallel.tensor_model_parallel_size == 2


def test_sft_plan_counts_steps_and_checks_inputs(tmp_path, tiny_megatron_ckpt):
    """examples/sft_longalpaca.sh's torch-free step: steps rounded up, a seeded shuffle written
    whole, one-line errors for bad numbers and for a LOAD that is no checkpoint."""
    import json

    from megalong.cli.sft_plan import main, sft_steps
    from megalong.errors import MegalongError

    assert sft_steps(130, 5, 64) == (11, 3) and sft_steps(6, 1, 2) == (3, 3)
    data = tmp_path / "alpaca.json"
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(7)]
    data.write_text(json.dumps(records))
    copy = tmp_path / "save" / "sft_data.json"
    main([tiny_megatron_ckpt, str(data), str(copy), "2", "4", "", "1", "3"])
    shuffled = json.loads(copy.read_text())
    assert sorted(r["instruction"] for r in shuffled) == sorted(r["instruction"] for r in records)
    assert shuffled != records and not [p for p in copy.parent.iterdir() if ".tmp" in p.name]
    with pytest.raises(MegalongError, match="EPOCHS=two is not a number"):
        main([tiny_megatron_ckpt, str(data), str(copy), "two", "4", "", "1", "3"])
    with pytest.raises(MegalongError, match="hf-to-megatron --seq-length N"):
        main([str(tmp_path), str(data), str(copy), "1", "4", "", "1", "3"])
