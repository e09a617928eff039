"""HF <-> megatron-core conversion.

- layouts: pure tensor maps between HF Llama weights and megatron-core's (TP-sharded) layout.
- hf_config: config.json <-> LlamaArch (torch-free, so CLIs validate before importing torch).
- hf_checkpoint: lazy reader and streaming, atomic writer for HF checkpoint directories.

This package's __init__ imports nothing, so `megalong.config.hf_config` stays torch-free.
"""
