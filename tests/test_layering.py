"""Module layering (DESIGN.md §2): torch-free foundations -> runtime -> modules (attention, model,
data) -> LoRA -> I/O (checkpoint, conversion of weights) -> the builder -> training, evaluation,
directory conversion -> CLIs. Nothing imports upward, packages form no cycle, and the
torch-free modules stay torch-free (CLIs validate flags, metadata and tokenizers through them
before paying torch's start-up, about 5 s here)."""

import ast
import json
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "megalong"

# Every package and top-level module of megalong, bottom to top. A unit may import units of a
# lower layer, and units of its own layer that do not import it back (no cycles, checked below).
LAYERS = (
    ("errors",),
    # torch-free: architectures, weight map, flags, metadata; atomic writes, JSON records, logging
    ("device_policy", "config", "atomic", "records", "log"),
    ("checkpoint_manifest", "source", "plan", "recipes"),  # torch-free, over the configuration
    ("runtime", "faults", "spawn", "child_processes"),
    ("attention", "data"),
    ("model",),
    ("convert",),  # HF files and the pure weight layouts
    ("lora",),
    ("checkpoint",),
    ("build",),
    ("training", "eval", "conversion"),
    ("cli",),
)
LAYER = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}

TORCH_FREE = (
    "megalong.errors", "megalong.device_policy", "megalong.atomic", "megalong.records",
    "megalong.log", "megalong.runtime", "megalong.config.job",
    "megalong.config.arch", "megalong.config.weight_map", "megalong.config.hf_config",
    "megalong.config.lora", "megalong.config.checkpoint",
    "megalong.checkpoint_manifest", "megalong.source", "megalong.plan", "megalong.recipes",
    "megalong.config.peft", "megalong.training.tokenizer_check", "megalong.cli.train",
    "megalong.cli.convert", "megalong.cli.model_args", "megalong.cli.preprocess",
    "megalong.cli.tokenizer", "megalong.cli.plan", "megalong.cli.eval_ppl",
    "megalong.cli.passkey", "megalong.cli.generate", "megalong.cli.random_model",
    "megalong.cli.report", "megalong.cli.launch", "megalong.cli.sft_plan",
    "megalong.eval.bootstrap", "megalong.eval.pattern_ablation",
)


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "megalong"


def _imports(path):
    """(imported megalong module, whether inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = ([f"{node.module}.{alias.name}" for alias in node.names]
                     if node.module == "megalong" else [node.module])
        else:
            continue
        for name in names:
            if name.startswith("megalong."):
                yield name, id(node) in inside


def test_every_unit_has_a_layer():
    units = {_unit(module) for module, _ in _modules()} - {"megalong"}
    assert units <= set(LAYER), f"no layer for {sorted(units - set(LAYER))}: add it to LAYERS"


def test_nothing_imports_upward_and_packages_form_no_cycle():
    upward, edges = [], {}
    for module, path in _modules():
        unit = _unit(module)
        if unit == "megalong":
            continue
        for name, _ in _imports(path):
            target = _unit(name)
            if target == unit:
                continue
            edges.setdefault(unit, set()).add(target)
            if LAYER[target] > LAYER[unit]:
                upward.append(f"{module} imports {name} ({target} is above {unit})")
    assert not upward, "\n".join(upward)

    def cycle_from(unit, path):
        for target in edges.get(unit, ()):
            if target in path:
                return path[path.index(target):] + [target]
            found = cycle_from(target, path + [target])
            if found:
                return found
        return None

    for unit in edges:
        cycle = cycle_from(unit, [unit])
        assert cycle is None, " -> ".join(cycle)


# Imports of megalong modules kept inside functions, each for a reason: a command imports torch
# only once its flags are checked (megalong/cli/), and importing megalong.runtime stays
# torch-free (its CPU patches import torch when applied).
LAZY_LIMIT = 15


def test_few_imports_stay_lazy():
    lazy = [f"{module}: {name}" for module, path in _modules() for name, inside in _imports(path)
            if inside]
    assert len(lazy) <= LAZY_LIMIT, f"{len(lazy)} lazy imports:\n" + "\n".join(lazy)


_PROBE = """
import importlib, json, sys
found = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    found[name] = "torch" in sys.modules
print(json.dumps(found))
"""


def test_torch_free_modules_do_not_import_torch():
    result = subprocess.run([sys.executable, "-c", _PROBE, *TORCH_FREE], capture_output=True,
                            text=True, timeout=60, check=True)
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    first = next((name for name, torch in imported.items() if torch), None)
    assert first is None, f"importing {first} imports torch"
