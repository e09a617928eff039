"""Tensor-by-tensor comparison of two HF checkpoint directories (verifies a round trip)."""

from megalong.convert.hf_checkpoint import HFCheckpointReader


def compare_hf_checkpoints(dir_a, dir_b):
    """Returns (rows, identical): rows of (name, shape, max abs diff) for every tensor in either."""
    rows, identical = [], True
    with HFCheckpointReader(dir_a) as a, HFCheckpointReader(dir_b) as b:
        for name in sorted(set(a.names()) | set(b.names())):
            if name not in a or name not in b:
                rows.append((name, "missing in " + (dir_b if name in a else dir_a), None))
                identical = False
                continue
            ta, tb = a.get(name), b.get(name)
            if ta.shape != tb.shape:
                rows.append((name, f"{tuple(ta.shape)} vs {tuple(tb.shape)}", None))
                identical = False
                continue
            diff = (ta.double() - tb.double()).abs().max().item() if ta.numel() else 0.0
            identical &= diff == 0.0 and ta.dtype == tb.dtype
            rows.append((name, tuple(ta.shape), diff))
    return rows, identical
