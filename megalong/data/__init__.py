"""Data: tokenizers, demo corpus, preprocessing to IndexedDataset, pretraining and SFT datasets.

Import the submodules directly; `tokenizer`, `demo_text` and the validation half of `preprocess`
are torch-free so CLIs can check their arguments before the slow imports.
"""
