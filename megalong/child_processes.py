"""Helper processes that must not outlive the process that started them (torch-free, so a
spawned child imports nothing heavy to run it)."""

import os
import signal


def exit_with_parent(parent_pid: int) -> None:
    """Run first thing in a child process: the kernel sends it SIGKILL when the parent dies,
    however it dies (Linux PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
