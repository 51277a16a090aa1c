"""The fused routed-experts kernels (decode) against the grouped forward they stand in for.

The kernels run in Triton's interpreter on CPU tensors, in a Python of their own:
TRITON_INTERPRET=1 only takes effect when set before triton is imported, and the
rest of the session keeps compiled kernels. That run (this file as a script)
compares every case with the pure-torch `grouped_experts_forward` and prints the
differences as JSON. Skipped where triton is not installed (CI's CPU torch has
none); on a CUDA machine the compiled kernels are checked too, eagerly and
replayed from a CUDA graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from optical_memory.backends.deepseek_ocr import experts as experts_module
from optical_memory.backends.deepseek_ocr.fused_experts import (
    MAX_FUSED_PAIRS,
    FusedConfig,
    fused_experts,
    use_fused_experts,
)

ROOT = Path(__file__).resolve().parents[1]
NO_TRITON = "triton is not installed (CPU-only torch): the fused kernels cannot run"

# Small tiles, so that every dimension spans several tiles and most end in a partial one
# (I=48 in tiles of 32, H=40 in tiles of 32); `None` takes the decoder's own tiles.
SMALL_TILES = FusedConfig(32, 32, 4, 32, 32, 4)

# name: (dtype, tokens, k, hidden, inter, experts, routing, config)
CASES = {
    "f32_one_token_k6": ("float32", 1, 6, 64, 48, 8, "random", SMALL_TILES),
    "f32_crowded_k6": ("float32", 3, 6, 64, 48, 8, "crowded", SMALL_TILES),
    "f32_partial_tiles_k3": ("float32", 3, 3, 40, 24, 8, "random", SMALL_TILES),
    "f32_strided_rows_k4": ("float32", 3, 4, 64, 48, 8, "strided", SMALL_TILES),
    "bf16_one_token_k6_default_tiles": ("bfloat16", 1, 6, 64, 48, 8, "random", None),
    "bf16_four_tokens_k2": ("bfloat16", 4, 2, 64, 48, 8, "random", SMALL_TILES),
    "bf16_crowded_k6": ("bfloat16", 3, 6, 64, 48, 8, "crowded", SMALL_TILES),
    "bf16_partial_tiles_k3": ("bfloat16", 3, 3, 40, 24, 8, "random", SMALL_TILES),
}
# max |fused - reference| / max |reference|
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def make_case(dtype, tokens, k, hidden, inter, experts, routing, seed=0, device="cpu"):
    """Weights, tokens and routing of one case (top-k experts distinct within a token)."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2).to(device, dtype)
    down = (torch.randn(experts, hidden, inter, generator=g) * 0.2).to(device, dtype)
    x = torch.randn(tokens, hidden + 8, generator=g).to(device, dtype)
    x = x[:, :hidden] if routing == "strided" else x[:, :hidden].contiguous()
    if routing == "crowded":  # every token on the same k experts, the others idle
        index = torch.randperm(experts, generator=g)[:k].repeat(tokens, 1)
    else:
        index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    return x, index.to(device), weights.to(device), gate_up, down


def reference(x, index, weights, gate_up, down, dtype=None):
    """The pure-torch grouped forward (the CPU path, or the GPU's grouped GEMMs)."""
    dtype = dtype or x.dtype
    module = types.SimpleNamespace(
        gate_up_proj=gate_up.to(dtype), down_proj=down.to(dtype), num_experts=gate_up.shape[0]
    )
    return experts_module.grouped_experts_forward(module, x.to(dtype), index, weights)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def interpreter_run() -> dict:
    """Every case through the interpreted kernels (TRITON_INTERPRET=1 set by the caller)."""
    results = {}
    with torch.no_grad():
        for name, (dtype, tokens, k, hidden, inter, experts, routing, config) in CASES.items():
            x, index, weights, gate_up, down = make_case(
                dtype, tokens, k, hidden, inter, experts, routing
            )
            fused = fused_experts(x, index, weights, gate_up, down, config)
            ref = reference(x, index, weights, gate_up, down)
            ref32 = reference(x, index, weights, gate_up, down, torch.float32)
            results[name] = {
                "dtype": str(fused.dtype),
                "shape": list(fused.shape),
                "max_abs": (fused.float() - ref.float()).abs().max().item(),
                "rel": max_rel(fused, ref),
                "rel_vs_float32": max_rel(fused, ref32),
                "reference_rel_vs_float32": max_rel(ref, ref32),
            }
        # the hook: grouped_experts_forward hands a few tokens to the fused kernels
        x, index, weights, gate_up, down = make_case("bfloat16", 3, 6, 64, 48, 8, "random")
        module = types.SimpleNamespace(gate_up_proj=gate_up, down_proj=down, num_experts=8)
        experts_module.use_fused_experts = lambda hidden_states, top_k_index: True
        hooked = experts_module.grouped_experts_forward(module, x, index, weights)
        results["dispatch"] = {
            "equal": torch.equal(hooked, fused_experts(x, index, weights, gate_up, down))
        }
    return results


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton", reason=NO_TRITON)
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    run = subprocess.run(
        [sys.executable, __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if run.returncode != 0:
        pytest.fail(f"interpreter run failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CASES)
def test_interpreted_kernels_match_grouped_forward(interpreted, name):
    got = interpreted[name]
    dtype = CASES[name][0]
    assert got["dtype"] == f"torch.{dtype}" and got["shape"] == [CASES[name][1], CASES[name][3]]
    assert got["rel"] <= TOLERANCE[dtype], got
    # no further from the float32 function than the reference itself, up to a rounding
    assert got["rel_vs_float32"] <= got["reference_rel_vs_float32"] + TOLERANCE[dtype] / 2, got


def test_grouped_forward_dispatches_few_tokens_to_fused_kernels(interpreted):
    assert interpreted["dispatch"]["equal"]


def test_fused_path_only_for_few_bf16_tokens_on_cuda():
    """The CPU (every test here and in CI) and float32 keep the grouped forward."""
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    assert not use_fused_experts(x, torch.zeros(2, 6, dtype=torch.long))
    assert MAX_FUSED_PAIRS >= 6  # one decode token at the official top-6 at least


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_match_grouped_gemms_on_cuda(monkeypatch):
    pytest.importorskip("triton", reason=NO_TRITON)
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels are not compiled in this session")
    for tokens in (1, 4, 16):  # official hidden and expert sizes (16 experts, not 64)
        x, index, weights, gate_up, down = make_case(
            "bfloat16", tokens, 6, 1280, 896, 16, "random", seed=tokens, device="cuda"
        )
        assert use_fused_experts(x, index)
        with torch.no_grad():
            fused = fused_experts(x, index, weights, gate_up, down)
            ref32 = reference(x, index, weights, gate_up, down, torch.float32)
            with monkeypatch.context() as m:
                m.setattr(experts_module, "use_fused_experts", lambda *_: False)
                grouped = reference(x, index, weights, gate_up, down)
            assert max_rel(fused, grouped) <= TOLERANCE["bfloat16"]
            assert max_rel(fused, ref32) <= max_rel(grouped, ref32) + TOLERANCE["bfloat16"] / 2
            out = torch.empty_like(fused)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out.copy_(fused_experts(x, index, weights, gate_up, down))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, fused)


if __name__ == "__main__":  # the interpreter run of `interpreted`
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    print(json.dumps(interpreter_run()))
