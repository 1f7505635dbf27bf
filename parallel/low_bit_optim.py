"""AdamW whose two moments are stored in fp32, bf16 or 8 bits (``train.optim.states``).

    opt = LowBitAdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, states="8bit")
    state_bytes(opt) / sum(p.numel() for p in params)      # ~2.0 bytes per parameter with "8bit"

``8bit`` is the block-wise dynamic quantization of "8-bit Optimizers via Block-wise Quantization" (Dettmers et
al., ICLR 2022): each moment is stored as one byte per element, an index into a 256-entry *dynamic* code (a sign
for the first moment, then an exponent run of zeros and a linear fraction, so values from 1e-7 to 1 of a block's
largest magnitude keep about 2 significant digits; the second moment, never negative, uses the unsigned code and
so gets one more bit of fraction), plus one fp32 absolute maximum per block. Each step dequantizes a tensor's
moments, does the ordinary AdamW update in fp32 and quantizes them again (rounding to the nearest code, found
through a table of float bit patterns: ``Code``).

Blocks. The paper's blocks are 2048 consecutive elements. Here a block is 2048 consecutive elements of one row
(the tensor's last dimension; the whole row when it is shorter), aligned to the global row, and the scales are a
tensor of shape ``shape[:-1] + (blocks_per_row,)``. Blocks then never depend on how the parameter is sharded:
FSDP2 shards dim 0 of the codes and the scales at the same rows; where tensor parallelism shards the last
dimension (row-wise linears), each rank quantizes its piece of a row with the block's absmax all-reduced (MAX,
one small tensor per such parameter and moment) over the ranks holding the rest of the row, and the scales are
replicated there. So the state equals the unsharded optimizer's, and a checkpoint saved under one dp or tp
degree resumes under another bit-exactly (DCP reshards codes like the parameter, scales by rows). With rows
shorter than 2048 (small models) a block is one row and the scale overhead is 8 bytes per row: 2 + 8/row_length
bytes per parameter.

Tensors with fewer than ``MIN_8BIT_SIZE`` elements or one dimension (norm scales, biases) keep fp32 moments,
as bitsandbytes does: they are a tiny share of a model, and quantizing a 1-D tensor would tie its blocks to the
shard boundaries. ``bf16`` stores both moments in bfloat16 (4 bytes per parameter; no scales).

Checkpoints: the state is plain optimizer state (``state.<fqn>.exp_avg_q`` etc., DTensors under FSDP2/TP), so
DCP saves and reshards it. torch's ``Optimizer.load_state_dict`` casts every floating state to the parameter's
dtype, so a load hook casts codes and bf16 moments back to what they were (exact: integers below 256 and bf16
values are all representable in fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

STATES = ("fp32", "bf16", "8bit")
BLOCK = 2048
MIN_8BIT_SIZE = 4096


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted values of the dynamic (tree) quantization code, in [-1, 1] (signed) or [0, 1].

    Value = 10^-e x f: e in 0..6 is how many leading zero bits follow the sign (the exponent), the remaining bits
    a linear fraction f in (0.1, 1]. Each exponent level ``i`` holds 2^i fraction steps (one more bit of fraction
    per level, as bits freed from the exponent run become fraction bits); unsigned codes double each level.
    Zero and 1.0 are included, as in the paper."""
    values: list[float] = []
    levels = 7
    for i in range(levels):
        n = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, n + 1)
        means = ((edges[:-1] + edges[1:]) / 2).tolist()
        scale = 10.0 ** (-(levels - 1) + i)
        values += [scale * m for m in means]
        if signed:
            values += [-scale * m for m in means]
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))  # unused codes (duplicates of zero) pad to 256
    code = torch.tensor(sorted(values), dtype=torch.float32)
    if code.numel() != 256:  # pragma: no cover - the construction above is fixed
        raise AssertionError(f"dynamic code has {code.numel()} values")
    return code


@dataclass(frozen=True)
class Code:
    """A dynamic code with a lookup that finds each value's nearest code in a few elementwise operations.

    ``table`` maps the top 20 bits of a float32 (sign, exponent and 11 bits of mantissa) to the number of
    midpoints between neighbouring codes below the smallest-valued float with those bits; no such interval of
    floats holds more than one midpoint (checked when the table is built), so one comparison with that midpoint
    finishes the count. The result is exactly ``torch.bucketize(x, midpoints)``, the nearest code, about 3x faster
    on CPU than its binary search."""

    values: torch.Tensor  # (256,) sorted
    mids: torch.Tensor  # (256,): midpoints between neighbours, then +inf
    table: torch.Tensor  # (2**20,) uint8

    @staticmethod
    def make(signed: bool, device: torch.device | str = "cpu") -> Code:
        values = dynamic_code(signed)
        mids = (values[1:] + values[:-1]) / 2
        keys = torch.arange(1 << 20, dtype=torch.int32)
        ends = torch.stack([(keys << 12).view(torch.float32), ((keys << 12) | 0xFFF).view(torch.float32)])
        low, high = ends.amin(0), ends.amax(0)
        below, below_high = torch.bucketize(low, mids), torch.bucketize(high, mids)
        finite = torch.isfinite(low) & torch.isfinite(high)
        if int((below_high - below)[finite].max()) > 1:  # pragma: no cover - a property of the code above
            raise AssertionError("a 20-bit float interval holds two code midpoints")
        mids = torch.cat([mids, torch.tensor([math.inf])])
        return Code(values.to(device), mids.to(device), below.to(torch.uint8).to(device))

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 index of the nearest code to each element of float32 ``x`` (values in [-1, 1])."""
        x = x.to(torch.float32).contiguous()
        keys = ((x.view(torch.int32) >> 12) & 0xFFFFF).reshape(-1)
        below = self.table.index_select(0, keys)  # index_select: several times faster than x[idx] on CPU
        above = x.reshape(-1) > self.mids.index_select(0, below.int())
        return (below + above.to(torch.uint8)).reshape(x.shape)

    def lookup(self, q: torch.Tensor) -> torch.Tensor:
        """The code values of uint8 indices ``q`` (float32, q's shape)."""
        return self.values.index_select(0, q.reshape(-1).int()).reshape(q.shape)


def block_len(cols: int, block: int = BLOCK) -> int:
    """The block length for rows of ``cols`` elements: ``block``, or the whole row when it is shorter."""
    return max(1, min(block, cols))


@dataclass(frozen=True)
class RowPiece:
    """Where a (local) tensor's rows sit in the global rows: columns ``[offset, offset + cols)`` of rows of
    ``total`` columns, cut in blocks of ``blen``; ``group``: the process groups its last dimension is split over
    (their ranks hold the rest of each row, so a block's absmax is a MAX all-reduce over them)."""
    offset: int
    cols: int
    total: int
    blen: int
    groups: tuple = ()

    @property
    def blocks(self) -> int:  # blocks per global row
        return -(-self.total // self.blen)

    @property
    def span(self) -> tuple[int, int, int, int]:  # first block, block count, front and back padding
        if self.cols == 0:
            return 0, 0, 0, 0
        j0, j1 = self.offset // self.blen, (self.offset + self.cols - 1) // self.blen
        front = self.offset - j0 * self.blen
        n = j1 - j0 + 1
        return j0, n, front, n * self.blen - front - self.cols


def whole_rows(x: torch.Tensor, block: int = BLOCK) -> RowPiece:
    return RowPiece(0, x.shape[-1], x.shape[-1], block_len(x.shape[-1], block))


def _blocked(x: torch.Tensor, piece: RowPiece) -> torch.Tensor:
    """(..., cols) -> (rows, n, blen): the local columns in their global blocks, zero-padded at both ends."""
    _, n, front, back = piece.span
    rows = x.reshape(-1, piece.cols)
    if front or back:
        rows = torch.nn.functional.pad(rows, (front, back))
    return rows.reshape(rows.shape[0], n, piece.blen)


def _unblocked(b: torch.Tensor, piece: RowPiece, shape: torch.Size) -> torch.Tensor:
    _, n, front, _ = piece.span
    return b.reshape(b.shape[0], n * piece.blen)[:, front:front + piece.cols].reshape(shape)


def quantize(x: torch.Tensor, code: Code, piece: RowPiece | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., cols) float -> (codes uint8 (..., cols), scales fp32 (..., blocks)): the nearest code of x / absmax.

    ``piece`` places x's columns in global rows (default: x holds whole rows); with ``piece.groups`` the scales
    are all-reduced (MAX) over them, so every rank quantizes with the absmax of the whole block."""
    piece = piece or whole_rows(x)
    j0, n, _, _ = piece.span
    blocks = _blocked(x, piece)
    scales = torch.zeros(blocks.shape[0], piece.blocks, device=x.device)
    scales[:, j0:j0 + n] = blocks.abs().amax(dim=-1)
    for group in piece.groups:
        dist.all_reduce(scales, op=dist.ReduceOp.MAX, group=group)
    mine = scales[:, j0:j0 + n, None]
    normed = blocks / mine.clamp_min(torch.finfo(torch.float32).tiny)
    q = code.nearest(normed)
    return _unblocked(q, piece, x.shape), scales.reshape(*x.shape[:-1], piece.blocks)


def dequantize(q: torch.Tensor, scales: torch.Tensor, code: Code,
               piece: RowPiece | None = None) -> torch.Tensor:
    piece = piece or whole_rows(q)
    j0, n, _, _ = piece.span
    values = _blocked(code.lookup(q), piece)
    values = values * scales.reshape(-1, piece.blocks)[:, j0:j0 + n, None]
    return _unblocked(values, piece, q.shape)


def quantized_shape(shape: tuple[int, ...] | torch.Size, states: str) -> bool:
    """Whether a parameter of (global) ``shape`` gets 8-bit moments: 2-D or more and MIN_8BIT_SIZE elements."""
    return states == "8bit" and len(shape) >= 2 and math.prod(shape) >= MIN_8BIT_SIZE


def quantized(p: torch.Tensor, states: str) -> bool:
    return quantized_shape(p.shape, states)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def row_piece(p: torch.Tensor, block: int = BLOCK) -> RowPiece:
    """Where this rank's shard of ``p`` sits in p's global rows (FSDP2 and TP shards alike)."""
    total = p.shape[-1]
    if not isinstance(p, DTensor):
        return RowPiece(0, total, total, block_len(total, block))
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    groups = tuple(p.device_mesh.get_group(d) for d, pl in enumerate(p.placements)
                   if isinstance(pl, Shard) and pl.dim in (-1, p.dim() - 1))
    return RowPiece(offset[-1], shape[-1], total, block_len(total, block), groups)


def _like(p: torch.Tensor, local: torch.Tensor, scales: bool = False) -> torch.Tensor:
    """``local`` placed like ``p`` (a DTensor when p is one). Scales (``p.shape[:-1] + (blocks,)``) are whole
    rows on every rank: where p's last dimension is sharded they are replicated instead."""
    if not isinstance(p, DTensor):
        return local
    shape, placements = list(p.shape), list(p.placements)
    if scales:
        shape[-1] = local.shape[-1]
        placements = [Replicate() if isinstance(pl, Shard) and pl.dim in (-1, p.dim() - 1) else pl
                      for pl in placements]
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


class LowBitAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with moments in ``states`` (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, states: str = "8bit", block: int = BLOCK):
        if states not in STATES:
            raise ValueError(f"optimizer states {states!r}: choose one of {', '.join(STATES)}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.states, self.block = states, block
        self._codes: dict[torch.device, tuple[Code, Code]] = {}
        self.register_load_state_dict_post_hook(LowBitAdamW._restore_dtypes)

    def _code(self, device: torch.device) -> tuple[Code, Code]:
        if device not in self._codes:
            self._codes[device] = (Code.make(True, device), Code.make(False, device))
        return self._codes[device]

    def _init_state(self, p: torch.Tensor) -> dict:
        local = _local(p)
        state: dict = {"step": torch.tensor(0.0)}
        if quantized(p, self.states):
            piece = row_piece(p, self.block)
            codes = torch.zeros_like(local, dtype=torch.uint8, memory_format=torch.contiguous_format)
            scales = torch.zeros(*local.shape[:-1], piece.blocks, device=local.device)
            state["exp_avg_q"], state["exp_avg_sq_q"] = _like(p, codes), _like(p, codes.clone())
            state["exp_avg_scale"] = _like(p, scales, scales=True)
            state["exp_avg_sq_scale"] = _like(p, scales.clone(), scales=True)
        else:
            dtype = torch.bfloat16 if self.states == "bf16" else torch.float32
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                t = float(state["step"])
                w, g = _local(p), _local(p.grad).float()
                if w.numel() == 0:
                    continue
                if "exp_avg_q" in state:
                    piece = row_piece(p, self.block)
                    signed, unsigned = self._code(w.device)
                    keys = ("exp_avg_q", "exp_avg_scale", "exp_avg_sq_q", "exp_avg_sq_scale")
                    mq, ms, vq, vs = (_local(state[k]) for k in keys)
                    m = dequantize(mq, ms, signed, piece)
                    v = dequantize(vq, vs, unsigned, piece)
                else:
                    m, v = _local(state["exp_avg"]).float(), _local(state["exp_avg_sq"]).float()
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd:
                    w.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                w.addcdiv_(m.to(w.dtype), denom.to(w.dtype), value=-lr / (1 - b1 ** t))
                if "exp_avg_q" in state:
                    q, s = quantize(m, signed, piece)
                    mq.copy_(q)
                    ms.copy_(s)
                    q, s = quantize(v, unsigned, piece)
                    vq.copy_(q)
                    vs.copy_(s)
                else:
                    _local(state["exp_avg"]).copy_(m)
                    _local(state["exp_avg_sq"]).copy_(v)
        return loss

    @staticmethod
    def _restore_dtypes(optimizer: LowBitAdamW) -> None:
        """Undo ``Optimizer.load_state_dict``'s cast of every state tensor to the parameter's dtype."""
        for state in optimizer.state.values():
            for key in ("exp_avg_q", "exp_avg_sq_q"):
                if key in state and state[key].dtype != torch.uint8:
                    state[key] = state[key].round().to(torch.uint8)
            for key in ("exp_avg_scale", "exp_avg_sq_scale"):  # fp32 absmax, cast to a float64 model's dtype
                if key in state and state[key].dtype != torch.float32:
                    state[key] = state[key].to(torch.float32)
            if optimizer.states == "bf16":
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state and state[key].dtype != torch.bfloat16:
                        state[key] = state[key].to(torch.bfloat16)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (local shards), step counters included."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = _local(value)
                total += local.numel() * local.element_size()
    return total
