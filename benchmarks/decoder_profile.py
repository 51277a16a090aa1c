"""Where the GPU time of one decoder prefill goes, per experts implementation.

Full-size decoder, random weights, bf16, three prefills of `--seq` tokens under
the torch profiler; prints GPU time per prefill and the top operators by GPU
time (totals over the three prefills).

    python benchmarks/decoder_profile.py --experts grouped_mm optical_memory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optical_memory.model.decoder import DecoderConfig, DeepseekOCRDecoder


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experts", nargs="+", default=["grouped_mm", "optical_memory"])
    ap.add_argument("--seq", type=int, default=8192)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
