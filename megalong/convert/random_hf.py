"""A random Llama written as an HF checkpoint directory (the demo and benchmarks start from one;
nothing is downloaded)."""

import torch

from megalong.config.arch import LlamaArch
from megalong.config.hf_config import hf_config_from_arch
from megalong.config.weight_map import hf_tensor_shapes
from megalong.convert.hf_checkpoint import write_hf_checkpoint


def write_random_hf_model(out_dir, arch: LlamaArch, *, seed: int = 0, std: float = 0.02,
                          overwrite: bool = False) -> None:
    generator = torch.Generator().manual_seed(seed)

    def tensors():
        for name, shape in hf_tensor_shapes(arch):
            if len(shape) == 1:
                yield name, torch.ones(shape)
            else:
                yield name, torch.randn(shape, generator=generator) * std

    config = hf_config_from_arch(arch, interpolation_factor=None,
                                 base_config={"bos_token_id": 1, "eos_token_id": 2})
    write_hf_checkpoint(out_dir, tensors(), config, overwrite=overwrite)
