"""Module layering: the torch-free modules stay torch-free. CLIs validate flags, metadata and
tokenizers before paying torch's start-up (about 5 s here), through exactly these modules."""

import json
import subprocess
import sys

TORCH_FREE = (
    "megalong.errors", "megalong.device_policy", "megalong.runtime", "megalong.config",
    "megalong.model.arch", "megalong.model.weight_map",
    "megalong.convert.hf_config", "megalong.lora.options", "megalong.checkpoint_meta",
    "megalong.checkpoint_manifest", "megalong.plan", "megalong.cli",
    "megalong.training.tokenizer_check", "megalong.training.pretrain",
)

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
