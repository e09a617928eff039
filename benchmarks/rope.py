"""RoPE on q and k: megatron's unfused path vs megalong's kernel (model/rope.py), forward +
backward time of one layer's q and k.

    python benchmarks/rope.py [--seq-length 8192] [--heads 8] [--kv-heads 2] [--dim 64]
                              [--device cpu|cuda] [--bf16] [--repeats 25]

q and k are strided views of a qkv tensor laid out as megatron's qkv output. Time: the median
of --repeats runs of each, alternating, after a warm-up (CUDA: synchronized; CPU: freed memory
kept for reuse, as training keeps it). Memory traffic: the bytes every aten op that is not a
view reads and writes, counted by a dispatch mode over one run of each. The kernel's saving is
traffic (about 15 passes over q and k forward and backward instead of 27), which is what a GPU
pays for; CPU times depend as much on how well each op's loop vectorizes.
"""

import argparse
import os
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=8192, help="tokens")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--dim", type=int, default=64, help="head dimension")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    parser.add_argument("--bf16", action="store_true", help="bf16 q and k (default float32)")
    parser.add_argument("--repeats", type=int, default=25, help="timed runs of each")
    args = parser.parse_args()
    if args.heads % args.kv_heads or args.dim % 2:
        parser.error("--heads must be a multiple of --kv-heads and --dim even")

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megalong.model.rope import rotate_half_rope
    from megalong.runtime import keep_freed_memory

    if args.device == "cpu":
        keep_freed_memory()  # as training does: no page faults on each fresh activation
    device, dtype = torch.device(args.device), torch.bfloat16 if args.bf16 else torch.float32
    per_kv = args.heads // args.kv_heads
    qkv = torch.randn(args.seq_length, 1, args.kv_heads, (per_kv + 2) * args.dim,
                      device=device, dtype=dtype)
    q = qkv[..., :per_kv * args.dim].reshape(args.seq_length, 1, args.heads, args.dim)
    k = qkv[..., per_kv * args.dim:-args.dim]
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    inv = 1.0 / 10000 ** (torch.arange(0, args.dim, 2, device=device) / args.dim)
    angles = torch.outer(torch.arange(args.seq_length, device=device).float(), inv)
    freqs = torch.cat((angles, angles), -1)[:, None, None, :]
    grads = [torch.randn_like(x) for x in (q, k)]

    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = [fn(x, freqs) for x in (q, k)]
        torch.autograd.grad(outs, (q, k), grads)  # not .backward: no accumulation into .grad
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    fns = {"megatron unfused": _apply_rotary_pos_emb_bshd, "megalong kernel": rotate_half_rope}
    traffic = {name: _traffic_bytes(lambda fn=fn: run(fn)) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(3):
        for fn in fns.values():
            run(fn)
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(run(fn))
    print(f"RoPE fwd+bwd of q {tuple(q.shape)} and k {tuple(k.shape)}, {dtype}, {device}:")
    base = statistics.median(times["megatron unfused"])
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        passes = traffic[name] / (q.numel() + k.numel()) / q.element_size()
        print(f"  {name}: {ms:.2f} ms ({base * 1e3 / ms:.2f}x megatron's); memory traffic "
              f"{traffic[name] / 2**20:.0f} MiB, {passes:.1f} passes over q and k")


def _traffic_bytes(step) -> int:
    """Bytes the step's aten ops read and write: every tensor argument and result of each op
    that is not a view or an allocation (a dispatch mode sees the backward's ops too)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided}

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            if not func.is_view and func.overloadpacket not in ALLOCATIONS:
                reads = tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
                for t in reads + tree_leaves(result):
                    if isinstance(t, torch.Tensor):
                        Count.total += t.numel() * t.element_size()
            return result

    with Count():
        step()
    return Count.total


if __name__ == "__main__":
    main()
