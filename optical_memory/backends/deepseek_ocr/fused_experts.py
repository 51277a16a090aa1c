"""Routed experts for a few tokens (the decode step) as two Triton kernels.

At decode a batch holds 1 to a few dozen tokens, and the grouped-GEMM forward
(experts.py) costs about 15 small kernels per layer (sort, searchsorted,
gathers, two grouped GEMMs of a few rows, SwiGLU, the top-k sum), each of them
mostly launch and tail. Here the same function is two GEMV-shaped kernels that
read each routed expert's weights once per (token, slot) pair:

- `_gate_up_kernel`, one program per (pair, tile of the intermediate size):
  act = silu(x @ gate_e^T) * (x @ up_e^T) * routing weight, fp32 accumulation,
  stored in the activation dtype;
- `_down_kernel`, one program per (token, tile of the hidden size):
  out[t] = sum over the k slots of act[t, slot] @ down_e^T, the slots summed in
  a fixed order inside the program (deterministic: no atomics).

The pair (token) index is the fastest grid axis, so pairs routed to the same
expert read the same weight tile at about the same time and share it in L2.
Nothing waits on the host, so the step stays capturable in a CUDA graph; the
op is a custom op, so `torch.compile` of a step treats it as one opaque call.
Past `MAX_FUSED_PAIRS` token-slot pairs the grouped GEMMs win (each expert's
weights are read once for all its rows), so experts.py switches back to them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # Triton ships with CUDA builds of torch; absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Token-slot pairs (tokens * top_k) up to which the fused kernels run: 16 decode
# tokens at the official top-6. Past that, experts shared by several pairs are
# read once per pair here and once in all by the grouped GEMMs.
MAX_FUSED_PAIRS = 96


class FusedConfig(NamedTuple):
    """Tile sizes and warps of the two kernels (powers of two)."""

    gate_up_block_i: int = 16  # intermediate rows (of gate and of up) per program
    gate_up_block_h: int = 256  # hidden columns per load
    gate_up_warps: int = 4
    down_block_h: int = 16  # hidden rows per program
    down_block_i: int = 128  # intermediate columns per load
    down_warps: int = 4


def default_config(tokens: int) -> FusedConfig:
    """Tiles for `tokens` tokens at the official shapes (H=1280, I=896) on an H100.

    The gate/up kernel has tokens * k * I / 16 programs (336 at one token), enough
    to keep 132 SMs streaming. The down kernel has tokens * H / block_h programs,
    so few tokens take thinner hidden tiles (160 programs at one token).
    """
    down_block_h = 8 if tokens <= 2 else 16 if tokens <= 8 else 32
    return FusedConfig(down_block_h=down_block_h)


def use_fused_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> bool:
    """Whether the routed experts of these tokens run as the fused Triton kernels.

    CUDA (compute capability 8.0+), bf16, Triton importable, and at most
    `MAX_FUSED_PAIRS` token-slot pairs. Decided from shapes and dtypes only, so a
    captured step always takes the same branch.
    """
    return (
        triton is not None
        and hidden_states.is_cuda
        and hidden_states.dtype == torch.bfloat16
        and 0 < top_k_index.numel() <= MAX_FUSED_PAIRS
        and torch.cuda.get_device_capability(hidden_states.device) >= (8, 0)
    )


def fused_experts(
    hidden_states: torch.Tensor,  # [tokens, hidden]
    top_k_index: torch.Tensor,  # [tokens, k]
    top_k_weights: torch.Tensor,  # [tokens, k], float32
    gate_up_proj: torch.Tensor,  # [experts, 2 * inter, hidden]: gate rows, then up rows
    down_proj: torch.Tensor,  # [experts, hidden, inter]
    config: FusedConfig | None = None,
) -> torch.Tensor:
    """sum over slots of w * down_e(silu(gate_e x) * up_e x) per token -> [tokens, hidden].

    Runs the Triton kernels on any device Triton runs on (the CPU too, under
    TRITON_INTERPRET=1, which is how the tests check it); `use_fused_experts`
    says when the decoder takes this path.
    """
    if triton is None:
        raise RuntimeError("fused_experts needs triton")
    config = config or default_config(hidden_states.shape[0])
    return torch.ops.optical_memory.fused_experts(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, list(config)
    )


@torch.library.custom_op("optical_memory::fused_experts", mutates_args=())
def _fused_experts_op(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    config: list[int],
) -> torch.Tensor:
    return _triton_fused_experts(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, FusedConfig(*config)
    )


@_fused_experts_op.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, config):
    return hidden_states.new_empty(hidden_states.shape)


if triton is not None:

    @triton.jit
    def _gate_up_kernel(
        X,  # [tokens, H]
        IDX,  # [tokens * K] expert of each pair
        WTS,  # [tokens * K] routing weight of each pair
        W,  # [E, 2 * I, H]
        ACT,  # [tokens * K, I]
        stride_xt,
        stride_xh,
        stride_we,
        stride_wn,
        stride_wh,
        stride_ap,
        K: tl.constexpr,
        H: tl.constexpr,
        I: tl.constexpr,  # the intermediate size
        BLOCK_I: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        p = tl.program_id(0)  # pair = token * K + slot
        tile = tl.program_id(1)
        t = p // K
        e = tl.load(IDX + p).to(tl.int64)
        w = tl.load(WTS + p).to(tl.float32)
        rows = tile * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < I
        cols = tl.arange(0, BLOCK_H)
        gate_ptrs = W + e * stride_we + rows[:, None] * stride_wn + cols[None, :] * stride_wh
        up_ptrs = gate_ptrs + I * stride_wn
        x_ptrs = X + t * stride_xt + cols * stride_xh
        acc_gate = tl.zeros([BLOCK_I, BLOCK_H], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_I, BLOCK_H], dtype=tl.float32)
        for h0 in tl.static_range(0, H, BLOCK_H):  # unrolled: all loads can be in flight
            col_ok = (h0 + cols) < H
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptrs + h0 * stride_xh, mask=col_ok, other=0.0).to(tl.float32)
            g = tl.load(gate_ptrs + h0 * stride_wh, mask=mask, other=0.0)
            u = tl.load(up_ptrs + h0 * stride_wh, mask=mask, other=0.0)
            acc_gate += g.to(tl.float32) * x[None, :]
            acc_up += u.to(tl.float32) * x[None, :]
        gate = tl.sum(acc_gate, axis=1)
        up = tl.sum(acc_up, axis=1)
        act = gate * tl.sigmoid(gate) * up * w
        tl.store(ACT + p * stride_ap + rows, act.to(ACT.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _down_kernel(
        ACT,  # [tokens * K, I]
        IDX,  # [tokens * K]
        W,  # [E, H, I]
        OUT,  # [tokens, H]
        stride_ap,
        stride_we,
        stride_wn,
        stride_wi,
        stride_ot,
        K: tl.constexpr,
        H: tl.constexpr,
        I: tl.constexpr,  # the intermediate size
        BLOCK_H: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        t = tl.program_id(0)
        tile = tl.program_id(1)
        rows = tile * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = rows < H
        cols = tl.arange(0, BLOCK_I)
        acc = tl.zeros([BLOCK_H, BLOCK_I], dtype=tl.float32)
        for s in tl.static_range(K):  # slots in order: the same sum on every run
            p = t * K + s
            e = tl.load(IDX + p).to(tl.int64)
            w_ptrs = W + e * stride_we + rows[:, None] * stride_wn + cols[None, :] * stride_wi
            a_ptrs = ACT + p * stride_ap + cols
            for i0 in tl.static_range(0, I, BLOCK_I):
                col_ok = (i0 + cols) < I
                a = tl.load(a_ptrs + i0, mask=col_ok, other=0.0).to(tl.float32)
                wt = tl.load(
                    w_ptrs + i0 * stride_wi, mask=row_ok[:, None] & col_ok[None, :], other=0.0
                )
                acc += wt.to(tl.float32) * a[None, :]
        out = tl.sum(acc, axis=1)
        tl.store(OUT + t * stride_ot + rows, out.to(OUT.dtype.element_ty), mask=row_ok)


def _triton_fused_experts(
    hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, config: FusedConfig
):
    tokens, hidden = hidden_states.shape
    k = top_k_index.shape[1]
    inter = down_proj.shape[-1]
    if gate_up_proj.shape[1:] != (2 * inter, hidden) or down_proj.shape[1] != hidden:
        raise ValueError(
            f"expert weights {tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)} "
            f"do not fit hidden size {hidden}"
        )
    out = hidden_states.new_empty(tokens, hidden)
    if tokens == 0:
        return out
    index = top_k_index.reshape(-1).contiguous()  # [pairs]
    weights = top_k_weights.reshape(-1).contiguous()
    act = torch.empty(tokens * k, inter, device=hidden_states.device, dtype=hidden_states.dtype)
    block_h = min(config.gate_up_block_h, triton.next_power_of_2(hidden))
    block_i = min(config.gate_up_block_i, triton.next_power_of_2(inter))
    _gate_up_kernel[(tokens * k, triton.cdiv(inter, block_i))](
        hidden_states,
        index,
        weights,
        gate_up_proj,
        act,
        hidden_states.stride(0),
        hidden_states.stride(1),
        gate_up_proj.stride(0),
        gate_up_proj.stride(1),
        gate_up_proj.stride(2),
        act.stride(0),
        K=k,
        H=hidden,
        I=inter,
        BLOCK_I=block_i,
        BLOCK_H=block_h,
        num_warps=config.gate_up_warps,
    )
    block_h = min(config.down_block_h, triton.next_power_of_2(hidden))
    block_i = min(config.down_block_i, triton.next_power_of_2(inter))
    _down_kernel[(tokens, triton.cdiv(hidden, block_h))](
        act,
        index,
        down_proj,
        out,
        act.stride(0),
        down_proj.stride(0),
        down_proj.stride(1),
        down_proj.stride(2),
        out.stride(0),
        K=k,
        H=hidden,
        I=inter,
        BLOCK_H=block_h,
        BLOCK_I=block_i,
        num_warps=config.down_warps,
    )
    return out
