"""Routed experts of the decoder: one grouped GEMM per projection and few passes over memory.

transformers' own `grouped_mm` experts forward spends more time in elementwise
passes than in its two GEMMs at long prefills (on an H100 at 8192 tokens:
sentinel masks for expert parallelism, routing weights multiplied in float32
over [tokens * top_k, hidden], float32 copies). This forward computes the same
function with the routing weight folded into the activation (the down
projection is linear, so `down(a) * w == down(a * w)`), bf16 throughout on the
GPU, and the top-k outputs summed in token order (deterministic: no atomics).
Nothing in it waits on the host, so a whole decoder step can be captured in a
CUDA graph.

It is registered with transformers' `ExpertsInterface` under
`EXPERTS_IMPLEMENTATION` and selected through the text config, so the
decoder keeps transformers' modules and weights layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ExpertsInterface

from optical_memory.backends.deepseek_ocr.fused_experts import fused_experts, use_fused_experts

EXPERTS_IMPLEMENTATION = "optical_memory"


def uses_grouped_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether experts run as torch's grouped GEMM kernel (no host sync) on this device and dtype.

    Elsewhere (the CPU, float32 or float16 on CUDA) they run one GEMM per
    expert, which reads the group sizes on the host.
    """
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def grouped_mm(
    x: torch.Tensor,  # [rows, in], rows grouped by expert
    weight: torch.Tensor,  # [experts, in, out]
    ends: torch.Tensor,  # [experts] int32: end row of each expert's group
) -> torch.Tensor:
    """x[group e] @ weight[e] for every expert e -> [rows, out]."""
    if uses_grouped_kernel(x.device, x.dtype):
        return F.grouped_mm(x, weight, offs=ends)
    out = x.new_empty(x.shape[0], weight.shape[-1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[expert], out=out[start:end])
        start = end
    return out


def grouped_experts_forward(
    self: nn.Module,  # transformers' experts module: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    hidden_states: torch.Tensor,  # [tokens, hidden]
    top_k_index: torch.Tensor,  # [tokens, k]
    top_k_weights: torch.Tensor,  # [tokens, k], float32
) -> torch.Tensor:
    if use_fused_experts(hidden_states, top_k_index):  # a few decode tokens: two Triton kernels
        return fused_experts(
            hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj
        )
    tokens, k = top_k_index.shape
    rows = tokens * k
    experts = torch.arange(self.num_experts, device=hidden_states.device)
    expert_of_row, order = torch.sort(top_k_index.reshape(-1), stable=True)  # [rows]
    ends = torch.searchsorted(expert_of_row, experts, right=True, out_int32=True)  # [E]
    x = hidden_states.index_select(0, order // k)  # [rows, H], grouped by expert

    gate_up = grouped_mm(x, self.gate_up_proj.transpose(1, 2), ends)  # [rows, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    weight = top_k_weights.reshape(-1)[order].to(x.dtype)  # [rows]
    act = F.silu(gate).mul_(up).mul_(weight[:, None])  # [rows, I]
    out = grouped_mm(act, self.down_proj.transpose(1, 2), ends)  # [rows, H]

    token_order = torch.empty_like(order)
    token_order[order] = torch.arange(rows, device=order.device)
    return out[token_order].view(tokens, k, -1).sum(dim=1)  # [tokens, H]


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, grouped_experts_forward)
