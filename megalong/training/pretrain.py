"""Entry point of examples/pretrain_longlora.py: flags into a JobConfig, every check that needs
no torch, then train()."""

import argparse
import dataclasses
import os

from megalong.checkpoint_manifest import select_iteration
from megalong.config.checkpoint import read_metadata
from megalong.config.job import JobConfig
from megalong.errors import MegalongError
from megalong.log import log
from megalong.config.arch import PRESETS
from megalong.training.tokenizer_check import load_checked_tokenizer


def build_parser() -> argparse.ArgumentParser:
    return JobConfig.parser(
        description="LongLoRA context extension on megatron-core. Launch with torchrun "
                    "(examples/pretrain_longlora.sh) or as one process on CPU.")


def parse_and_validate(argv=None) -> JobConfig:
    """Parses and checks every flag (and the --load metadata) without importing torch."""
    job = JobConfig.from_args(build_parser().parse_args(argv))
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
    load_checked_tokenizer(job.data.tokenizer, load, arch)
    return job


def main(argv=None) -> list[float]:
    job = parse_and_validate(argv)
    from megalong.training.loop import train  # torch from here on

    return train(job)
