"""Typed, torch-free configuration: one frozen dataclass per concern, each with
`add_args(parser)` / `from_args(namespace)` / `validate(...)`, under Megatron-LM's flag names.

    parallel.py  ParallelConfig   tensor / pipeline / context parallel sizes, sequence parallel
    model.py     ModelConfig      preset, seq-length, S²-Attn groups, kernel, RoPE interpolation
    lora.py      LoraConfig       LoRA+ rank, scale, targets, trainable extras
    data.py      DataConfig       --data-path blends or SFT records, tokenizer
    training.py  TrainingConfig   batches, optimizer, precision, recompute, logging, exits;
                 CheckpointConfig --load / --save
    job.py       JobConfig        all of the above, validated across concerns
    source.py    ModelSource      the model an evaluation or export loads (checkpoint or HF dir)
"""
