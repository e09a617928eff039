"""Per-rank S²-Attn compute under context parallel: one CP rank's slice against 1/c of the
whole sequence (no communication; the halo is handed in as the exchange would deliver it).

    python benchmarks/cp_slice.py [--device cuda] [--sizes 32768,100000] [--cp 2,4,8]
                                  [--heads 32] [--kv-heads 32] [--dim 128] [--repeats 10]

Rows: N, c, and the forward + backward time of `s2_attention` on all N tokens divided by c
(perfect splitting), of `s2_attention_on_slice` on rank 1's slice (it receives a halo; rank 0's
costs at most as much), and their ratio. G = N/4, batch 1, bf16 on CUDA (float32 on CPU).
Before timing, every rank's slice is checked against the whole-sequence output.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _fastest(fn, repeats, device):
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    import torch

    from megalong.attention import s2_attention
    from megalong.attention.context_parallel import halo_plan, s2_attention_on_slice

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="32768,100000")
    parser.add_argument("--cp", default="2,4,8")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print("| N | c | whole / c (ms) | rank-1 slice (ms) | slice / (whole / c) |")
    print("|---:|---:|---:|---:|---:|")
    for seq_len in [int(x) for x in args.sizes.split(",")]:
        group_size = seq_len // 4
        q, k, v = (torch.randn(seq_len, 1, h, args.dim, device=device, dtype=dtype,
                               requires_grad=True)
                   for h in (args.heads, args.kv_heads, args.kv_heads))

        def whole():
            out = s2_attention(q, k, v, group_size)
            out.backward(torch.ones_like(out))
            return out

        reference = whole().detach()
        whole_time = _fastest(whole, args.repeats, device)
        for cp in [int(x) for x in args.cp.split(",")]:
            local = seq_len // cp

            def on_rank(rank):
                plan = halo_plan(args.heads, args.kv_heads, group_size, local, rank, cp)
                span = slice(rank * local, (rank + 1) * local)
                halo = None
                if plan.recv is not None:
                    before = slice(rank * local - group_size // 2, rank * local)
                    heads = slice(plan.recv.kv_start, plan.recv.kv_end)
                    halo = (k[before, :, heads].detach(), v[before, :, heads].detach())
                part = [x[span].detach().requires_grad_() for x in (q, k, v)]
                return part, halo

            for rank in range(cp):
                (qs, ks, vs), halo = on_rank(rank)
                with torch.no_grad():
                    got = s2_attention_on_slice(qs, ks, vs, group_size, rank * local, halo)
                err = (got.float() - reference[rank * local:(rank + 1) * local].float()).abs().max()
                assert err <= (2e-2 if dtype == torch.bfloat16 else 1e-5), (seq_len, cp, rank, err)
            (qs, ks, vs), halo = on_rank(1)

            def slice_step():
                out = s2_attention_on_slice(qs, ks, vs, group_size, local, halo)
                out.backward(torch.ones_like(out))

            slice_time = _fastest(slice_step, args.repeats, device)
            print(f"| {seq_len:,} | {cp} | {1e3 * whole_time / cp:.2f} | {1e3 * slice_time:.2f} "
                  f"| {slice_time / (whole_time / cp):.2f} |", flush=True)


if __name__ == "__main__":
    main()
