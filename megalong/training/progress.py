"""Per-step log line (loss, lr, grad norm, tokens/s, peak memory, ETA) and TensorBoard scalars."""

import resource
import time

import torch

from megalong import runtime
from megalong.log import ProgressPrinter


def peak_memory_gib() -> float:
    if runtime.use_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Progress:
    def __init__(self, *, train_iters: int, start_iteration: int, tokens_per_step: int,
                 tensorboard_dir=None, enabled=True):
        self.train_iters, self.start = train_iters, start_iteration
        self.tokens_per_step = tokens_per_step
        self.enabled = enabled
        self.started = time.monotonic()
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        # every line the loop asks for (it keeps the log interval), one per line
        self.printer = ProgressPrinter(interval_s=0, enabled=enabled, updating=False)
        self.tty = self.printer.tty

    def step(self, iteration: int, *, loss: float, lr: float, grad_norm, step_time: float,
             skipped: bool = False, extra: str = "", halo=None) -> None:
        """halo: context-parallel halo bytes per layer of this step, {"forward", "backward"}."""
        if not self.enabled:
            return
        if halo is not None:
            extra = f" | halo/layer fwd {_bytes(halo['forward'])} bwd {_bytes(halo['backward'])}" \
                + extra
        done = iteration - self.start
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(done, 1) * (self.train_iters - iteration)
        tokens_per_s = self.tokens_per_step / max(step_time, 1e-9)
        bar = ""
        if self.tty:
            filled = int(20 * iteration / self.train_iters)
            bar = "[" + "#" * filled + "." * (20 - filled) + "] "
        norm = "-" if grad_norm is None else f"{grad_norm:.3f}"
        line = (f"{bar}iter {iteration}/{self.train_iters} | loss {loss:.6f} | lr {lr:.3g} | "
                f"grad norm {norm} | {tokens_per_s:,.0f} tok/s | peak mem {peak_memory_gib():.2f} GiB"
                f" | ETA {_hms(eta)}{' | SKIPPED (non-finite)' if skipped else ''}{extra}")
        self.printer.update(line)
        if self.writer:
            for name, value in [("train/loss", loss), ("train/lr", lr), ("train/tokens_per_s", tokens_per_s),
                                ("train/peak_mem_gib", peak_memory_gib())]:
                self.writer.add_scalar(name, value, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, iteration)
            for direction, count in (halo or {}).items():
                self.writer.add_scalar(f"train/halo_{direction}_bytes_per_layer", count, iteration)

    def validation(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        self.printer.update(f"validation at iter {iteration} | loss {loss:.4f} | ppl {_exp(loss):.2f}")
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, iteration)

    def close(self):
        if self.writer:
            self.writer.close()


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 50.0))


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
