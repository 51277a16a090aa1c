"""A paged KV cache and attention over it, for many sequences of different lengths at once.

Keys and values of every layer live in one pool of fixed-size blocks per
layer, `[blocks * block_size, heads, head_dim]`; a sequence owns the blocks its
block-table row lists, as many as its prompt and answer budget need, so a
7,000-position context holds 7,000 positions of cache and not the decoder's
whole window. The prefill writes its keys and values straight into the blocks.

`paged_decode_attention` attends one new query per sequence over that
sequence's own keys: on the GPU a Triton kernel that reads each key and value
once (split over the sequence, then combined, so one long sequence still
spreads over the whole GPU); elsewhere a gather and SDPA per sequence (the
reference the kernel is checked against).

Block 0 is never handed out: rows of a batch-size bucket that hold no sequence
write their keys there and attend to it alone, so a captured step needs no
branches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


class OutOfBlocks(RuntimeError):
    """The pool has too few free blocks for a sequence (it waits for others to finish)."""


class PagedKVCache:
    """Keys and values of `layers` layers in `blocks` blocks of `block_size` positions."""

    def __init__(
        self,
        layers: int,
        heads: int,
        head_dim: int,
        blocks: int,
        block_size: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if blocks < 2:
            raise ValueError("a paged cache needs at least 2 blocks (block 0 is scratch)")
        self.block_size = block_size
        self.blocks = blocks
        shape = (layers, blocks * block_size, heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self._free = list(range(blocks - 1, 0, -1))  # block 0 is scratch

    @staticmethod
    def bytes_per_block(layers: int, heads: int, head_dim: int, block_size: int, dtype) -> int:
        return (
            2 * layers * block_size * heads * head_dim * torch.empty((), dtype=dtype).element_size()
        )

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    def allocate(self, positions: int) -> list[int]:
        """Blocks for `positions` positions, or OutOfBlocks (nothing taken)."""
        n = self.blocks_for(positions)
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat pool rows of positions [start, end) of a sequence owning `blocks` (CPU long)."""
        pos = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """key, value [n, heads, head_dim] into pool rows `slots` [n]."""
        self.keys[layer].index_copy_(0, slots, key)
        self.values[layer].index_copy_(0, slots, value)


def paged_decode_attention(
    query: torch.Tensor,  # [batch, heads, head_dim]
    keys: torch.Tensor,  # [pool, heads, head_dim] (one layer)
    values: torch.Tensor,
    block_table: torch.Tensor,  # [batch, max_blocks] int32
    lengths: torch.Tensor,  # [batch] int32, >= 1
    block_size: int,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over each sequence's first `lengths[b]` positions -> [batch, heads, head_dim].

    A custom op, so `torch.compile` of a step treats it as one opaque kernel."""
    return torch.ops.optical_memory.paged_decode(
        query, keys, values, block_table, lengths, block_size, scale, splits or 0
    )


@torch.library.custom_op("optical_memory::paged_decode", mutates_args=())
def _paged_decode_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    scale: float,
    splits: int,
) -> torch.Tensor:
    if use_triton(query):
        return _triton_decode(
            query, keys, values, block_table, lengths, block_size, scale, splits or None
        )
    return reference_decode_attention(query, keys, values, block_table, lengths, block_size, scale)


@_paged_decode_op.register_fake
def _(query, keys, values, block_table, lengths, block_size, scale, splits):
    return torch.empty_like(query)


def use_triton(query: torch.Tensor) -> bool:
    return triton is not None and query.is_cuda


def reference_decode_attention(query, keys, values, block_table, lengths, block_size, scale):
    """Gather each sequence's keys and values and run SDPA (host reads the lengths)."""
    out = torch.empty_like(query)
    for b, n in enumerate(lengths.tolist()):
        pos = torch.arange(n, device=query.device)
        rows = block_table[b].long()[pos // block_size] * block_size + pos % block_size
        k = keys.index_select(0, rows).transpose(0, 1)  # [heads, n, head_dim]
        v = values.index_select(0, rows).transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(query[b][:, None], k, v, scale=scale)[:, 0]
    return out


def decode_splits(batch: int, heads: int, max_blocks: int, sms: int = 132) -> int:
    """Splits of each sequence so that batch x heads x splits programs fill the GPU a few times."""
    want = max(1, math.ceil(4 * sms / (batch * heads)))
    return min(want, max_blocks)


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        Q,
        K,
        V,
        BT,
        LEN,
        ACC,
        M,
        L,
        scale,
        stride_qb,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_bt,
        stride_ab,
        stride_ah,
        stride_as,
        stride_mb,
        stride_mh,
        BLOCK: tl.constexpr,
        D: tl.constexpr,
        BLOCKS_PER_SPLIT: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        n = tl.load(LEN + b)
        d = tl.arange(0, D)
        offs = tl.arange(0, BLOCK)
        q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.zeros([], tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        first = s * BLOCKS_PER_SPLIT
        for j in range(BLOCKS_PER_SPLIT):
            tok0 = (first + j) * BLOCK
            if tok0 < n:
                block = tl.load(BT + b * stride_bt + first + j).to(tl.int64)
                valid = tok0 + offs < n
                rows = block * BLOCK + offs
                k = tl.load(
                    K + rows[:, None] * stride_kt + h * stride_kh + d[None, :],
                    mask=valid[:, None],
                    other=0.0,
                )
                scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
                scores = tl.where(valid, scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=0))
                p = tl.exp(scores - m_new)
                alpha = tl.exp(m_i - m_new)
                v = tl.load(
                    V + rows[:, None] * stride_kt + h * stride_kh + d[None, :],
                    mask=valid[:, None],
                    other=0.0,
                )
                acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                m_i = m_new
        tl.store(ACC + b * stride_ab + h * stride_ah + s * stride_as + d, acc)
        tl.store(M + b * stride_mb + h * stride_mh + s, m_i)
        tl.store(L + b * stride_mb + h * stride_mh + s, l_i)


def _triton_decode(query, keys, values, block_table, lengths, block_size, scale, splits):
    batch, heads, dim = query.shape
    max_blocks = block_table.shape[1]
    if splits is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count
        splits = decode_splits(batch, heads, max_blocks, sms)
    per_split = math.ceil(max_blocks / splits)
    splits = math.ceil(max_blocks / per_split)
    acc = torch.empty(batch, heads, splits, dim, device=query.device, dtype=torch.float32)
    m = torch.empty(batch, heads, splits, device=query.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    _paged_decode_kernel[(batch, heads, splits)](
        query,
        keys,
        values,
        block_table,
        lengths,
        acc,
        m,
        lse,
        scale,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        block_table.stride(0),
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        m.stride(0),
        m.stride(1),
        BLOCK=block_size,
        D=dim,
        BLOCKS_PER_SPLIT=per_split,
        num_warps=4,
    )
    # combine the splits: splits past a sequence's end have m = -inf and l = 0
    top = m.amax(dim=2, keepdim=True)
    w = torch.exp(m - top)  # [batch, heads, splits]
    out = (acc * w[..., None]).sum(2) / (lse * w).sum(2)[..., None]
    return out.to(query.dtype)
