"""Where the GPU time of the decoder goes: prefill per experts implementation, and decode.

Full-size decoder, random weights, bf16. Three prefills of `--seq` tokens under
the torch profiler, per experts implementation; then ten CUDA-graph decode
steps after a `--context`-token prefill (our experts). Prints GPU time per
prefill or step, kernels per step, and the top operators by GPU time (totals
over the profiled calls).

    python benchmarks/decoder_profile.py > benchmarks/results/decoder_profile_gpu.txt
"""

from __future__ import annotations

import argparse
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from optical_memory.backends.deepseek_ocr.configuration import DecoderConfig
from optical_memory.backends.deepseek_ocr.experts import EXPERTS_IMPLEMENTATION
from optical_memory.backends.deepseek_ocr.modeling_decoder import DeepseekOCRDecoder
from optical_memory.backends.deepseek_ocr.runtime import DecodeStep


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experts", nargs="+", default=["grouped_mm", EXPERTS_IMPLEMENTATION])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--context", type=int, default=6061, help="positions before decoding")
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()
    device = torch.device("cuda")
    with device:
        dec = DeepseekOCRDecoder(DecoderConfig(), "sdpa").to(torch.bfloat16).eval()
    emb = torch.randn(1, args.seq, dec.config.hidden_size, device=device, dtype=torch.bfloat16)
    for impl in args.experts:
        dec.model.config._experts_implementation = impl
        for _ in range(3):  # warm-up
            dec.model(inputs_embeds=emb, use_cache=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                dec.model(inputs_embeds=emb, use_cache=False)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # not the aten ops
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / 3
        print(f"\n== experts {impl}: {gpu_ms:.1f} ms GPU time per {args.seq}-token prefill")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))

    dec.model.config._experts_implementation = EXPERTS_IMPLEMENTATION
    emb = emb[:, : args.context]
    step = DecodeStep(dec, batch=1)
    token = step.prefill(emb, torch.arange(args.context, device=device)[None]).argmax(-1)[:, None]
    for i in range(15):
        if i == 5:  # the first calls capture the graph
            torch.cuda.synchronize()
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.start()
        token = step(token, torch.full_like(token, args.context + i)).argmax(-1)[:, None]
    torch.cuda.synchronize()
    prof.stop()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / 10
    launches = sum(e.count for e in kernels) / 10
    print(
        f"\n== decode step (CUDA graph, batch 1, after {args.context} positions): "
        f"{gpu_ms:.2f} ms GPU time, {launches:.0f} kernels per step"
    )
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
