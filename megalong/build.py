"""The one place a model is built and its weights loaded: training, evaluation, conversion and
export all come through here.

    model = build_model(arch, model_options(job, metadata))    # training: random or resumed later
    model = load_model(source, seq_length=..., merge_lora=True)  # eval: weights in, dense attention
"""

import torch

from megalong import runtime
from megalong.checkpoint import load_checkpoint
from megalong.config.arch import LlamaArch
from megalong.config.checkpoint import CheckpointMetadata
from megalong.config.job import JobConfig
from megalong.config.lora import LoraOptions
from megalong.convert.hf_checkpoint import HFCheckpointReader
from megalong.convert.model_io import load_hf_weights
from megalong.lora.apply import add_lora, merge_lora as merge_adapters
from megalong.lora.peft_io import PeftAdapter, load_lora_factors
from megalong.model.llama import ModelOptions, build_llama
from megalong.source import ModelSource


def model_options(job: JobConfig, metadata: CheckpointMetadata) -> ModelOptions:
    """What the training job asks of the model (S²-Attn, kernel, precision, recompute)."""
    model, training = job.model, job.training
    return ModelOptions(
        seq_length=metadata.seq_length,
        padded_vocab_size=metadata.padded_vocab_size,
        attention=model.attention,
        group_size=model.group_size_for(metadata.seq_length),
        attention_kernel=model.attention_kernel,
        interpolation_factor=metadata.interpolation_factor,
        transformer_impl=model.transformer_impl,
        params_dtype=torch.bfloat16 if training.bf16 else torch.float32,
        sequence_parallel=job.parallel.sequence_parallel,
        recompute_granularity=training.recompute_granularity,
        recompute_method=training.recompute_method,
        recompute_num_layers=training.recompute_num_layers,
        recompute_modules=training.recompute_modules,
        loss_chunk_tokens=training.loss_chunk_tokens,
        initialize=not job.checkpoint.load,
        fp8_format=training.fp8_format,
    )


def build_model(arch: LlamaArch, options: ModelOptions, *, lora=None, on_device: bool = True):
    """This rank's stage of the model, with LoRA adapters when `lora` (a checkpoint's "lora"
    record or LoraOptions) is given; on the GPU when one is used and `on_device`."""
    model = build_llama(arch, options)
    if lora:
        add_lora(model, lora if isinstance(lora, LoraOptions) else LoraOptions.from_metadata(lora))
    if on_device and runtime.use_cuda():
        model.cuda()
    return model


def load_model(source: ModelSource, *, seq_length=None, attention: str = "full",
               merge_lora: bool = False, peft_adapter=None, on_device: bool = True, **options):
    """This rank's stage of the source's model with its weights, in eval mode: a checkpoint's
    (with its LoRA adapters, folded into the base weights with `merge_lora`), or an HF
    directory's (with a PEFT adapter's factors and whole tensors over it). `options` go to
    ModelOptions (params_dtype, sequence_parallel...); a whole-model export keeps it off the GPU
    (`on_device=False`)."""
    metadata = source.metadata
    opts = ModelOptions(
        seq_length=seq_length or (metadata.seq_length if metadata else
                                  source.arch.max_position_embeddings),
        padded_vocab_size=source.padded_vocab_size, attention=attention,
        interpolation_factor=source.interpolation_factor, initialize=False, **options)
    if source.kind == "checkpoint":
        model = build_model(source.arch, opts, lora=source.lora, on_device=on_device)
        load_checkpoint([model], source.path, source.iteration)
        if source.lora and merge_lora:
            merge_adapters(model)
    else:
        model = build_model(source.arch, opts, on_device=on_device)
        adapter = PeftAdapter(peft_adapter) if peft_adapter else None
        with HFCheckpointReader(source.path) as reader:
            # A PEFT adapter's whole tensors (modules_to_save, trainable_params.bin) replace the
            # base's.
            get = adapter.overlay(reader.get, source.arch) if adapter else reader.get
            load_hf_weights(model, get, source.arch, source.padded_vocab_size)
        if adapter is not None:
            add_lora(model, adapter.options())
            load_lora_factors(model, adapter, source.arch.num_layers)
            if merge_lora:
                merge_adapters(model)
    model.eval()
    return model
