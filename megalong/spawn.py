"""Run a function on N gloo ranks (one process each) with a timeout, collecting results.

Used by the multi-rank tests and benchmarks: `run_on_ranks(fn, 2, *args)` returns
`[fn(*args) on rank 0, fn(*args) on rank 1]`; an exception on any rank, or the timeout, kills
every rank and raises with that rank's traceback, so a hang never eats CI's time.
"""

import io
import os
import queue as queue_mod
import time
import traceback

from megalong import runtime
from megalong.errors import MegalongError
from megalong.runtime.distributed import free_port


def _rank_main(fn, rank, world_size, port, results, args, kwargs, env):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MEGALONG_DEVICE="cpu",
    )
    os.environ.update(env)
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        value = fn(*args, **kwargs)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except MegalongError as err:  # bad input: the parent re-raises it as the same one-liner
        results.put((rank, "input", str(err)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        results.put((rank, "bug", traceback.format_exc()))
    finally:
        try:
            runtime.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 240.0, env=None, **kwargs):
    import multiprocessing as mp

    import torch

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1" if world_size > 2 else os.environ.get("OMP_NUM_THREADS", "1")}
    child_env.update(env or {})
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, results, args, kwargs, child_env))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outputs = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks exceeded {timeout_s:.0f}s")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(
                        f"{fn.__name__}: a rank died with exit code {dead[0].exitcode}"
                    ) from None
                continue
            if status == "input":
                raise MegalongError(payload)
            if status == "bug":
                raise RuntimeError(f"{fn.__name__} failed on rank {rank}:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=5 if outputs and len(outputs) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [outputs[r] for r in range(world_size)]


__all__ = ["run_on_ranks"]
