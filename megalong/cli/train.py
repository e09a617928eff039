"""megalong-train (examples/pretrain_longlora.py): flags into a JobConfig, every check that needs
no torch, then train(). `--recipe MODEL` starts from the launcher's recipe for MODEL (recipes.py:
parallel layout, bf16, recompute, batch sizes; SEQ_LEN from --seq-length), and the command
line's flags win over it."""

import argparse
import dataclasses
import os
import sys

from megalong.checkpoint_manifest import select_iteration
from megalong.config.arch import PRESETS
from megalong.config.checkpoint import read_metadata
from megalong.config.job import JobConfig
from megalong.errors import MegalongError, run_cli
from megalong.log import log
from megalong.recipes import RECIPE_MODELS, recipe_argv
from megalong.training.tokenizer_check import load_checked_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = JobConfig.parser(
        description="LongLoRA context extension on megatron-core. Launch with torchrun "
                    "(examples/pretrain_longlora.sh) or as one process on CPU.")
    parser.add_argument("--recipe", choices=RECIPE_MODELS, default=None,
                        help="start from the launcher's recipe for this model (its parallel "
                             "layout, bf16, recompute, batch sizes and LoRA+ settings for "
                             "--seq-length); flags given here override it")
    return parser


def with_recipe(argv: list) -> list:
    """argv with the recipe's flags first, when --recipe names one (argparse keeps the last)."""
    known, _ = _recipe_parser().parse_known_args(argv)
    if known.recipe is None:
        return argv
    env = {**os.environ, "MODEL": known.recipe}
    if known.seq_length:
        env["SEQ_LEN"] = str(known.seq_length)
    return recipe_argv(env) + argv


def _recipe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--recipe", choices=RECIPE_MODELS, default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    return parser


def parse_and_validate(argv=None) -> JobConfig:
    """Parses and checks every flag (and the --load metadata) without importing torch."""
    argv = sys.argv[1:] if argv is None else list(argv)
    job = JobConfig.from_args(build_parser().parse_args(with_recipe(argv)))
    return validate_job(job, int(os.environ.get("WORLD_SIZE", "1")))


def validate_job(job: JobConfig, world_size: int) -> JobConfig:
    """The job resolved for this world (see JobConfig.resolved), checked against --load's
    metadata and the tokenizer."""
    load, metadata = job.checkpoint.load, None
    if load:
        # A missing or truncated file (sizes against the manifest) is caught here, before torch;
        # load_checkpoint checks the CRC-32s. --load-fallback picks an older intact iteration.
        iteration = select_iteration(load, fallback=job.checkpoint.load_fallback, log=log)
        job = job.replace(checkpoint=dataclasses.replace(job.checkpoint, load_iteration=iteration))
        metadata = read_metadata(load, iteration)
        arch = metadata.arch
    elif job.model.arch or job.model.model:
        arch = job.model.arch or PRESETS[job.model.model]
    else:
        raise MegalongError("give --load (a converted checkpoint) or --model (a preset, random init)")
    job = job.resolved(world_size, arch)
    if metadata is not None:
        job.lora.check_fits_checkpoint(metadata.lora, load)
        job.model.rope_for(arch, metadata.interpolation_factor)  # YaRN on linear: refused
    load_checked_tokenizer(job.data.tokenizer, load, arch)
    return job


def main(argv=None) -> list[float]:
    job = parse_and_validate(argv)
    from megalong.training.loop import train  # torch from here on: the flags are good

    return train(job)


def console() -> None:
    sys.exit(run_cli(main))
