"""HF checkpoint <-> megatron-core distributed checkpoint, as whole directories, all or nothing.

hf-to-megatron runs on tp*pp ranks (torchrun's, or local gloo processes it spawns): each rank
reads only the HF tensors of its own shard and the ranks write one distributed checkpoint
together. megatron-to-hf rebuilds the model at TP=1, PP=1 in one process and streams HF tensors
into safetensors shards, so the model is held once, never twice.
"""

import dataclasses
import os
import shutil
import sys
import tempfile

from megalong.checkpoint_meta import read_metadata
from megalong.config import default_interpolation_factor
from megalong.convert.hf_config import arch_from_hf_config, validate_tp
from megalong.errors import MegalongError
from megalong.model.arch import LlamaArch

TOKENIZER_SUBDIR = "tokenizer"


def _log(message: str) -> None:
    print(f"[megalong] {message}", file=sys.stderr, flush=True)


def _staging_dir(out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)


def _check_out_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise MegalongError(f"output directory {out} exists and is not empty; pass --overwrite")


def _convert_rank(hf_dir, staging, tp, pp, metadata):
    """One rank of hf-to-megatron: build this rank's shard, fill it from HF, save collectively."""
    from megalong import runtime
    from megalong.checkpoint import save_checkpoint
    from megalong.convert.hf_checkpoint import HFCheckpointReader
    from megalong.convert.model_io import load_hf_weights
    from megalong.model.llama import ModelOptions, build_llama

    runtime.init_distributed(runtime.ParallelSizes(tensor=tp, pipeline=pp))
    arch = LlamaArch(**metadata["arch"])
    opts = ModelOptions(
        seq_length=metadata["seq_length"], padded_vocab_size=metadata["padded_vocab_size"],
        interpolation_factor=metadata["interpolation_factor"], initialize=False,
    )
    model = build_llama(arch, opts)
    with HFCheckpointReader(hf_dir) as reader:
        load_hf_weights(model, reader.get, arch, metadata["padded_vocab_size"])
    save_checkpoint([model], staging, iteration=0, metadata=metadata)


def hf_to_megatron(hf_dir, out, *, tp=1, pp=1, seq_length=None, interpolation_factor=None,
                   vocab_divisible_by=128, overwrite=False, timeout_s=3600.0):
    from megalong.convert.hf_checkpoint import TOKENIZER_FILES, _read_json
    from megalong.convert.layouts import padded_vocab_size

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise MegalongError(f"HF checkpoint directory {hf_dir} does not exist")
    hf_config = _read_json(config_path, "an HF checkpoint directory needs a config.json")
    arch, recorded_factor = arch_from_hf_config(hf_config, config_path)
    validate_tp(arch, tp, pp)
    _check_out_dir(out, overwrite)
    factor = interpolation_factor or default_interpolation_factor(
        seq_length, arch.max_position_embeddings, recorded_factor)
    metadata = {
        "format": "megalong-1",
        "arch": dataclasses.asdict(arch),
        "padded_vocab_size": padded_vocab_size(arch.vocab_size, vocab_divisible_by, tp),
        "interpolation_factor": factor,
        "seq_length": seq_length or arch.max_position_embeddings,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "source": os.path.abspath(hf_dir),
        "hf_config": hf_config,
    }
    _log(f"hf-to-megatron: {hf_dir} -> {out} at TP={tp} PP={pp}, padded vocab "
         f"{metadata['padded_vocab_size']}, interpolation factor {factor}")
    staging = _staging_dir(out)
    try:
        if "WORLD_SIZE" in os.environ:  # under torchrun: this process is one of the ranks
            _convert_rank(hf_dir, staging, tp, pp, metadata)
        else:
            from megalong.spawn import run_on_ranks

            run_on_ranks(_convert_rank, tp * pp, hf_dir, staging, tp, pp, metadata,
                         timeout_s=timeout_s)
        tokenizer_dir = os.path.join(staging, TOKENIZER_SUBDIR)
        os.makedirs(tokenizer_dir)
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tokenizer_dir, name))
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"wrote {out}")
    return out


def _replace_dir(staging: str, out: str) -> None:
    if os.path.exists(out):
        old = out + ".old"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def megatron_to_hf(load, out, *, overwrite=False, max_shard_bytes=None, dtype="float32"):
    """Export the latest checkpoint under `load` as an HF LlamaForCausalLM directory."""
    import torch

    from megalong import runtime
    from megalong.checkpoint import load_checkpoint
    from megalong.convert.hf_checkpoint import DEFAULT_MAX_SHARD_BYTES, print_progress, write_hf_checkpoint
    from megalong.convert.hf_config import hf_config_from_arch
    from megalong.convert.model_io import iter_hf_tensors
    from megalong.model.llama import ModelOptions, build_llama

    metadata = read_metadata(load)
    _check_out_dir(out, overwrite)
    arch = LlamaArch(**metadata["arch"])
    runtime.init_distributed(runtime.ParallelSizes())
    opts = ModelOptions(seq_length=metadata["seq_length"],
                        padded_vocab_size=metadata["padded_vocab_size"],
                        interpolation_factor=metadata["interpolation_factor"], initialize=False)
    model = build_llama(arch, opts)
    iteration = load_checkpoint([model], load)
    _log(f"megatron-to-hf: {load} (iteration {iteration}) -> {out}")
    torch_dtype = getattr(torch, dtype)
    tensors = ((name, t.to(torch_dtype)) for name, t in
               iter_hf_tensors(model, arch, metadata["padded_vocab_size"]))
    tokenizer_dir = os.path.join(load, TOKENIZER_SUBDIR)
    write_hf_checkpoint(
        out, tensors,
        hf_config_from_arch(arch, interpolation_factor=metadata["interpolation_factor"],
                            torch_dtype=dtype, base_config=metadata.get("hf_config")),
        max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
        copy_from=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
        overwrite=overwrite, progress=print_progress,
    )
    _log(f"wrote {out}")
    return out
