"""Which model to load: a megalong checkpoint (`--load`) or an HF directory (`--hf-dir`, optionally
with a PEFT adapter over it), resolved and checked without torch, so CLIs reject bad input before
start-up. build.load_model turns a ModelSource into a model."""

import os
from dataclasses import dataclass
from typing import Optional

from megalong.checkpoint_manifest import select_iteration
from megalong.config.arch import LlamaArch, validate_tp
from megalong.config.checkpoint import TOKENIZER_SUBDIR, CheckpointMetadata, read_metadata
from megalong.config.hf_config import arch_from_hf_config, read_hf_dir_config
from megalong.config.model import check_interpolation_factor
from megalong.config.parallel import ParallelConfig
from megalong.config.yarn import refuse_linear_with_yarn
from megalong.errors import MegalongError


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    kind: str  # "checkpoint" or "hf"
    path: str
    arch: LlamaArch
    interpolation_factor: Optional[float]
    parallel: ParallelConfig = ParallelConfig()
    padded_vocab_size: int = 0
    lora: Optional[dict] = None  # the LoRA adapters the checkpoint (or PEFT adapter) carries
    tokenizer: Optional[str] = None  # the tokenizer that travels with the model, if any
    metadata: Optional[CheckpointMetadata] = None  # a checkpoint's megalong.json
    iteration: Optional[int] = None  # a checkpoint's iteration to load (None: the latest)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path),
                "interpolation_factor": self.interpolation_factor,
                "tensor_model_parallel_size": self.parallel.tensor_model_parallel_size,
                "pipeline_model_parallel_size": self.parallel.pipeline_model_parallel_size,
                "vocab_size": self.arch.vocab_size, "lora": bool(self.lora)}


def resolve_model_source(*, load: Optional[str] = None, hf_dir: Optional[str] = None,
                         parallel: ParallelConfig = ParallelConfig(),
                         interpolation_factor: Optional[float] = None) -> ModelSource:
    """Everything about the model that can be checked without torch."""
    if (load is None) == (hf_dir is None):
        raise MegalongError("give exactly one of --load (a megalong checkpoint) or --hf-dir")
    check_interpolation_factor(interpolation_factor)
    parallel.validate()
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if load is not None:
        iteration = select_iteration(load)  # a truncated file is named here
        meta = read_metadata(load, iteration)
        validate_tp(meta.arch, tp, pp)
        refuse_linear_with_yarn(meta.arch.yarn_rope, interpolation_factor,
                                "--rotary-seq-len-interpolation-factor")
        if meta.padded_vocab_size % tp:
            raise MegalongError(f"checkpoint {load}: its padded vocabulary "
                                f"{meta.padded_vocab_size} does not split over "
                                f"tensor-model-parallel-size {tp}")
        return ModelSource(kind="checkpoint", path=load, arch=meta.arch,
                           interpolation_factor=interpolation_factor or meta.interpolation_factor,
                           parallel=parallel, padded_vocab_size=meta.padded_vocab_size,
                           lora=meta.lora or None, tokenizer=find_tokenizer(load),
                           metadata=meta, iteration=iteration)
    config, config_path = read_hf_dir_config(hf_dir)
    arch, recorded = arch_from_hf_config(config, config_path)
    validate_tp(arch, tp, pp)
    refuse_linear_with_yarn(arch.yarn_rope, interpolation_factor,
                            "--rotary-seq-len-interpolation-factor")
    return ModelSource(kind="hf", path=hf_dir, arch=arch,
                       interpolation_factor=interpolation_factor or recorded, parallel=parallel,
                       padded_vocab_size=arch.padded_vocab(tp=tp),
                       tokenizer=find_tokenizer(hf_dir))


def find_tokenizer(directory: Optional[str]) -> Optional[str]:
    """The tokenizer stored with a model: an HF directory's own tokenizer* files (tokenizer.json,
    tokenizer.model, tokenizer_config.json), or a checkpoint's tokenizer/ subdirectory (they
    travel with checkpoints). None when there is none."""
    if not directory:
        return None
    for candidate in (directory, os.path.join(directory, TOKENIZER_SUBDIR)):
        if os.path.isdir(candidate) and any(name.startswith("tokenizer") and
                                            os.path.isfile(os.path.join(candidate, name))
                                            for name in os.listdir(candidate)):
            return candidate
    return None
