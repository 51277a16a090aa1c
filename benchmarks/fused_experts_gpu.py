"""Routed experts of a decode step: the fused Triton kernels against the grouped GEMMs.

Official shapes of the DeepSeek-3B-MoE decoder (hidden 1280, expert intermediate
896, 64 routed experts, top-6, bf16), random weights. For 1, 4, 16 and 64
tokens, each path runs the routed experts of the 11 MoE layers (weights of
their own, so the few experts a token reads are not left in L2 by the layer
before) with random routing, captured in one CUDA graph and replayed many
times; the figure is the time per layer. Both paths are checked against the
float32 function (max |diff| / max |float32|), and the fused kernels' tiles
are swept around their defaults (`--no-sweep` skips it; the sweep stops early
to keep the run under a minute). Exits 1 when the fused output is off.

    python benchmarks/fused_experts_gpu.py --out benchmarks/results/fused_experts_gpu.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import types
from unittest import mock

import torch
from common import RESULTS_DIR, command, write_json

from optical_memory.backends.deepseek_ocr import experts as experts_module
from optical_memory.backends.deepseek_ocr import fused_experts as fe
from optical_memory.backends.deepseek_ocr.configuration import DecoderConfig

TOKENS = (1, 4, 16, 64)
SWEEP_BUDGET_S = 25.0  # the sweep stops starting new tiles past this many seconds of the run
# datasheet HBM bandwidth (first name found in the device's), for the fraction of peak
HBM_TBPS = {"H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "H200": 4.8}
DEVICE = torch.device("cuda")

# Tiles tried around the defaults: the gate/up kernel's with the default down
# tiles, then the down kernel's with the default gate/up tiles.
GATE_UP_TILES = [(8, 256, 4), (32, 128, 4), (16, 512, 8)]  # (block_i, block_h, warps)
DOWN_TILES = [(4, 256, 2), (8, 128, 4), (16, 128, 4), (32, 128, 8)]  # (block_h, block_i, warps)


def layer_weights(cfg: DecoderConfig, layers: int, device) -> list[types.SimpleNamespace]:
    """Experts modules (transformers layout) of `layers` layers, random bf16 weights."""
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    out = []
    for _ in range(layers):
        gate_up = torch.randn(e, 2 * i, h, device=device, dtype=torch.bfloat16).mul_(0.02)
        down = torch.randn(e, h, i, device=device, dtype=torch.bfloat16).mul_(0.02)
        out.append(types.SimpleNamespace(gate_up_proj=gate_up, down_proj=down, num_experts=e))
    return out


def routing(cfg: DecoderConfig, tokens: int, layers: int, device, seed: int):
    """Per layer: tokens, top-k experts (distinct per token) and float32 weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(layers):
        x = torch.randn(tokens, cfg.hidden_size, device=device, generator=g).to(torch.bfloat16)
        scores = torch.rand(tokens, cfg.n_routed_experts, device=device, generator=g)
        w, idx = scores.topk(cfg.num_experts_per_tok, dim=-1)
        out.append((x, idx, w / w.sum(-1, keepdim=True)))
    return out


def grouped(module, x, idx, w):
    """The grouped-GEMM forward of experts.py, whatever its dispatch would pick."""
    with mock.patch.object(experts_module, "use_fused_experts", lambda *_: False):
        return experts_module.grouped_experts_forward(module, x, idx, w)


def graph_time_us(fn, min_iters: int = 20, target_s: float = 0.03) -> float:
    """Median time of one replay of `fn` captured in a CUDA graph, in microseconds."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles, cuBLAS workspaces) off-graph
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    iters = max(min_iters, min(2000, int(target_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(3):
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    del graph
    return sorted(times)[1]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS_DIR / "fused_experts_gpu.json"))
    ap.add_argument("--no-sweep", action="store_true", help="time the default tiles only")
    args = ap.parse_args()
    if not torch.cuda.is_available() or fe.triton is None:
        sys.exit("needs a CUDA GPU and triton")
    t0 = time.perf_counter()
    device = DEVICE
    cfg = DecoderConfig()
    layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    h, i, e, k = (
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
    )
    expert_bytes = 3 * h * i * 2  # gate, up and down of one expert, bf16
    name = torch.cuda.get_device_name(device)
    peak_tbps = next((v for key, v in HBM_TBPS.items() if key in name), None)
    modules = layer_weights(cfg, layers, device)
    results, ok = [], True

    with torch.no_grad():
        for tokens in TOKENS:
            inputs = routing(cfg, tokens, layers, device, seed=tokens)
            default = fe.default_config(tokens)

            def run_grouped(inputs=inputs):
                return [grouped(m, x, idx, w) for m, (x, idx, w) in zip(modules, inputs)]

            def run_fused(config, inputs=inputs):
                return [
                    fe.fused_experts(x, idx, w, m.gate_up_proj, m.down_proj, config)
                    for m, (x, idx, w) in zip(modules, inputs)
                ]

            # accuracy on the first layer, against the float32 function (CUDA, per-expert loop)
            m0, (x0, idx0, w0) = modules[0], inputs[0]
            m32 = types.SimpleNamespace(
                gate_up_proj=m0.gate_up_proj.float(),
                down_proj=m0.down_proj.float(),
                num_experts=e,
            )
            ref32 = grouped(m32, x0.float(), idx0, w0)
            del m32
            out_grouped = grouped(m0, x0, idx0, w0)
            out_fused = fe.fused_experts(x0, idx0, w0, m0.gate_up_proj, m0.down_proj, default)
            rel_fused, rel_grouped = max_rel(out_fused, ref32), max_rel(out_grouped, ref32)
            rel_between = max_rel(out_fused, out_grouped)
            accurate = rel_between <= 2e-2 and rel_fused <= rel_grouped + 1e-2
            ok &= accurate

            grouped_us = graph_time_us(run_grouped) / layers
            fused_us = graph_time_us(lambda config=default: run_fused(config)) / layers
            sweep = [{"config": default._asdict(), "us_per_layer": round(fused_us, 2)}]
            if not args.no_sweep:
                variants = [
                    default._replace(gate_up_block_i=bi, gate_up_block_h=bh, gate_up_warps=nw)
                    for bi, bh, nw in GATE_UP_TILES
                ]
                variants += [
                    default._replace(down_block_h=bh, down_block_i=bi, down_warps=nw)
                    for bh, bi, nw in DOWN_TILES
                ]
                for config in variants:
                    if config == default or time.perf_counter() - t0 > SWEEP_BUDGET_S:
                        continue
                    us = graph_time_us(lambda config=config: run_fused(config)) / layers
                    sweep.append({"config": config._asdict(), "us_per_layer": round(us, 2)})
            best = min(sweep, key=lambda r: r["us_per_layer"])

            distinct = sum(len(torch.unique(idx)) for _, idx, _ in inputs) / layers
            row = {
                "tokens": tokens,
                "pairs": tokens * k,
                "dispatch_uses_fused": fe.use_fused_experts(x0, idx0),
                "distinct_experts_per_layer": round(distinct, 1),
                "grouped_mm_us_per_layer": round(grouped_us, 2),
                "fused_us_per_layer": round(fused_us, 2),
                "speedup_fused_vs_grouped": round(grouped_us / fused_us, 3),
                "fused_best_us_per_layer": best["us_per_layer"],
                "fused_best_config": best["config"],
                # bytes of the distinct experts read / time (what an ideal kernel must read)
                "grouped_mm_TBps": round(distinct * expert_bytes / grouped_us / 1e6, 3),
                "fused_TBps": round(distinct * expert_bytes / fused_us / 1e6, 3),
                "max_rel_fused_vs_float32": rel_fused,
                "max_rel_grouped_mm_vs_float32": rel_grouped,
                "max_rel_fused_vs_grouped_mm": rel_between,
                "accurate": accurate,
                "sweep": sweep,
            }
            if peak_tbps:
                row["fused_fraction_of_hbm_peak"] = round(row["fused_TBps"] / peak_tbps, 3)
            results.append(row)
            print(
                f"T={tokens:3d} grouped_mm {grouped_us:8.2f} us/layer  fused {fused_us:8.2f} "
                f"(best {best['us_per_layer']:8.2f})  x{grouped_us / fused_us:5.2f}  "
                f"rel fused {rel_fused:.2e} grouped {rel_grouped:.2e}  "
                f"{'ok' if accurate else 'OFF'}",
                flush=True,
            )
            del inputs
            torch.cuda.empty_cache()

    write_json(
        args.out,
        {
            "command": command("python benchmarks/fused_experts_gpu.py"),
            "device": name,
            "torch": torch.__version__,
            "triton": fe.triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "shapes": {"hidden": h, "inter": i, "experts": e, "top_k": k, "dtype": "bfloat16"},
            "moe_layers_per_graph": layers,
            "max_fused_pairs": fe.MAX_FUSED_PAIRS,
            "hbm_peak_TBps": peak_tbps,
            "note": "time per MoE layer of the routed experts alone (no router, no shared "
            "expert), CUDA-graph replays; each layer has its own weights",
            "ok": ok,
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "results": results,
        },
    )
    print(f"{'ok' if ok else 'FUSED OUTPUT OFF'}; wrote {args.out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
