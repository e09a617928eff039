"""One training job: a config per concern, parsed from flags once, validated across concerns.

    job = JobConfig.from_args(JobConfig.parser().parse_args(argv)).resolved(world_size, arch)
    build_trainer(job)          # or JobConfig(model=ModelConfig(...), ...) from Python,
                                # or JobConfig().with_flags(seq_length=8192, bf16=True, ...)
"""

import argparse
import dataclasses
from dataclasses import dataclass, field

from megalong.config.arch import LlamaArch
from megalong.config.data import DataConfig
from megalong.config.lora import LoraConfig
from megalong.config.model import ModelConfig, validate_attention_kernel
from megalong.config.parallel import ParallelConfig
from megalong.config.training import CheckpointConfig, TrainingConfig
from megalong.errors import MegalongError


_CONCERNS = (("model", ModelConfig), ("parallel", ParallelConfig),
             ("checkpoint", CheckpointConfig), ("data", DataConfig),
             ("training", TrainingConfig), ("lora", LoraConfig))


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        for _, concern in _CONCERNS:
            concern.add_args(parser)

    @classmethod
    def parser(cls, **kwargs) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(allow_abbrev=False, **kwargs)
        cls.add_args(parser)
        return parser

    @classmethod
    def from_args(cls, namespace) -> "JobConfig":
        return cls(**{name: concern.from_args(namespace) for name, concern in _CONCERNS})

    def replace(self, **concerns) -> "JobConfig":
        return dataclasses.replace(self, **concerns)

    def with_flags(self, **flags) -> "JobConfig":
        """This job with settings changed by their flags' names (the concerns' field names, as
        flags() lists them), each in its own concern:
        JobConfig().with_flags(seq_length=32768, tensor_model_parallel_size=8, bf16=True)."""
        changes, known = {}, set()
        for concern, cls in _CONCERNS:
            names = {f.name for f in dataclasses.fields(cls)}
            known |= names
            mine = {name: value for name, value in flags.items() if name in names}
            if mine:
                changes[concern] = dataclasses.replace(getattr(self, concern), **mine)
        unknown = sorted(set(flags) - known)
        if unknown:
            raise TypeError(f"no job setting named {', '.join(unknown)}")
        return self.replace(**changes)

    def resolved(self, world_size: int, arch: LlamaArch, *, with_data: bool = True) -> "JobConfig":
        """Every check that needs no torch, across concerns; returns the job with its defaults
        that depend on the world filled in (the global batch). `with_data=False`: the caller
        brings its own datasets (build_trainer(job, datasets=...))."""
        self.model.validate(arch, self.parallel)
        validate_attention_kernel(self.model.attention_kernel, bf16=self.training.bf16)
        data_parallel = self.parallel.data_parallel_size(world_size)
        self.training.validate(data_parallel)
        if with_data:
            self.data.validate()
        self.checkpoint.validate()
        self.lora.validate()
        if self.training.fp8_format and self.model.transformer_impl != "transformer_engine":
            raise MegalongError("--fp8-format runs through Transformer Engine's linears: add "
                                "--transformer-impl transformer_engine")
        global_batch = (self.training.global_batch_size
                        or self.training.micro_batch_size * data_parallel)
        return self.replace(training=dataclasses.replace(self.training,
                                                         global_batch_size=global_batch))

    def flags(self) -> dict:
        """Every setting by its flag's name (the concerns' field names are unique)."""
        return {name: value for concern, _ in _CONCERNS
                for name, value in dataclasses.asdict(getattr(self, concern)).items()}
