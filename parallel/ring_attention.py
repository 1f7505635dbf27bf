"""Ring attention: exact causal attention over a sequence sharded across a context-parallel (cp) group.

    q_local = shard_sequence(q, cp_rank, cp, dim=2)          # every rank: its head + tail piece
    out_local = ring_attention(q_local, k_local, v_local, mesh["cp"].get_group())
    out = unshard_sequence([out_0, ..., out_{cp-1}], cp, dim=2)   # == causal SDPA on the full sequence

Layout ("zigzag", load-balanced as in Ring-Attention / Llama 3 CP): the sequence is cut into 2*cp
equal chunks and cp rank r holds chunk r (its head) followed by chunk 2*cp-1-r (its tail). With cp=2
and 8 tokens, rank 0 holds positions [0 1 6 7] and rank 1 holds [2 3 4 5]; ``shard_positions`` gives
these numbers for RoPE. Local positions increase, so a rank's own block is plain causal attention.

Visibility: keys/values travel the ring (rank r sends to r+1, receives from r-1), so at step i rank r
holds the block of rank s = r - i. Per (query chunk, key chunk) pair a block is fully visible (key
chunk earlier), causal-diagonal (same chunk) or invisible (later: skipped, never computed):
  s == r   head x head diagonal, tail x head full, tail x tail diagonal -> causal on the local block
  s <  r   key head (chunk s) precedes both query chunks, key tail follows both -> all queries x key head
  s >  r   query head (chunk r) precedes both key chunks, query tail follows both -> query tail x all keys
Every step costs half a local square of scores: the work is the same on every rank.

Merge (online softmax): each block returns its normalised output o_b and per-row log-sum-exp lse_b of
its scores; the running pair merges as lse' = logaddexp(lse, lse_b), out' = out * exp(lse - lse') +
o_b * exp(lse_b - lse'). The accumulator is float32 for half dtypes.

Backward (flash-attention style): k, v travel the ring again, each visible block's probabilities are
recomputed from the saved global lse, P = exp(S - lse): dV += P^T dO, dP = dO V^T, D = rowsum(dO * O),
dS = P * (dP - D), dQ += scale dS K, dK += scale dS^T Q. The dK/dV accumulator of each block travels
with it and arrives back at its owner after a full turn. Only local tensors are saved for backward; a
rank holds its own K/V, the block it computes on and the block in flight, never the whole sequence.
Blocks run SDPA's kernels with explicit lse: the CPU flash kernel (any float dtype), on CUDA the flash
kernel (fp16/bf16) or the memory-efficient one (fp32), else explicit block-sized math.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

aten = torch.ops.aten


def _check_len(seq_len: int, cp: int) -> None:
    if cp < 1 or seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*cp = {2 * cp}: context parallelism cuts "
                         f"it into 2*cp equal chunks (rank r holds chunks r and 2*cp-1-r); pad or trim the "
                         f"sequence to a multiple of {2 * cp}")


def shard_sequence(x: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This cp rank's piece of ``x`` along ``dim``: chunk cp_rank followed by chunk 2*cp-1-cp_rank."""
    _check_len(x.size(dim), cp)
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank {cp_rank} is outside 0..{cp - 1} for cp={cp}")
    chunks = x.chunk(2 * cp, dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim)


def unshard_sequence(pieces: list[torch.Tensor], cp: int, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's ``shard_sequence`` piece, given in rank order."""
    if len(pieces) != cp:
        raise ValueError(f"unshard_sequence needs one piece per cp rank ({cp}), got {len(pieces)}")
    halves = [p.chunk(2, dim) for p in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def shard_positions(seq_len: int, cp_rank: int, cp: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (LongTensor) of this cp rank's local tokens, e.g. for RoPE."""
    return shard_sequence(torch.arange(seq_len, device=device), cp_rank, cp, dim=0)


def _visible(rank: int, src: int, half: int, causal: bool) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal diagonal) that ``rank``'s queries attend to in ``src``'s K/V block."""
    if src == rank or not causal:
        return slice(None), slice(None), causal
    if src < rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


def _math_forward(q, k, v, causal, scale, allowed=None):
    """``allowed``: an explicit (n, kv) mask of visible keys (a sliding window), instead of ``causal``. A row that
    sees no key of this block gets output 0 and lse -inf (it adds nothing when merged)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if causal and allowed is None:  # a block-sized mask, never one for the whole sequence
        allowed = ~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # fully masked rows: exp(-inf - -inf)
    return (p @ v.to(acc)).to(q.dtype), lse


def _math_backward(do, q, k, v, out, lse, causal, scale, allowed=None):
    acc = lse.dtype
    q, k, v, do, out = (t.to(acc) for t in (q, k, v, do, out))
    p = torch.exp((q @ k.transpose(-1, -2)) * scale - lse.unsqueeze(-1))
    if causal and allowed is None:
        allowed = ~torch.ones(p.shape[-2:], dtype=torch.bool, device=p.device).triu(1)
    if allowed is not None:
        p = p.masked_fill(~allowed, 0.0)
    ds = p * (do @ v.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do


def _cuda_kernel(q: torch.Tensor) -> str:
    if q.device.type != "cuda":
        return "math"
    if q.dtype in (torch.float16, torch.bfloat16) and q.size(-1) % 8 == 0 and q.size(-1) <= 256:
        return "flash"
    return "efficient" if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else "math"


def _block_forward(q, k, v, causal, scale):
    """One block's (output, lse); lse in float32, or float64 for float64 inputs."""
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    kind = _cuda_kernel(q)
    if kind == "flash":
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)[:2]
    if kind == "efficient":  # its lse is padded to a multiple of 32 rows
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return out, lse[..., : q.size(2)]
    return _math_forward(q, k, v, causal, scale)


def _block_backward(do, q, k, v, out, lse, causal, scale):
    """(dq, dk, dv) of one block, given the global output and lse of these query rows."""
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, scale=scale)
    kind, no_rng = _cuda_kernel(q), torch.empty(0, dtype=torch.int64, device=q.device)
    if kind == "flash":
        return aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, None, None, q.size(2), k.size(2), 0.0, causal, no_rng, no_rng, scale=scale)
    if kind == "efficient":
        lse = torch.nn.functional.pad(lse, (0, -lse.size(-1) % 32))
        return aten._scaled_dot_product_efficient_attention_backward(
            do, q, k, v, None, out, lse, no_rng, no_rng, 0.0, (True, True, True, False), causal, scale=scale)[:3]
    return _math_backward(do, q, k, v, out, lse, causal, scale)


def _ring_pass(tensors, group, first_tag: int):
    """Post sends of ``tensors`` to the next cp rank and receives of the previous rank's into new buffers."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    sends = [t.contiguous() for t in tensors]
    bufs = [torch.empty_like(t) for t in sends]
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=(rank + 1) % cp, tag=first_tag + i)
           for i, t in enumerate(sends)]
    ops += [dist.P2POp(dist.irecv, b, group=group, group_peer=(rank - 1) % cp, tag=first_tag + i)
            for i, b in enumerate(bufs)]
    return bufs, sends, dist.batch_isend_irecv(ops)


def _arrived(pending):
    bufs, _sends, works = pending
    for w in works:
        w.wait()
    return bufs


def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _reduce(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.unflatten(1, (-1, groups)).sum(2)


def _ring(group) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


def _window_mask(rank: int, src: int, n: int, cp: int, window: int, device) -> torch.Tensor:
    """(n, n) keys of ``src``'s block that ``rank``'s queries see: earlier or equal positions, less than ``window``
    back (global zigzag positions)."""
    q_pos = shard_positions(n * cp, rank, cp, device)[:, None]
    k_pos = shard_positions(n * cp, src, cp, device)[None, :]
    return (k_pos <= q_pos) & (q_pos - k_pos < window)


def _block(rank: int, src: int, n: int, cp: int, causal: bool, window: int | None, device):
    """(query rows, key cols, causal diagonal, explicit mask or None), or None when nothing is visible."""
    if window is None:
        return (*_visible(rank, src, n // 2, causal), None)
    allowed = _window_mask(rank, src, n, cp, window, device)
    if not bool(allowed.any()):
        return None
    return slice(None), slice(None), False, allowed


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, window=None):
        rank, cp = _ring(group)
        groups, acc = q.size(1) // k.size(1), torch.promote_types(q.dtype, torch.float32)
        out = lse = None
        kv = (k, v)
        for step in range(cp):
            pending = _ring_pass(kv, group, 0) if step < cp - 1 else None  # overlaps with this block's compute
            block = _block(rank, (rank - step) % cp, q.size(2), cp, causal, window, q.device)
            if block is None:  # a sliding window that reaches no key of this block
                if pending is not None:
                    kv = tuple(_arrived(pending))
                continue
            rows, cols, diag, allowed = block
            qb, kb, vb = q[:, :, rows], _expand(kv[0][:, :, cols], groups), _expand(kv[1][:, :, cols], groups)
            o, l_b = (_block_forward(qb, kb, vb, diag, scale) if allowed is None
                      else _math_forward(qb, kb, vb, False, scale, allowed))
            if out is None:  # step 0 (own block) covers every query row
                out, lse = o.to(acc), l_b.to(acc)
            else:
                new = torch.logaddexp(lse[..., rows], l_b)
                out[:, :, rows] = (out[:, :, rows] * torch.exp(lse[..., rows] - new).unsqueeze(-1)
                                   + o.to(acc) * torch.exp(l_b - new).unsqueeze(-1))
                lse[..., rows] = new
            if pending is not None:
                kv = tuple(_arrived(pending))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.window = group, causal, scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale, window = ctx.group, ctx.causal, ctx.scale, ctx.window
        rank, cp = _ring(group)
        groups, acc = q.size(1) // k.size(1), lse.dtype
        dq = torch.zeros_like(q, dtype=acc)
        kv, grads_pending, dkv = (k, v), None, None
        for step in range(cp):
            pending = _ring_pass(kv, group, 0) if step < cp - 1 else None
            # this block's dK/dV accumulator: fresh at step 0, else what the previous rank sent on
            dkv = (torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)) if step == 0 else \
                _arrived(grads_pending)
            block = _block(rank, (rank - step) % cp, q.size(2), cp, causal, window, q.device)
            if block is not None:
                rows, cols, diag, allowed = block
                args = (dout[:, :, rows], q[:, :, rows], _expand(kv[0][:, :, cols], groups),
                        _expand(kv[1][:, :, cols], groups), out[:, :, rows], lse[..., rows])
                dq_b, dk_b, dv_b = (_block_backward(*args, diag, scale) if allowed is None
                                    else _math_backward(*args, False, scale, allowed))
                dq[:, :, rows] += dq_b
                dkv[0][:, :, cols] += _reduce(dk_b, groups)
                dkv[1][:, :, cols] += _reduce(dv_b, groups)
            if cp > 1:  # on to the next rank; after the last step it reaches the block's owner
                grads_pending = _ring_pass(dkv, group, 2)
            if pending is not None:
                kv = tuple(_arrived(pending))
        dk, dv = _arrived(grads_pending) if cp > 1 else dkv
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup | None, *,
                   causal: bool = True, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of the local queries over the whole sharded sequence, in the zigzag layout. ``window``: a
    sliding window (a query sees the keys less than ``window`` positions back, itself included; causal), computed
    block by block with an explicit mask from the global positions, blocks the window cannot reach skipped.

    q: (batch, heads, local_seq, head_dim); k, v: (batch, kv_heads, local_seq, head_dim) with kv_heads
    dividing heads (GQA). ``cp_group``: the context-parallel process group (None: a single cp rank).
    Returns (batch, heads, local_seq, head_dim), equal to full attention restricted to the local rows.
    """
    same = q.dim() == k.dim() == 4 and k.shape == v.shape and q.shape[:1] + q.shape[2:] == k.shape[:1] + k.shape[2:]
    if not same:
        raise ValueError(f"ring_attention wants q (batch, heads, seq, dim) and k, v (batch, kv_heads, seq, dim) "
                         f"with the same batch, seq and dim; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.size(1) % k.size(1):
        raise ValueError(f"kv_heads {k.size(1)} must divide heads {q.size(1)} (grouped-query attention)")
    if q.size(2) % 2:
        raise ValueError(f"local sequence length {q.size(2)} is odd: each cp rank holds two equal chunks "
                         f"(see shard_sequence); make the global length a multiple of 2*cp")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if window is not None and not causal:
        raise ValueError("ring_attention(window=...) is a causal sliding window: pass causal=True")
    return _RingAttention.apply(q, k, v, cp_group, causal, scale, window)
