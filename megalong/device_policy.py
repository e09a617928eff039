"""Where megalong runs, decided in one place: the torch-free half of the device policy.

`MEGALONG_DEVICE=cpu` runs on the CPU even where a GPU is visible (spawned converter, eval and
test ranks set it); otherwise CUDA is used when torch sees a GPU. `runtime.use_cuda()` is the
decision once torch is imported and the only code that asks torch about CUDA; this module lets
torch-free validation (config.py) predict it before torch's start-up is paid.
"""

import glob
import importlib.util
import os

DEVICE_ENV = "MEGALONG_DEVICE"


def cpu_forced() -> bool:
    """True when MEGALONG_DEVICE=cpu asks for the CPU whatever torch sees."""
    return os.environ.get(DEVICE_ENV, "") == "cpu"


def cuda_possible() -> bool:
    """Without importing torch: False where the run will certainly be on the CPU (CPU forced,
    or torch is a CPU-only build, which ships no CUDA runtime library); True where
    `runtime.use_cuda()` may be true (a GPU is then still needed at run time)."""
    if cpu_forced():
        return False
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = os.path.join(spec.submodule_search_locations[0], "lib")
    return bool(glob.glob(os.path.join(lib, "*cudart*")) or
                glob.glob(os.path.join(lib, "libtorch_cuda*")))
