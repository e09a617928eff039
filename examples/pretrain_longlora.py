#!/usr/bin/env python3
"""LongLoRA training on megatron-core (see examples/pretrain_longlora.sh for the launcher)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalong.errors import run_cli  # noqa: E402
from megalong.training.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
