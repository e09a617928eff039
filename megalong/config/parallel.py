"""How the model and data split over ranks: tensor, pipeline, context and data parallel."""

import argparse
from dataclasses import dataclass

from megalong.config._fields import from_namespace
from megalong.errors import MegalongError


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("parallelism")
        group.add_argument("--tensor-model-parallel-size", type=int, default=1)
        group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
        group.add_argument("--context-parallel-size", type=int, default=1)
        group.add_argument("--sequence-parallel", action="store_true",
                           help="shard norms/dropout activations over TP ranks (needs TP > 1)")

    @classmethod
    def from_args(cls, namespace) -> "ParallelConfig":
        return from_namespace(cls, namespace)

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise MegalongError(
                f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
                f"= {self.model_parallel_size}")
        return world_size // self.model_parallel_size

    def validate(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size"):
            value = getattr(self, name)
            if value < 1:
                raise MegalongError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise MegalongError("--sequence-parallel needs --tensor-model-parallel-size > 1")
