"""HF checkpoint <-> megatron-core distributed checkpoint, as whole directories, all or nothing.

hf-to-megatron runs on tp*pp ranks (torchrun's, or local gloo processes it spawns): each rank
reads only the HF tensors of its own shard and the ranks write one distributed checkpoint
together. megatron-to-hf rebuilds the model at TP=1, PP=1 in one process and streams HF tensors
into safetensors shards, so the model is held once, never twice.
"""

import os
import shutil

from megalong import runtime
from megalong.atomic import atomic_directory, check_out_dir
from megalong.build import load_model
from megalong.checkpoint import save_checkpoint
from megalong.config.arch import VOCAB_DIVISIBLE_BY, LlamaArch, validate_tp
from megalong.config.checkpoint import TOKENIZER_SUBDIR, CheckpointMetadata
from megalong.config.hf_config import arch_from_hf_config, hf_config_from_arch, read_hf_dir_config
from megalong.config.lora import LoraOptions, lora_metadata
from megalong.config.model import default_interpolation_factor
from megalong.config.parallel import ParallelConfig
from megalong.config.peft import peft_config_json
from megalong.config.yarn import refuse_linear_with_yarn
from megalong.convert.hf_checkpoint import (DEFAULT_MAX_SHARD_BYTES, copy_tokenizer_files,
                                            print_progress, write_hf_checkpoint)
from megalong.convert.model_io import iter_hf_tensors
from megalong.errors import MegalongError
from megalong.log import log
from megalong.lora.apply import merge_lora as merge_adapters
from megalong.lora.peft_io import PeftAdapter, iter_peft_tensors, write_peft_adapter
from megalong.source import ModelSource, resolve_model_source
from megalong.spawn import run_on_ranks


def _convert_rank(source: ModelSource, staging, metadata: CheckpointMetadata, peft_adapter=None):
    """One rank of hf-to-megatron: build this rank's shard with the HF weights (and a PEFT adapter
    over them), save collectively."""
    runtime.init_distributed(source.parallel)
    model = load_model(source, seq_length=metadata.seq_length, peft_adapter=peft_adapter,
                       on_device=False)
    save_checkpoint([model], staging, iteration=0, metadata=metadata)


def hf_to_megatron(hf_dir, out, *, parallel: ParallelConfig = ParallelConfig(), seq_length=None,
                   interpolation_factor=None, vocab_divisible_by=VOCAB_DIVISIBLE_BY,
                   overwrite=False, timeout_s=3600.0, peft_adapter=None):
    """`hf_dir` as a megalong checkpoint written by `parallel`'s TP x PP ranks (torchrun's, or
    local gloo ranks spawned here), the vocabulary padded for its TP size."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    hf_config, config_path = read_hf_dir_config(hf_dir)
    arch, recorded_factor = arch_from_hf_config(hf_config, config_path)
    validate_tp(arch, tp, pp)
    check_out_dir(out, overwrite)
    lora = None
    if peft_adapter:
        arch, lora = _peft_adapter_onto(arch, peft_adapter)
    refuse_linear_with_yarn(arch.yarn_rope, interpolation_factor,
                            "--rotary-seq-len-interpolation-factor")
    factor = None if arch.yarn_rope else interpolation_factor or default_interpolation_factor(
        seq_length, arch.max_position_embeddings, recorded_factor)
    metadata = CheckpointMetadata(
        arch=arch, padded_vocab_size=arch.padded_vocab(vocab_divisible_by, tp),
        interpolation_factor=factor, seq_length=seq_length or arch.max_position_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, lora=lora,
        source=os.path.abspath(hf_dir), hf_config=hf_config)
    source = ModelSource(kind="hf", path=hf_dir, arch=arch, interpolation_factor=factor,
                         parallel=parallel, padded_vocab_size=metadata.padded_vocab_size)
    log(f"hf-to-megatron: {hf_dir} -> {out} at TP={tp} PP={pp}, padded vocab "
         f"{metadata.padded_vocab_size}, interpolation factor {factor}")
    with atomic_directory(out, overwrite=overwrite) as staging:
        if "WORLD_SIZE" in os.environ:  # under torchrun: this process is one of the ranks
            _convert_rank(source, staging, metadata, peft_adapter)
        else:
            run_on_ranks(_convert_rank, tp * pp, source, staging, metadata, peft_adapter,
                         timeout_s=timeout_s)
        tokenizer_dir = os.path.join(staging, TOKENIZER_SUBDIR)
        os.makedirs(tokenizer_dir)
        copy_tokenizer_files(hf_dir, tokenizer_dir)
    log(f"wrote {out}")
    return out


def _peft_adapter_onto(arch: LlamaArch, peft_adapter: str):
    """(arch, the checkpoint's "lora" metadata) for a PEFT adapter over a base of `arch`. An adapter
    embedding with more rows than the base vocabulary (LongLoRA's added pad token: 32001) grows it."""
    adapter = PeftAdapter(peft_adapter)
    rows = adapter.vocab_rows()
    if rows is not None and rows < arch.vocab_size:
        raise MegalongError(f"{peft_adapter}: its embedding has {rows} rows, fewer than the base "
                            f"vocabulary of {arch.vocab_size}")
    if rows is not None and rows > arch.vocab_size:
        log(f"vocabulary {arch.vocab_size} -> {rows} (the adapter's embedding); the lm_head grows "
             "by the mean of its rows, as LongLoRA's resize does")
        arch = arch.with_(vocab_size=rows)
    adapter.check_fits(arch)
    log(f"PEFT adapter {peft_adapter}: r={adapter.config['rank']} alpha={adapter.config['alpha']:g} "
         f"on {','.join(adapter.parts)}; whole tensors: {len(adapter.hf_tensors)}")
    return arch, lora_metadata(adapter.options(), adapter.extras())


def megatron_to_hf(load, out, *, overwrite=False, max_shard_bytes=None, dtype="float32",
                   merge_lora=False, peft_adapter=None):
    """Export the latest checkpoint under `load` as an HF LlamaForCausalLM directory (`out`; LoRA
    adapters merged with `merge_lora`) and/or its adapters as a PEFT directory (`peft_adapter`)."""
    import torch

    source = resolve_model_source(load=load)
    metadata, arch, iteration = source.metadata, source.arch, source.iteration
    metadata.check_export(load, out=out, merge_lora=merge_lora, peft_adapter=peft_adapter)
    for directory in (out, peft_adapter):
        if directory:
            check_out_dir(directory, overwrite)
    runtime.init_distributed(source.parallel)
    torch_dtype = getattr(torch, dtype)
    # The whole model is in memory once: a bf16 export builds it in bf16 (half the RAM: 140 GB
    # instead of 280 GB for 70B). A bf16-trained checkpoint stores bf16 weights, so nothing is
    # lost; LoRA merges still add in float32 and round once.
    params_dtype = torch.bfloat16 if torch_dtype == torch.bfloat16 else torch.float32
    model = load_model(source, params_dtype=params_dtype, on_device=False)
    lora = metadata.lora
    if peft_adapter:
        _export_peft_adapter(model, arch, metadata, peft_adapter, torch_dtype, overwrite)
        log(f"wrote PEFT adapter {peft_adapter} from {load} (iteration {iteration})")
    if not out:
        return peft_adapter
    try:
        out = _export_hf(model, arch, metadata, load, out, iteration, torch_dtype, dtype, overwrite,
                         max_shard_bytes, merge=bool(lora))
    except BaseException:
        if peft_adapter:  # all or nothing: no adapter without the model it was asked with
            shutil.rmtree(peft_adapter, ignore_errors=True)
        raise
    return out


def _export_peft_adapter(model, arch, metadata, directory, torch_dtype, overwrite):
    lora = metadata.lora
    extras = lora.get("trainable_params", [])
    config = peft_config_json(LoraOptions.from_metadata(lora), extras, arch,
                              base_model=metadata.source)
    tensors = iter_peft_tensors(model, arch, metadata.padded_vocab_size, extras)
    write_peft_adapter(directory, tensors, config, overwrite=overwrite, dtype=torch_dtype)


def _export_hf(model, arch, metadata, load, out, iteration, torch_dtype, dtype, overwrite,
               max_shard_bytes, *, merge):
    if merge:
        log(f"merged {merge_adapters(model)} LoRA adapters into the base weights")
    log(f"megatron-to-hf: {load} (iteration {iteration}) -> {out}")
    tensors = ((name, t.to(torch_dtype)) for name, t in
               iter_hf_tensors(model, arch, metadata.padded_vocab_size))
    tokenizer_dir = os.path.join(load, TOKENIZER_SUBDIR)
    write_hf_checkpoint(
        out, tensors,
        hf_config_from_arch(arch, interpolation_factor=metadata.interpolation_factor,
                            torch_dtype=dtype, base_config=metadata.hf_config),
        max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
        copy_from=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
        overwrite=overwrite, progress=print_progress,
    )
    log(f"wrote {out}")
    return out
