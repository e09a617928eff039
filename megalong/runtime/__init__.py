"""Device and distributed bring-up, and EVERY patch of megatron-core or torch (patches.py).

- devices.py: the device decision (`use_cuda()`, `device_type()`, `device()`);
- distributed.py: torch.distributed + parallel_state bring-up, rank agreement, shutdown;
- rng.py: seeds; memory.py: `keep_freed_memory()` (CPU training loops);
- patches.py: the table of patches with their reasons and the megatron-core version each was
  written for; cpu.py: what the CPU patches install.
Importing it is torch-free (`megalong` applies the import-time warning filters through it);
the modules here call each other through this package, so a test's monkeypatch of
`runtime.use_cuda` (or any name below) reaches them."""

from megalong.runtime.devices import device, device_type, use_cuda
from megalong.runtime.distributed import (_create_context_parallel_communicator, check_ranks_agree,
                                          distributed_failures_as_errors, free_port,
                                          init_distributed, shutdown)
from megalong.runtime.memory import KEEP_FREED_GLIBC_TUNABLES, keep_freed_memory
from megalong.runtime.patches import (PATCHES, WRITTEN_FOR, adapt_megatron_to_cpu, apply_patches,
                                      fill_fused_rope_slot, megatron_version)
from megalong.runtime.rng import seed_everything


__all__ = [
    "KEEP_FREED_GLIBC_TUNABLES", "PATCHES", "WRITTEN_FOR",
    "adapt_megatron_to_cpu", "apply_patches", "check_ranks_agree", "device", "device_type",
    "distributed_failures_as_errors", "fill_fused_rope_slot", "free_port", "init_distributed",
    "keep_freed_memory", "megatron_version", "seed_everything", "shutdown", "use_cuda",
]
