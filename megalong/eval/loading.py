"""The model an evaluation runs on: `--load CKPT` or `--hf-dir DIR`, resolved without torch (so
CLIs reject bad input before start-up), then built on the ranks with dense attention.

    source = resolve_model_source(load=..., hf_dir=..., tp=2, pp=1)   # torch-free checks
    result = run_on_model_ranks(source, fn, *args)  # fn(*args) on tp*pp ranks; rank 0's result
    model = build_eval_model(source, seq_length)     # inside fn, after init_eval_runtime(source)

Under torchrun the current process is one of the ranks (and ranks beyond tp*pp are data
parallel); otherwise tp*pp local gloo ranks are spawned (one rank runs in this process).
"""

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from megalong.errors import MegalongError
from megalong.model.arch import LlamaArch

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "checkpoint" or "hf"
    path: str
    arch: LlamaArch
    interpolation_factor: Optional[float]
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    padded_vocab_size: Optional[int] = None  # a checkpoint's; HF models are padded for TP at build
    lora: Optional[dict] = None  # a checkpoint's LoRA metadata: adapters merged after loading
    tokenizer: Optional[str] = None  # the tokenizer that travels with the model, if any

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path),
                "interpolation_factor": self.interpolation_factor,
                "tensor_model_parallel_size": self.tensor_parallel,
                "pipeline_model_parallel_size": self.pipeline_parallel,
                "vocab_size": self.arch.vocab_size, "lora": bool(self.lora)}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--load", metavar="CKPT", help="megalong checkpoint directory (its latest "
                       "iteration; LoRA adapters are merged after loading)")
    which.add_argument("--hf-dir", metavar="DIR", help="HF LlamaForCausalLM directory")
    group.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                       help="linear RoPE position interpolation factor (default: the checkpoint's, "
                            "or config.json's rope_scaling/rope_parameters)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)


def source_from_args(args) -> ModelSource:
    return resolve_model_source(
        load=args.load, hf_dir=args.hf_dir, tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        interpolation_factor=args.rotary_seq_len_interpolation_factor)


def resolve_model_source(*, load: Optional[str] = None, hf_dir: Optional[str] = None, tp: int = 1,
                         pp: int = 1, interpolation_factor: Optional[float] = None) -> ModelSource:
    """Everything about the model that can be checked without torch."""
    from megalong.convert.hf_config import arch_from_hf_config, read_hf_dir_config, validate_tp

    if (load is None) == (hf_dir is None):
        raise MegalongError("give exactly one of --load (a megalong checkpoint) or --hf-dir")
    if interpolation_factor is not None and not interpolation_factor >= 1:
        raise MegalongError(f"--rotary-seq-len-interpolation-factor must be >= 1, got "
                            f"{interpolation_factor}")
    if load is not None:
        from megalong.checkpoint_manifest import select_iteration
        from megalong.checkpoint_meta import TOKENIZER_SUBDIR, read_metadata

        meta = read_metadata(load, select_iteration(load))  # a truncated file is named here
        arch = LlamaArch(**meta["arch"])
        validate_tp(arch, tp, pp)
        padded = int(meta["padded_vocab_size"])
        if padded % tp:
            raise MegalongError(f"checkpoint {load}: its padded vocabulary {padded} does not split "
                                f"over tensor-model-parallel-size {tp}")
        tokenizer = os.path.join(load, TOKENIZER_SUBDIR)
        return ModelSource("checkpoint", load, arch,
                           interpolation_factor or meta.get("interpolation_factor"), tp, pp, padded,
                           meta.get("lora") or None, tokenizer if _has_tokenizer(tokenizer) else None)
    config, config_path = read_hf_dir_config(hf_dir)
    arch, recorded = arch_from_hf_config(config, config_path)
    validate_tp(arch, tp, pp)
    return ModelSource("hf", hf_dir, arch, interpolation_factor or recorded, tp, pp,
                       tokenizer=hf_dir if _has_tokenizer(hf_dir) else None)


def _has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in _TOKENIZER_FILES)


def tokenizer_path(source: ModelSource, explicit: Optional[str]) -> str:
    """--tokenizer, else the tokenizer stored with the model; a clear error without either."""
    if explicit:
        from megalong.data.tokenizer import check_tokenizer_path

        check_tokenizer_path(explicit)
        return explicit
    if source.tokenizer is None:
        raise MegalongError(f"{source.path} holds no tokenizer files; pass --tokenizer "
                            "(a sentencepiece tokenizer.model or an HF tokenizer directory)")
    return source.tokenizer


def check_positive(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise MegalongError(f"--{name} must be >= {minimum}, got {value}")


def check_output_file(flag: str, path: Optional[str]) -> None:
    """An output file's directory exists (or can be created) and is writable."""
    if path is None:
        return
    from megalong.data.files import check_writable_dir

    if os.path.isdir(path):
        raise MegalongError(f"--{flag} {path} is a directory; give a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what=f"--{flag} directory")


# ---------------------------------------------------------------- on the ranks (torch from here)


def init_eval_runtime(source: ModelSource, seed: int = 1234) -> None:
    from megalong import runtime

    runtime.apply_patches("eval")  # megatron-core's notices that say nothing about an eval run

    runtime.init_distributed(runtime.ParallelSizes(tensor=source.tensor_parallel,
                                                   pipeline=source.pipeline_parallel), seed=seed)


def build_eval_model(source: ModelSource, seq_length: int):
    """This rank's stage of the model, weights loaded, dense attention, eval mode."""
    from megalong import runtime
    from megalong.convert.layouts import padded_vocab_size
    from megalong.model.llama import ModelOptions, build_llama

    arch = source.arch
    padded = source.padded_vocab_size or padded_vocab_size(arch.vocab_size, 128,
                                                           source.tensor_parallel)
    opts = ModelOptions(seq_length=seq_length, padded_vocab_size=padded, attention="full",
                        interpolation_factor=source.interpolation_factor, initialize=False)
    model = build_llama(arch, opts)
    if runtime.use_cuda():
        model.cuda()
    if source.kind == "checkpoint":
        from megalong.checkpoint import load_checkpoint

        if source.lora:
            from megalong.lora.apply import add_lora
            from megalong.lora.options import LoraOptions

            add_lora(model, LoraOptions.from_metadata(source.lora))
        load_checkpoint([model], source.path)
        if source.lora:
            from megalong.lora.apply import merge_lora

            merge_lora(model)
    else:
        from megalong.convert.hf_checkpoint import HFCheckpointReader
        from megalong.convert.model_io import load_hf_weights

        with HFCheckpointReader(source.path) as reader:
            load_hf_weights(model, reader.get, arch, padded)
    model.eval()
    return model


def run_on_model_ranks(source: ModelSource, fn, *args, timeout_s: float = 7 * 24 * 3600.0):
    """fn(*args) on the model's ranks; returns this process's result (under torchrun) or rank 0's.
    fn calls init_eval_runtime itself."""
    world = source.tensor_parallel * source.pipeline_parallel
    under_torchrun = "WORLD_SIZE" in os.environ
    if under_torchrun or world == 1:
        try:
            return fn(*args)
        finally:
            if not under_torchrun:
                from megalong import runtime

                runtime.shutdown()
    from megalong.spawn import run_on_ranks

    return run_on_ranks(fn, world, *args, timeout_s=timeout_s)[0]
