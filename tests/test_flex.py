"""The FlexAttention S²-Attn kernel (megalong/attention/flex.py) against the mask formulas of
DESIGN.md §5: its mask_mod, its BlockMask (coverage, full tiles, O((N/block)^2) memory) and
eager CPU forward in float64. CPU flex has no backward in torch 2.13 (forward only here)."""

import warnings

import pytest
import torch

flex = pytest.importorskip("megalong.attention.flex")
if flex.flex_attention is None:
    pytest.skip("torch.nn.attention.flex_attention needs torch >= 2.5", allow_module_level=True)

from test_attention import masked_attention, random_qkv, reference_s2, s2_mask  # noqa: E402

from megalong.attention.flex import FlexKernel, s2_block_mask, s2_mask_mod  # noqa: E402
from megalong.config.model import GroupSizeError  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    # Eager flex warns once that it is unfused; expected on CPU.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


# ------------------------------------------------------------------------------------ mask_mod


@pytest.mark.parametrize("seq_len,group_size", [(16, 4), (24, 8), (16, 16), (12, 2)])
@pytest.mark.parametrize("head_offset,first_shifted", [(0, 2), (3, 4), (1, 0), (0, 9)])
def test_mask_mod_matches_formula(seq_len, group_size, head_offset, first_shifted):
    mask_mod = s2_mask_mod(group_size, first_shifted, head_offset)
    q_idx = torch.arange(seq_len, dtype=torch.int32)[:, None]
    kv_idx = torch.arange(seq_len, dtype=torch.int32)[None, :]
    heads = 4
    # create_mask evaluates the mask_mod as flex does (vmap over b, h, q, kv).
    vmapped = torch.nn.attention.flex_attention.create_mask(mask_mod, 1, heads, seq_len, seq_len,
                                                            device="cpu")
    for h in range(heads):
        want = s2_mask(seq_len, group_size, head_offset + h >= first_shifted)
        got = mask_mod(torch.tensor(0), torch.tensor(h, dtype=torch.int32), q_idx, kv_idx)
        assert got.dtype == torch.bool and torch.equal(got, want), f"head {h}"
        assert torch.equal(vmapped[0, h], want), f"head {h} (vmapped)"


# ----------------------------------------------------------------------------------- BlockMask


def _tiles(dense, block):
    """[N, N] bool -> (any, all) [nb, nb] over block x block tiles."""
    nb = dense.shape[0] // block
    t = dense.view(nb, block, nb, block)
    return t.any(3).any(1), t.all(3).all(1)


def _listed(num_blocks, indices, nb):
    """(kv_num_blocks [..., nb], kv_indices [..., nb, nb]) -> how often each tile is listed."""
    valid = torch.arange(indices.shape[-1]) < num_blocks[..., None]
    return torch.zeros(*indices.shape[:-1], nb, dtype=torch.int32).scatter_add_(
        -1, indices.long(), valid.to(torch.int32))


@pytest.mark.parametrize("seq_len,group_size,block", [
    (64, 16, 16),   # G a multiple of the block
    (96, 24, 16),   # G not a multiple, G/2 = 12 < block: boundaries cut tiles
    (48, 12, 16),   # G/2 < block, G < block
    (64, 4, 16),    # several groups per tile
    (32, 32, 16),   # G = N
    (64, 64, 128),  # block larger than N: block = N
])
def test_block_mask_covers_allowed_pairs_and_full_tiles_are_full(seq_len, group_size, block):
    heads, head_offset, first_shifted = 5, 1, 3   # local heads 0, 1 unshifted; 2, 3, 4 shifted
    mask = s2_block_mask(seq_len, group_size, num_heads=heads, head_offset=head_offset,
                         first_shifted_head=first_shifted, block_size=block)
    block = min(block, seq_len)
    nb = seq_len // block
    assert mask.shape == (1, heads, seq_len, seq_len) and mask.BLOCK_SIZE == (block, block)
    partial = _listed(mask.kv_num_blocks, mask.kv_indices, nb)
    full = _listed(mask.full_kv_num_blocks, mask.full_kv_indices, nb)
    # A tile listed twice (or as both partial and full) would be summed twice by flex.
    assert (partial + full).max() <= 1
    listed = (partial + full).bool()
    assert torch.equal(listed, mask.to_dense().bool())
    full = full.bool()
    for h in range(heads):
        allowed = s2_mask(seq_len, group_size, head_offset + h >= first_shifted)
        any_pair, all_pairs = _tiles(allowed, block)
        assert not (any_pair & ~listed[0, h]).any(), f"head {h}: a tile with allowed pairs dropped"
        assert not (full[0, h] & ~all_pairs).any(), f"head {h}: a full tile has masked pairs"
        # The construction is exact, not merely conservative.
        assert torch.equal(listed[0, h], any_pair) and torch.equal(full[0, h], all_pairs)
        # Inside listed tiles the mask_mod decides: together they give exactly the formula.
        tile_ok = listed[0, h].repeat_interleave(block, 0).repeat_interleave(block, 1)
        q_idx, kv_idx = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
        assert torch.equal(tile_ok & mask.mask_mod(0, torch.tensor(h), q_idx, kv_idx), allowed)


def test_block_mask_memory_is_per_tile_not_per_token():
    seq_len, block, heads = 4096, 128, 8
    mask = s2_block_mask(seq_len, 1024, num_heads=heads, head_offset=0, first_shifted_head=4,
                         block_size=block)
    nb = seq_len // block
    tensors = [x for x in vars(mask).values() if isinstance(x, torch.Tensor)]
    # kv/q (num_blocks, indices) for partial and full tiles: 4 index tensors of H * nb^2.
    assert sum(x.numel() for x in tensors) <= 4 * heads * nb * nb + 4 * heads * nb
    assert all(x.numel() < seq_len * seq_len // 64 for x in tensors)
    closure = [c.cell_contents for c in mask.mask_mod.__closure__]
    assert all(x.numel() == 1 for x in closure if isinstance(x, torch.Tensor))
    # N = 2^17: an N x N intermediate (17 G elements) could not be built here at all.
    big = s2_block_mask(1 << 17, 8192, num_heads=2, head_offset=0, first_shifted_head=1)
    assert big.kv_indices.shape == (1, 2, 1024, 1024)


def test_block_mask_is_cached():
    kwargs = dict(num_heads=4, head_offset=2, first_shifted_head=4, block_size=16)
    first = s2_block_mask(64, 16, **kwargs)
    assert s2_block_mask(64, 16, **kwargs) is first
    assert s2_block_mask(64, 32, **kwargs) is not first
    assert s2_block_mask(64, 16, **{**kwargs, "head_offset": 0}) is not first


def test_block_mask_rejects_bad_lengths():
    with pytest.raises(ValueError, match="block size 16"):
        s2_block_mask(40, 8, num_heads=2, head_offset=0, first_shifted_head=1, block_size=16)
    with pytest.raises(GroupSizeError):
        s2_block_mask(64, 6, num_heads=2, head_offset=0, first_shifted_head=1, block_size=16)


# ------------------------------------------------------------------------ eager forward (CPU)


@pytest.mark.parametrize("seq_len,group_size,heads,kv_heads,batch", [
    (32, 8, 4, 4, 1),    # MHA
    (32, 8, 8, 2, 1),    # GQA, kv groups split evenly between the halves
    (48, 12, 6, 3, 2),   # kv group 1 straddles nh/2 = 3; G/2 < block; batch 2
    (32, 32, 4, 1, 2),   # G = N, MQA
])
def test_forward_matches_mask_formula(seq_len, group_size, heads, kv_heads, batch):
    q, k, v = random_qkv(seq_len, batch, heads, kv_heads)
    out = FlexKernel().attend_whole(q, k, v, group_size, block_size=16)
    ref = reference_s2(q, k, v, group_size)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-10
    short = FlexKernel().attend_whole(q, k, v, group_size, block_size=16, shift=False)
    assert (short - reference_s2(q, k, v, group_size, "short")).abs().max() <= 1e-10


def test_forward_float32_and_scale():
    q, k, v = random_qkv(32, 1, 8, 2, dtype=torch.float32)   # the GQA case's shapes
    out = FlexKernel().attend_whole(q, k, v, 8, scale=0.5, block_size=16)
    # scale 0.5 is the default-scale reference on q * 0.5 * sqrt(d)
    ref = reference_s2(q.double() * 0.5 * 8 ** 0.5, k.double(), v.double(), 8)
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("heads,kv_heads,tp", [(6, 3, 3), (8, 2, 2)])
def test_tensor_parallel_shard_is_slice_of_full(heads, kv_heads, tp):
    q, k, v = random_qkv(32, 2, heads, kv_heads)
    full = reference_s2(q, k, v, 8)
    np_local, ng_local = heads // tp, kv_heads // tp
    for rank in range(tp):
        qs = slice(rank * np_local, (rank + 1) * np_local)
        ks = slice(rank * ng_local, (rank + 1) * ng_local)
        part = FlexKernel().attend_whole(q[:, :, qs], k[:, :, ks], v[:, :, ks], 8,
                                         kv_group_offset=rank * ng_local,
                                         num_kv_groups=kv_heads, block_size=16)
        assert (part - full[:, :, qs]).abs().max() <= 1e-10, f"rank {rank}"


def test_fewer_kv_groups_than_tp_ranks():
    q, k, v = random_qkv(32, 1, 8, 1)
    full = reference_s2(q, k, v, 8)
    for rank in range(2):
        part = FlexKernel().attend_whole(q[:, :, 4 * rank:4 * rank + 4], k, v, 8,
                                         kv_group_offset=rank, num_kv_groups=2, block_size=16)
        assert (part - full[:, :, 4 * rank:4 * rank + 4]).abs().max() <= 1e-10


def test_cpu_backward_is_refused_clearly():
    q, k, v = (x.requires_grad_() for x in random_qkv(32, 1, 4, 1))
    with pytest.raises(NotImplementedError, match="sdpa"):
        FlexKernel().attend_whole(q, k, v, 8, block_size=16)
    with torch.no_grad():  # forward under no_grad is fine
        out = FlexKernel().attend_whole(q, k, v, 8, block_size=16)
    assert (out - reference_s2(q.detach(), k.detach(), v.detach(), 8)).abs().max() <= 1e-10


def test_compiled_flex_does_not_recompile_for_new_group_or_head_split():
    """What FlexKernel relies on under torch.compile(dynamic=False) on CUDA, checked with a
    counting backend on CPU: the mask parameters are captured tensors, so a new G or head
    split reuses the compiled graph; a new N (new shapes) compiles once more."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(flex.flex_attention, backend=counter, dynamic=False)
    q, k, v = (x.permute(1, 2, 0, 3) for x in random_qkv(32, 1, 4, 2))
    for group_size, first_shifted in [(8, 2), (16, 2), (4, 0), (8, 4)]:
        mask = s2_block_mask(32, group_size, num_heads=4, head_offset=0,
                             first_shifted_head=first_shifted, block_size=16)
        out = compiled(q, k, v, block_mask=mask, enable_gqa=True)
        heads = [s2_mask(32, group_size, h >= first_shifted) for h in range(4)]
        ref = masked_attention(*(x.permute(2, 0, 1, 3) for x in (q, k, v)), heads, 2)
        assert (out.permute(2, 0, 1, 3) - ref).abs().max() <= 1e-10
    assert counter.frame_count == 1
    q, k, v = (x.permute(1, 2, 0, 3) for x in random_qkv(64, 1, 4, 2))
    compiled(q, k, v, enable_gqa=True, block_mask=s2_block_mask(
        64, 8, num_heads=4, head_offset=0, first_shifted_head=2, block_size=16))
    assert counter.frame_count == 2
