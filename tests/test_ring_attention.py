"""Ring attention on real gloo cp groups equals single-process causal SDPA on the whole sequence.

Every rank builds the same float64 q, k, v and upstream gradient, keeps its zigzag piece, and runs
ring attention forward and backward; the driver gathers the pieces with ``unshard_sequence`` and
compares them with ``F.scaled_dot_product_attention(..., is_causal=True)`` to 1e-10.
"""

import pytest
import torch
import torch.nn.functional as F
from plait.parallel.ring_attention import (
    _block_backward,
    _block_forward,
    _math_backward,
    _math_forward,
    ring_attention,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from plait.runtime import run_ranks

BATCH, HEADS, SEQ, DIM = 2, 4, 16, 8
CASES = [(kv_heads, causal) for kv_heads in (4, 2) for causal in (True, False)]  # MHA and GQA 4:2
TOL = 1e-10


def full_inputs(kv_heads: int):
    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(BATCH, HEADS, SEQ, DIM, generator=g, dtype=torch.float64)
    k, v = (torch.randn(BATCH, kv_heads, SEQ, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(BATCH, HEADS, SEQ, DIM, generator=g, dtype=torch.float64)


def reference(kv_heads: int, causal: bool):
    q, k, v, up = full_inputs(kv_heads)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), up))


def ring_rank(ctx):
    import torch.distributed as dist

    torch.set_num_threads(1)
    cp, rank = ctx.world_size, ctx.rank
    singles = [dist.new_group([r]) for r in range(cp)]  # every rank takes part in creating each group
    results, saved = {}, []
    for kv_heads, causal in CASES:
        q, k, v, up = (shard_sequence(t, rank, cp, dim=2) for t in full_inputs(kv_heads))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.nbytes) or t, lambda t: t):
            out = ring_attention(q, k, v, dist.group.WORLD, causal=causal)
        saved.append((sum(sizes), q.nbytes + k.nbytes + v.nbytes + out.nbytes + BATCH * HEADS * q.size(2) * 8))
        results[kv_heads, causal] = (out.detach(), *torch.autograd.grad(out, (q, k, v), up))
    # a cp group of one rank: plain attention over the whole (unsharded) sequence
    q, k, v, up = full_inputs(2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, singles[rank])
    results["single"] = (out.detach(), *torch.autograd.grad(out, (q, k, v), up))
    return results, saved


@pytest.fixture(scope="module", params=[2, 4], ids=lambda cp: f"cp{cp}")
def ring_run(request, ray_cluster, tmp_path_factory):
    cp = request.param
    return cp, run_ranks(ring_rank, cp, run_dir=tmp_path_factory.mktemp(f"ring_cp{cp}"))


@pytest.mark.parametrize("kv_heads,causal", CASES)
def test_ring_attention_output_and_grads_equal_full_attention(ring_run, kv_heads, causal):
    cp, per_rank = ring_run
    gathered = [unshard_sequence([res[kv_heads, causal][i] for res, _ in per_rank], cp, dim=2) for i in range(4)]
    for name, got, want in zip(("out", "dq", "dk", "dv"), gathered, reference(kv_heads, causal), strict=True):
        assert (got - want).abs().max().item() < TOL, f"{name} differs at cp={cp}"


def test_ring_attention_on_a_one_rank_group_is_plain_causal_attention(ring_run):
    _, per_rank = ring_run
    for res, _ in per_rank:
        for name, got, want in zip(("out", "dq", "dk", "dv"), res["single"], reference(2, True), strict=True):
            assert (got - want).abs().max().item() < TOL, name


def test_backward_saves_only_the_local_shard_never_other_ranks_kv(ring_run):
    """What lives from forward to backward is this rank's q, k, v, output and lse; the other ranks'
    K/V blocks pass through and are dropped (saving them would hold the whole sequence's K/V)."""
    cp, per_rank = ring_run
    full_kv_bytes = 2 * BATCH * 4 * SEQ * DIM * 8  # the whole sequence's K and V in the MHA case
    for _, saved in per_rank:
        for saved_bytes, local_bytes in saved:
            assert 0 < saved_bytes <= local_bytes
        if cp == 4:
            assert saved[0][0] < full_kv_bytes


def test_shard_and_unshard_round_trip_with_global_positions():
    x = torch.arange(2 * 16 * 3).view(2, 16, 3)
    for cp in (1, 2, 4):
        pieces = [shard_sequence(x, r, cp) for r in range(cp)]
        assert torch.equal(unshard_sequence(pieces, cp), x)
        for r in range(cp):
            assert torch.equal(x[:, shard_positions(16, r, cp)], pieces[r])
    assert shard_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert shard_positions(16, 3, 4).dtype == torch.long


def test_sequence_not_divisible_by_two_cp_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"sequence length 10 is not divisible by 2\*cp = 8"):
        shard_sequence(torch.zeros(1, 10), 0, 4)
    with pytest.raises(ValueError, match=r"sequence length 6 is not divisible by 2\*cp = 4"):
        shard_positions(6, 1, 2)
    with pytest.raises(ValueError, match="one piece per cp rank"):
        unshard_sequence([torch.zeros(1, 4)], 2)
    q, k = torch.zeros(1, 4, 4, 8), torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match="kv_heads 3 must divide heads 4"):
        ring_attention(q, k, k, None)


@pytest.mark.parametrize("causal", [True, False])
def test_block_math_fallback_matches_the_sdpa_kernels(causal):
    """The explicit block math (CUDA float64 and other devices) agrees with the fused kernels."""
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    out, lse = _block_forward(q, k, v, causal, 0.4)
    m_out, m_lse = _math_forward(q, k, v, causal, 0.4)
    assert torch.allclose(out, m_out, atol=TOL) and torch.allclose(lse, m_lse, atol=TOL)
    for got, want in zip(_math_backward(do, q, k, v, out, lse, causal, 0.4),
                         _block_backward(do, q, k, v, out, lse, causal, 0.4), strict=True):
        assert torch.allclose(got, want, atol=TOL)
