"""`keep_freed_memory()`: the CPU counterpart of CUDA's caching allocator, for training loops."""

# glibc malloc settings that keep freed memory: tunable name -> (mallopt parameter from malloc.h,
# value). The trim threshold is a C int for mallopt, so 2 GiB - 1 is its ceiling.
_KEEP_FREED = {"mmap_max": (-4, 0), "trim_threshold": (-1, 2**31 - 1)}
# The same settings for a process started with GLIBC_TUNABLES (benchmarks/train_step.py).
KEEP_FREED_GLIBC_TUNABLES = ":".join(
    f"glibc.malloc.{name}={value}" for name, (_, value) in _KEEP_FREED.items())


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of handing them back to the kernel.

    By default every block over 32 MiB (an activation at long context, a logits chunk) is a
    fresh mmap, returned on free, so each training step pays a page fault and a kernel zeroing
    for every 4 KiB it touches again (the measurement: docs/perf_log.md). Serving big blocks from
    the heap and never trimming it reuses them, as CUDA's caching allocator does on GPUs; the
    resident set stays at its high-water mark. For loops that reallocate the same tensors
    (training), not one-pass work such as conversion, where a heap fragmented by thousands of
    differently sized weights could raise the peak. False where the C library is not glibc
    (the default stays)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in _KEEP_FREED.values())
