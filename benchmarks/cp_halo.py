"""Context-parallel traffic of S²-Attn's halo exchange against ring attention's (DESIGN.md §6).

    python benchmarks/cp_halo.py [--measure] [--sizes 32768,100000] [--cp 2,4,8]

Prints a markdown table for Llama-2-7B shapes (32 layers, 32 heads = 32 kv heads, d = 128,
bf16, one sequence per micro-batch, G = N/4):
- halo / ring per layer: forward bytes received by the busiest rank (`halo_bytes`,
  `ring_bytes` in megalong/attention/context_parallel.py);
- per sequence: all layers, forward + backward. The halo's backward returns as many bytes as
  its forward brought; ring attention's backward circulates K/V again together with the dK/dV
  accumulators, twice its forward (the scheme of Transformer Engine's and megatron's ring).
  Full activation recompute (LongLoRA trains with it) repeats each forward once more: the
  halo's total grows by half, the ring's by a third;
- time: bytes / link bandwidth, an ESTIMATE that ignores latency (the halo is 2 messages per
  layer and step), congestion and overlap with compute: NVLink 450 GB/s per direction (H100
  SXM), InfiniBand 400 Gb/s = 50 GB/s per direction.
--measure also runs the exchange itself (`exchange_halo`, forward and backward) on c gloo
ranks with those shapes and prints what HALO_COUNTER counted next to the formula.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalong.attention.context_parallel import halo_bytes, ring_bytes  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BYTES = 32, 32, 32, 128, 2  # Llama-2-7B, bf16
LINKS = {"NVLink": 450e9, "IB": 50e9}  # bytes per second per direction


def rows(sizes, cp_sizes):
    for seq_len in sizes:
        group_size = seq_len // 4
        for cp in cp_sizes:
            halo = halo_bytes(group_size, KV_HEADS // 2, HEAD_DIM, 1, BYTES)
            ring = ring_bytes(seq_len, cp, KV_HEADS, HEAD_DIM, 1, BYTES)
            yield {"N": seq_len, "c": cp, "L": seq_len // cp, "G": group_size,
                   "halo_layer": halo, "ring_layer": ring,
                   "halo_seq": 2 * halo * LAYERS, "ring_seq": 3 * ring * LAYERS}


def _mib(x):
    return f"{x / 2**20:,.0f}"


def _ms(x, bandwidth):
    return f"{1e3 * x / bandwidth:,.2f}"


def markdown(table, measured=None):
    head = ("| N | c | L | halo fwd/layer (MiB) | ring fwd/layer (MiB) | ratio = Gc/(4N(c-1)) "
            "| halo/seq fwd+bwd (MiB) | ring/seq fwd+bwd (MiB) "
            + "".join(f"| est. halo ms, {n} | est. ring ms, {n} " for n in LINKS) + "|")
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for row in table:
        ratio = row["halo_layer"] / row["ring_layer"]
        cells = [f"{row['N']:,}", str(row["c"]), f"{row['L']:,}", _mib(row["halo_layer"]),
                 _mib(row["ring_layer"]), f"{ratio:.4f} (1/{1 / ratio:g})",
                 _mib(row["halo_seq"]), _mib(row["ring_seq"])]
        for bandwidth in LINKS.values():
            cells += [_ms(row["halo_seq"], bandwidth), _ms(row["ring_seq"], bandwidth)]
        lines.append("| " + " | ".join(cells) + " |")
    if measured:
        lines += ["", "Measured by HALO_COUNTER (one layer's exchange, forward + backward, gloo):", "",
                  "| N | c | most received fwd (bytes) | formula (bytes) | most received bwd (bytes) |",
                  "|---:|---:|---:|---:|---:|"]
        for (seq_len, cp), (fwd, bwd, formula) in measured.items():
            lines.append(f"| {seq_len:,} | {cp} | {fwd:,} | {formula:,} | {bwd:,} |")
    return "\n".join(lines)


def _exchange_on_rank(seq_len, cp):
    """One layer's halo exchange with 7B shapes on this gloo rank; the counter's bytes."""
    import torch
    import torch.distributed as dist

    from megalong.attention.context_parallel import (HALO_COUNTER, HaloLink, exchange_halo,
                                                     halo_plan)

    dist.init_process_group("gloo")
    rank, group_size, local_len = dist.get_rank(), seq_len // 4, seq_len // cp
    plan = halo_plan(HEADS, KV_HEADS, group_size, local_len, rank, cp)
    link = HaloLink(plan, dist.group.WORLD, rank - 1 if rank else None,
                    rank + 1 if rank < cp - 1 else None, layer=1)
    k, v = (torch.randn(local_len, 1, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    k_out, v_out, halo = exchange_halo(k, v, link)
    loss = k_out.float().sum() + v_out.float().sum()
    if halo is not None:
        loss = loss + halo[0].float().sum() + halo[1].float().sum()
    loss.backward()
    return HALO_COUNTER.per_layer()


def measure(sizes, cp_sizes):
    from megalong.spawn import run_on_ranks

    out = {}
    for seq_len in sizes:
        for cp in cp_sizes:
            counts = run_on_ranks(_exchange_on_rank, cp, seq_len, cp, timeout_s=300)
            formula = halo_bytes(seq_len // 4, KV_HEADS // 2, HEAD_DIM, 1, BYTES)
            out[(seq_len, cp)] = (max(c["forward"] for c in counts),
                                  max(c["backward"] for c in counts), formula)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32768,100000")
    parser.add_argument("--cp", default="2,4,8")
    parser.add_argument("--measure", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    cp_sizes = [int(x) for x in args.cp.split(",")]
    print(markdown(list(rows(sizes, cp_sizes)),
                   measure(sizes, cp_sizes) if args.measure else None))


if __name__ == "__main__":
    main()
