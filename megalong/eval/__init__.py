"""Evaluation on the megatron model at any TP/PP: long-context perplexity (LongLoRA's definition),
generation with a KV cache, passkey retrieval, and their reports (JSON, Markdown, plots).

Dense attention throughout: models are built with attention "full" and put in eval() mode.
"""
