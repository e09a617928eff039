"""Rebuild the model a checkpoint was written for (architecture, padded vocabulary, RoPE
interpolation, LoRA adapters from its megalong.json) at the current parallel layout, and load it."""

from megalong.checkpoint_meta import read_metadata
from megalong.model.arch import LlamaArch


def model_from_checkpoint(load: str, *, seq_length=None, attention: str = "full", **options):
    """Returns (model, metadata, iteration). `options` go to ModelOptions (e.g.
    sequence_parallel); attention defaults to dense, for evaluation and export."""
    from megalong.checkpoint import load_checkpoint
    from megalong.model.llama import ModelOptions, build_llama

    metadata = read_metadata(load)
    opts = ModelOptions(seq_length=seq_length or metadata["seq_length"],
                        padded_vocab_size=metadata["padded_vocab_size"],
                        interpolation_factor=metadata["interpolation_factor"],
                        attention=attention, initialize=False, **options)
    model = build_llama(LlamaArch(**metadata["arch"]), opts)
    if metadata.get("lora"):
        from megalong.lora.apply import add_lora
        from megalong.lora.options import LoraOptions

        add_lora(model, LoraOptions.from_metadata(metadata["lora"]))
    iteration, _ = load_checkpoint([model], load)
    return model, metadata, iteration
