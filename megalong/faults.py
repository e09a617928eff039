"""Fault injection for the reliability tests, driven by the environment (never set in real runs).

    MEGALONG_FAULT_NAN_LOSS=3,4            the loss of these iterations (0-based) reads as NaN on
                                           every rank
    MEGALONG_FAULT_KILL_AT_ITER=k          SIGKILL once iteration k (1-based: k steps done) has
                                           been logged, before its checkpoint (if any) is saved
    MEGALONG_FAULT_KILL_AFTER_CKPT_FILES=k[@n]
                                           SIGKILL in the middle of saving a checkpoint (the one of
                                           iteration n, else the first this process saves): at the
                                           first point of the save where at least k writes are
                                           done. Writes are counted as: the checkpoint's files
                                           (shards, common.pt, metadata, megalong.json; all there
                                           after the save's first barrier), the manifest (+1), the
                                           rename of iter_N.tmp to iter_N (+1), the tracker (+1)
    MEGALONG_FAULT_SIGTERM_AT_ITER=k       the process sends itself SIGTERM after iteration k
    MEGALONG_FAULT_HANG_AT_ITER=k          the process sleeps for an hour after iteration k (a
                                           stuck rank: the others' collectives must time out)
    MEGALONG_FAULT_RANK=r                  the kill/signal/hang faults above act on global rank r
                                           only (default: every rank)
    MEGALONG_TEST_LOSS_LOG=PATH            rank 0 appends {"iteration", "loss"} JSON lines (exact
                                           floats) to PATH, one per step
"""

import json
import os
import signal
import time

from megalong.log import log


def _iterations(variable: str) -> set[int]:
    value = os.environ.get(variable, "")
    return {int(item) for item in value.split(",") if item.strip()}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _on_this_rank() -> bool:
    wanted = os.environ.get("MEGALONG_FAULT_RANK", "")
    return not wanted.strip() or int(wanted) == _rank()


def _die(reason: str) -> None:
    log(f"fault injection: SIGKILL on rank {_rank()} {reason}", every_rank=True)
    os.kill(os.getpid(), signal.SIGKILL)


def corrupt_loss(iteration: int, loss: float) -> float:
    return float("nan") if iteration in _iterations("MEGALONG_FAULT_NAN_LOSS") else loss


def record_loss(iteration: int, loss: float) -> None:
    """MEGALONG_TEST_LOSS_LOG: the exact loss of each step (iteration counted from 1)."""
    path = os.environ.get("MEGALONG_TEST_LOSS_LOG")
    if path and _rank() == 0:
        with open(path, "a") as handle:
            handle.write(json.dumps({"iteration": iteration, "loss": loss}) + "\n")


def after_iteration(iteration: int) -> None:
    """Called once `iteration` steps are done and logged, before validation and saving."""
    if not _on_this_rank():
        return
    if iteration in _iterations("MEGALONG_FAULT_KILL_AT_ITER"):
        _die(f"after iteration {iteration}")
    if iteration in _iterations("MEGALONG_FAULT_SIGTERM_AT_ITER"):
        log(f"fault injection: SIGTERM to rank {_rank()} after iteration {iteration}",
            every_rank=True)
        os.kill(os.getpid(), signal.SIGTERM)
    if iteration in _iterations("MEGALONG_FAULT_HANG_AT_ITER"):
        log(f"fault injection: rank {_rank()} hangs after iteration {iteration}", every_rank=True)
        time.sleep(3600)


_saves_seen = set()


def checkpoint_writes_done(writes: int, iteration: int) -> None:
    """Called by save_checkpoint as its writes complete (see MEGALONG_FAULT_KILL_AFTER_CKPT_FILES)."""
    value = os.environ.get("MEGALONG_FAULT_KILL_AFTER_CKPT_FILES", "").strip()
    if not value or not _on_this_rank():
        return
    count, _, at = value.partition("@")
    if at:
        if int(at) != iteration:
            return
    else:  # the first checkpoint this process saves
        _saves_seen.add(iteration)
        if min(_saves_seen) != iteration:
            return
    if writes >= int(count):
        _die(f"while saving the checkpoint of iteration {iteration} ({writes} writes done)")
