"""The torch-free first step of examples/sft_longalpaca.sh: check the checkpoint and every SFT
record, write the seeded shuffle, count the steps.

  python -m megalong.cli.sft_plan LOAD SFT_DATA COPY EPOCHS GLOBAL_BATCH TRAIN_ITERS SHUFFLE SEED

Prints "steps steps_per_epoch data_path" on stdout (the path last: it may hold spaces). The
trainer takes consecutive records for each global batch, so SHUFFLE=1 trains on one seeded
random order of the records (written to COPY) instead of the file's order.
"""

import json
import os
import math
import random
import sys

from megalong.atomic import atomic_file
from megalong.config.checkpoint import read_metadata
from megalong.data.files import make_dirs
from megalong.data.sft import load_sft_records
from megalong.errors import MegalongError, run_cli


def _number(name: str, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise MegalongError(f"{name}={text} is not a number") from None


def sft_steps(records: int, epochs: float, global_batch: int) -> tuple[int, int]:
    """(steps for `epochs` passes, steps per epoch), each rounded up."""
    return math.ceil(records * epochs / global_batch), math.ceil(records / global_batch)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 8:
        raise MegalongError("usage: python -m megalong.cli.sft_plan LOAD SFT_DATA COPY EPOCHS "
                            "GLOBAL_BATCH TRAIN_ITERS SHUFFLE SEED")
    load, data, copy, epochs, batch, iters, shuffle, seed = argv
    epochs, batch = _number("EPOCHS", epochs, float), _number("GLOBAL_BATCH", batch, int)
    iters, seed = _number("TRAIN_ITERS", iters or "0", int), _number("SEED", seed, int)
    if epochs <= 0 or batch <= 0:
        raise MegalongError(f"EPOCHS={epochs:g} and GLOBAL_BATCH={batch} must be positive")
    try:
        read_metadata(load)
    except MegalongError as err:
        raise MegalongError(f"{err} (an HF model converts with tools/checkpoint_convert.py "
                            "hf-to-megatron --seq-length N)") from None
    records = load_sft_records(data)
    if shuffle == "1":
        random.Random(seed).shuffle(records)
        make_dirs(os.path.dirname(copy) or ".")
        # Every node writes the same bytes; atomically, so none reads half a file.
        with atomic_file(copy) as staging, open(staging, "w", encoding="utf-8") as handle:
            json.dump(records, handle, ensure_ascii=False)
        data = copy
    steps, per_epoch = sft_steps(len(records), epochs, batch)
    print(f"[sft] {len(records)} records x {epochs:g} epochs / global batch {batch} = {steps} "
          f"steps" + (f"; TRAIN_ITERS={iters}" if iters else ""), file=sys.stderr)
    print(iters or steps, per_epoch, data)


if __name__ == "__main__":
    sys.exit(run_cli(main))
