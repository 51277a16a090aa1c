"""DeepEncoder throughput on a GPU: pages/s per mode and batch size, against the reference, same run.

Full-size encoder, random weights, bf16. For each mode and batch size: pages/s
of `Encoder.encode_views` (uint8 upload, normalisation, forward, token layout;
the CPU-side PIL preprocessing is timed separately), the FLOPs per page we
count, the fraction of the bf16 matmul peak measured in the same run, and peak
GPU memory. The reference DeepEncoder modules (SAM, CLIP, projector from the
directory given with --reference) are fed the same batches of normalised views
in bf16 - the most favourable way to run them - and timed the same way.

    python benchmarks/encoder_gpu.py --reference .reference/encoder \
        --out benchmarks/results/encoder_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers
from common import command, matmul_peak_tflops, reference_encoder, text_page, write_json
from PIL import Image

from optical_memory.backends.deepseek_ocr import Encoder, EncoderConfig, make_views
from optical_memory.backends.deepseek_ocr.configuration import SamConfig
from optical_memory.backends.deepseek_ocr.preprocess import Views, normalize
from optical_memory.backends.deepseek_ocr.testing import random_encoder_tensors
from optical_memory.modes import MODES, get_mode

# a page size per mode; Gundam's 1280x1280 page gets a 2x2 grid of 640 tiles (693 tokens)
PAGE_SIZES = {name: (1024, 1280) for name in MODES} | {"gundam": (1280, 1280)}


def sam_flops(sam: SamConfig, side: int) -> float:
    """Multiply-add FLOPs (x2) of SAM + neck + the two stride-2 convs on a side x side view."""
    g = side // sam.patch_size
    n, c = g * g, sam.width
    head = c // sam.heads
    linear = 2 * n * c * c * (3 + 1 + 2 * sam.mlp_ratio) * sam.layers
    windows = math.ceil(g / sam.window_size) ** 2
    w2 = sam.window_size**2
    n_global = len(sam.global_attn_indexes)
    attention = 4 * n * n * c * n_global + 4 * windows * w2 * w2 * c * (sam.layers - n_global)
    rel_pos = (
        2 * n * 2 * g * head * sam.heads * n_global
        + 2 * windows * w2 * 2 * sam.window_size * c * (sam.layers - n_global)
    )
    patch = 2 * n * 3 * sam.patch_size**2 * c
    neck = 2 * n * c * sam.out_channels + 2 * n * sam.out_channels**2 * 9
    c1, c2 = sam.downsample_channels
    convs = 2 * (n // 4) * sam.out_channels * 9 * c1 + 2 * (n // 16) * c1 * 9 * c2
    return linear + attention + rel_pos + patch + neck + convs


def view_flops(config: EncoderConfig, side: int) -> float:
    """FLOPs of one view through SAM, CLIP and the projector."""
    clip = config.clip
    tokens = (side // 64) ** 2
    t = tokens + 1
    clip_flops = clip.layers * (
        2 * t * (4 * clip.width**2 + 2 * clip.width * clip.intermediate_size)
    )
    clip_flops += clip.layers * 4 * t * t * clip.width
    projector = 2 * tokens * config.projector.input_dim * config.projector.n_embed
    return sam_flops(config.sam, side) + clip_flops + projector


def page_flops(config: EncoderConfig, mode_name: str) -> float:
    mode = get_mode(mode_name)
    across, down = mode.tile_grid(*PAGE_SIZES[mode_name])
    tiles = across * down if (across, down) != (1, 1) else 0
    return view_flops(config, mode.base_size) + tiles * view_flops(config, mode.tile_size)


def test_page(width: int, height: int) -> Image.Image:
    return text_page(width, height, margin=16, line_height=20, left=24)


def timed(fn: Callable[[], object], min_seconds: float, min_iters: int = 3) -> float:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < min_seconds:
        fn()
        n += 1
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def profile(fn: Callable[[], object], title: str) -> None:
    """Print the kernels that take the most GPU time in one call of `fn` (after warm-up)."""
    timed(fn, 0.0, min_iters=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- {title}")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70)
    )


def matmul_peak(min_seconds: float) -> float:
    return matmul_peak_tflops(lambda fn: timed(fn, min_seconds, min_iters=20))


def measure(fn: Callable[[], object], batch: int, min_seconds: float) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        fn()
        first_call = time.perf_counter() - start
        seconds = timed(fn, min_seconds)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}
    except Exception as exc:  # noqa: BLE001 (a failing variant is recorded, the others still run)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return {
        "first_call_s": first_call,
        "pages_per_s": batch / seconds,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "activation_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
    }


def reference_forward(ref_dir: Path, tensors: dict[str, torch.Tensor]) -> Callable:
    """The reference SAM, CLIP and projector with our random weights, bf16 on the GPU."""
    sam, clip, projector, _ = reference_encoder(ref_dir, tensors)
    for module in (sam, clip, projector):
        module.to("cuda", torch.bfloat16).eval()

    @torch.inference_mode()
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        features_1 = sam(pixels)
        features_2 = clip(pixels, features_1)
        features = torch.cat((features_2[:, 1:], features_1.flatten(2).permute(0, 2, 1)), dim=-1)
        return projector(features)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference", type=Path, help="directory holding the reference deepencoder.py"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoder_gpu.json"))
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["fast", "transformers"],
        help="SAM implementation of ours (fast, transformers), optionally +compile (Encoder.compile) "
        "and/or +graphs (Encoder.enable_cuda_graphs)",
    )
    parser.add_argument("--profile", nargs=2, metavar=("MODE", "BATCH"), help="print top kernels")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("encoder_gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True

    config = EncoderConfig()
    peak = matmul_peak(args.min_seconds)
    print(f"bf16 matmul peak: {peak:.0f} TFLOP/s", flush=True)
    tensors = random_encoder_tensors(config)
    host_views = {m: make_views(test_page(*PAGE_SIZES[m]), m) for m in args.modes}
    # views already on the GPU as uint8, like the reference's pixels: the model is measured,
    # not the host-to-device copy (timed once separately, "host views" rows)
    views = {
        m: Views(v.global_view.cuda(), v.tiles.cuda(), v.tile_grid) for m, v in host_views.items()
    }

    preprocess = {}
    for mode in args.modes:
        page = test_page(*PAGE_SIZES[mode])
        start, n = time.perf_counter(), 5
        for _ in range(n):
            make_views(page, mode)
        preprocess[mode] = n / (time.perf_counter() - start)

    rows = []
    for variant in args.variants:
        encoder = Encoder.from_tensors(
            config,
            tensors,
            "cuda",
            torch.bfloat16,
            sam_implementation=variant.split("+")[0],
            cuda_graphs="+graphs" in variant,
        )
        if "+compile" in variant:
            encoder.compile()
        if args.profile:
            mode, batch = args.profile[0], int(args.profile[1])
            profile(partial(encoder.encode_views, [views[mode]] * batch), f"ours ({variant})")
        for mode in args.modes:
            for batch in args.batches:
                batch_views = [views[mode]] * batch
                result = measure(
                    partial(encoder.encode_views, batch_views), batch, args.min_seconds
                )
                rows.append({"impl": f"ours ({variant})", "mode": mode, "batch": batch, **result})
                print(json.dumps(rows[-1]), flush=True)
            if variant == args.variants[0]:
                batch = max(args.batches)
                batch_views = [host_views[mode]] * batch
                result = measure(
                    partial(encoder.encode_views, batch_views), batch, args.min_seconds
                )
                rows.append(
                    {
                        "impl": f"ours ({variant}), host views",
                        "mode": mode,
                        "batch": batch,
                        **result,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        del encoder
        torch.cuda.empty_cache()

    if args.reference:
        forward = reference_forward(args.reference, tensors)
        if args.profile:
            v, batch = views[args.profile[0]], int(args.profile[1])
            pixels = normalize(v.global_view.cuda(), torch.bfloat16)
            profile(partial(forward, pixels.expand(batch, -1, -1, -1).contiguous()), "reference")
        for mode in args.modes:
            v = views[mode]
            for batch in args.batches:
                pixels = normalize(v.global_view.cuda(), torch.bfloat16)
                pixels = pixels.expand(batch, -1, -1, -1).contiguous()
                tiles = None
                if v.tiles.shape[0]:
                    tiles = normalize(v.tiles.cuda(), torch.bfloat16).repeat(batch, 1, 1, 1)

                def run(pixels=pixels, tiles=tiles):
                    out = forward(pixels)
                    return out if tiles is None else (out, forward(tiles))

                result = measure(run, batch, args.min_seconds)
                rows.append({"impl": "reference", "mode": mode, "batch": batch, **result})
                print(json.dumps(rows[-1]), flush=True)

    for row in rows:
        row["gflop_per_page"] = page_flops(config, row["mode"]) / 1e9
        if "pages_per_s" in row:
            tflops = row["pages_per_s"] * row["gflop_per_page"] / 1e3
            row["tflop_per_s"] = tflops
            row["fraction_of_peak"] = tflops / peak
    reference = {(r["mode"], r["batch"]): r for r in rows if r["impl"] == "reference"}
    for row in rows:
        ref = reference.get((row["mode"], row["batch"]))
        if row["impl"] != "reference" and ref and "pages_per_s" in ref and "pages_per_s" in row:
            row["speedup_vs_reference"] = row["pages_per_s"] / ref["pages_per_s"]

    result = {
        "what": "DeepEncoder pages/s, full size, random weights, bf16; reference measured in the same run",
        "command": command("python", sys.argv[0]),
        "machine": {
            "gpu": torch.cuda.get_device_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "bf16_matmul_peak_tflops": peak,
        "page_sizes": {m: list(PAGE_SIZES[m]) for m in args.modes},
        "cpu_preprocess_pages_per_s_one_thread": preprocess,
        "rows": rows,
        "compile_note": "+compile rows: first two calls (warm-up, untimed) include compilation",
    }
    write_json(args.out, result, indent=1)
    print("->", args.out)


if __name__ == "__main__":
    main()
