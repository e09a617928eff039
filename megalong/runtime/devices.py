"""The device decision (device_policy.py holds its torch-free half). Model building,
checkpoints and logging ask these, never torch.cuda. torch is imported on the first call:
importing megalong.runtime stays torch-free."""

from megalong import runtime
from megalong.device_policy import cpu_forced


def use_cuda() -> bool:
    """CUDA when torch sees a GPU, unless MEGALONG_DEVICE=cpu."""
    import torch

    return not cpu_forced() and torch.cuda.is_available()


def device_type() -> str:
    return "cuda" if runtime.use_cuda() else "cpu"


def device():
    """The torch.device this rank computes on."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if runtime.use_cuda() else torch.device("cpu")
