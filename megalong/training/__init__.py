"""The training loop on megatron-core: setup (setup.py), batches, optimizer, step and loop."""
