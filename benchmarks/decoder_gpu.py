"""Decoder cost on a GPU: prefill, KV cache and decode of an optical context vs plain text.

Full-size DeepSeek-3B-MoE decoder (official shapes), random weights, bf16.
Measured in one run, so ratios compare like with like:

- the bf16 matmul peak of this GPU (8192^3 GEMM), for the fraction of peak;
- prefill of 8192 tokens with transformers' own DeepSeek-OCR-2 text model as it
  comes (its default experts implementation), the baseline, and with our decoder
  under each experts implementation of `--experts` (transformers' `grouped_mm`
  and ours);
- prefill latency and KV-cache bytes of an optical context (N Base pages of 273
  vision tokens + text turns) and of the same conversation kept as plain text
  (pages x text tokens per page + the same turns), the latter past the 8192
  window only as a cost figure;
- decode tokens/s at batch 1 and 8 after that optical context: steps launched
  eagerly over transformers' DynamicCache, and (ours) CUDA-graph steps over the
  static window cache;
- continuous batching (`--sections scheduler`): 1 to 64 requests of 6000-8000
  positions at once through one `Scheduler`, against one at a time;
- the decode check (decode_check.py): every decode path teacher-forced on the
  CUDA-graph step's ids, logits within the bf16 tolerance; the run exits 1 when
  it is off.

    python benchmarks/decoder_gpu.py --out benchmarks/results/decoder_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import torch
import transformers
from common import command, matmul_peak_tflops, write_json
from decode_check import check_decode_paths, random_inputs
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2TextModel

from optical_memory.backends.deepseek_ocr.configuration import DecoderConfig
from optical_memory.backends.deepseek_ocr.experts import EXPERTS_IMPLEMENTATION
from optical_memory.backends.deepseek_ocr.generation import GenerationConfig, generate_ids
from optical_memory.backends.deepseek_ocr.modeling_decoder import DeepseekOCRDecoder
from optical_memory.backends.deepseek_ocr.scheduler import Scheduler
from optical_memory.modes import get_mode

ACTIVE_PARAMS_NOTE = "embedding lookup excluded; LM head on the last position only"


DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of `fn` in milliseconds, CUDA-synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def prefill_flops(cfg: DecoderConfig, seq: int) -> float:
    """Matmul FLOPs of one prefill of `seq` tokens (active experts only, causal attention)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    attn_proj = 4 * h * h  # q, k, v, o (plain MHA, head_dim * heads == hidden)
    n_dense = cfg.first_k_dense_replace
    dense_mlp = 3 * h * cfg.intermediate_size
    moe_mlp = 3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    router = h * cfg.n_routed_experts
    per_token = layers * attn_proj + n_dense * dense_mlp + (layers - n_dense) * (moe_mlp + router)
    attention = layers * 2 * 2 * h * seq * seq / 2  # QK^T and PV, causal half
    lm_head = 2 * h * cfg.vocab_size  # last position only
    return 2 * per_token * seq + attention + lm_head


def active_params(cfg: DecoderConfig) -> int:
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    n_dense = cfg.first_k_dense_replace
    moe = 3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    return (
        layers * 4 * h * h
        + n_dense * 3 * h * cfg.intermediate_size
        + (layers - n_dense) * (moe + h * cfg.n_routed_experts)
        + h * cfg.vocab_size
    )


def build(cfg: DecoderConfig) -> DeepseekOCRDecoder:
    with DEVICE:
        dec = DeepseekOCRDecoder(cfg, "sdpa")
    return dec.to(torch.bfloat16).eval()


@torch.no_grad()
def prefill_ms(dec: DeepseekOCRDecoder, seq: int, batch: int = 1) -> float:
    emb = torch.randn(batch, seq, dec.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    return timed(lambda: dec(emb, cache=dec.new_cache(), logits_to_keep=1))


@torch.no_grad()
def text_model_prefill_ms(model: DeepseekOcr2TextModel, seq: int) -> float:
    """transformers' text model alone (no LM head), as the published baseline was measured."""
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=DEVICE)
    return timed(lambda: model(input_ids=ids, use_cache=False))


@torch.no_grad()
def decode_tokens_per_s(
    dec: DeepseekOCRDecoder, context: int, batch: int, graphs: bool, steps: int = 64
) -> float:
    """Greedy tokens/s after a `context`-long prefill: CUDA-graph decode steps over the static
    window cache (`graphs`), or each step launched eagerly over transformers' DynamicCache."""
    emb = torch.randn(batch, context, dec.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.arange(context, device=DEVICE).expand(batch, context)

    def run_graphs() -> None:
        with dec.decode_step(batch) as step:
            token = step.prefill(emb, positions).argmax(-1, keepdim=True)
            for i in range(steps):
                token = step(token, torch.full_like(token, context + i)).argmax(-1, keepdim=True)

    def run_eager() -> None:
        cache = dec.new_cache()
        token = dec(emb, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            pos = torch.full((batch, 1), context + i, device=DEVICE, dtype=torch.long)
            logits = dec(dec.embed_tokens(token), position_ids=pos, cache=cache)
            token = logits[:, -1].argmax(-1, keepdim=True)

    total = timed(run_graphs if graphs else run_eager, warmup=1, iters=3)
    only_prefill = timed(lambda: dec(emb, cache=dec.new_cache(), logits_to_keep=1), 1, 3)
    return batch * steps / ((total - only_prefill) * 1e-3)


def scheduler_tokens_per_s(
    dec: DeepseekOCRDecoder,
    batch: int,
    lengths: tuple[int, int],
    steps: int,
    compile_step: bool = False,
) -> dict:
    """Continuous batching: `batch` requests of random lengths in `lengths` submitted at once,
    `steps` tokens each, through one Scheduler (paged cache, Triton attention, CUDA graphs)."""
    gen = torch.Generator().manual_seed(batch)
    hidden = dec.config.hidden_size
    sizes = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=gen).tolist()
    inputs = [random_inputs(n, hidden, DEVICE, dec.dtype, gen) for n in sizes]
    kv = sum(n + steps for n in sizes) + 64 * batch + 1024  # each request rounds up to a block
    sched = Scheduler(
        dec, eos_id=-1, max_batch=max(batch, 1), kv_cache_tokens=kv, compile_step=compile_step
    )
    start = time.perf_counter()
    sched.warmup()
    warm_s = time.perf_counter() - start
    config = GenerationConfig(max_new_tokens=steps)
    sync()
    start = time.perf_counter()
    handles = [sched.submit(x, config) for x in inputs]
    for h in handles:
        h.result()
    sync()
    total = time.perf_counter() - start
    reqs = [h.request for h in handles]
    stats = {
        "decode_steps": sched.steps,
        "mean_rows_per_step": sched.step_rows / max(1, sched.steps),
        "tokens_per_s_in_decode_steps": sched.step_rows / sched.decode_seconds,
        "decode_step_ms": 1e3 * sched.decode_seconds / max(1, sched.steps),
        "prefill_ms_per_request": 1e3 * sched.prefill_seconds / batch,
    }
    last_first = max(r.first_token for r in reqs) - start
    decode_s = max(r.finished for r in reqs) - max(r.first_token for r in reqs)
    out = {
        "batch": batch,
        "context_lengths": [min(sizes), max(sizes)],
        "steps": steps,
        "tokens_per_s_end_to_end": batch * steps / total,
        "tokens_per_s_after_last_first_token": batch * (steps - 1) / decode_s
        if decode_s > 0
        else None,
        **stats,
        "seconds": total,
        "prefills_done_s": last_first,
        "warmup_s": warm_s,
        "kv_cache_gib": sched.kv_cache_bytes / 2**30,
        "max_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if DEVICE.type == "cuda"
        else None,
    }
    sched.close()
    del sched
    return out


@torch.no_grad()
def prefill_new_lengths(dec: DeepseekOCRDecoder, length: int, n: int = 4) -> dict:
    """Prefill ms of `n` prompts of lengths not seen before, then of the last length again,
    with SDPA's default choice (cuDNN on Hopper) and with flash attention only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backends in (
        ("default", None),
        ("flash", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]),
    ):
        times = []
        for i in range(n + 1):
            seq = length + (i if i < n else n - 1) + (0 if name == "default" else 2 * n)
            emb = torch.randn(1, seq, dec.config.hidden_size, device=DEVICE, dtype=dec.dtype)
            ctx = sdpa_kernel(backends) if backends else torch.no_grad()
            with ctx:
                sync()
                start = time.perf_counter()
                dec(emb, cache=dec.new_cache(), logits_to_keep=1)
                sync()
            times.append((time.perf_counter() - start) * 1e3)
        out[name] = {"new_length_ms": times[:n], "same_length_again_ms": times[n]}
    return out


def alone_tokens_per_s(dec: DeepseekOCRDecoder, length: int, steps: int, n: int = 2) -> float:
    """One request at a time through the single-request path (CUDA-graph DecodeStep)."""
    gen = torch.Generator().manual_seed(7)
    inputs = [
        random_inputs(length, dec.config.hidden_size, DEVICE, dec.dtype, gen) for _ in range(n)
    ]
    eos = -1
    config = GenerationConfig(max_new_tokens=steps)
    list(generate_ids(dec, inputs[0], config, eos))  # warm-up (captures the graph)
    sync()
    start = time.perf_counter()
    for x in inputs:
        list(generate_ids(dec, x, config, eos))
    sync()
    return n * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="benchmarks/results/decoder_gpu.json")
    ap.add_argument("--pages", type=int, default=20, help="Base pages in the optical context")
    ap.add_argument("--turns", type=int, default=10, help="recent text turns kept as text")
    ap.add_argument("--tokens-per-turn", type=int, default=60)
    ap.add_argument(
        "--text-tokens-per-page",
        type=int,
        default=2560,
        help="text tokens a Base page holds (default: 10x its 256 grid tokens, the ratio at which "
        "the DeepSeek-OCR paper reports ~97%% precision)",
    )
    ap.add_argument("--experts", nargs="+", default=["grouped_mm", EXPERTS_IMPLEMENTATION])
    ap.add_argument(
        "--small",
        action="store_true",
        help="a reduced decoder on any device: checks the script only",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument(
        "--sections",
        nargs="+",
        default=["baseline", "experts", "check", "scheduler"],
        help="what to run; the decode check runs whenever 'experts' or 'scheduler' does",
    )
    ap.add_argument("--scheduler-batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--scheduler-lengths", nargs=2, type=int, default=[6000, 8000])
    ap.add_argument("--scheduler-steps", type=int, default=128)
    ap.add_argument(
        "--compile-step",
        action="store_true",
        help="also measure the scheduler's step compiled with torch.compile (batch 1, one bucket)",
    )
    args = ap.parse_args(argv)
    sections = set(args.sections)
    if sections & {"experts", "scheduler"}:
        sections.add("check")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decoder_gpu.py: CUDA is not available")
    cfg = DecoderConfig()
    if args.small:
        cfg = DecoderConfig(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
        )
    base = get_mode("base").vision_tokens()
    text_turns = args.turns * args.tokens_per_turn
    optical_len = 1 + args.pages * base + text_turns
    plain_len = 1 + args.pages * args.text_tokens_per_page + text_turns
    result: dict = {
        "machine": torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": command("python", sys.argv[0], argv=argv),
        "decoder": cfg.to_dict(),
        "active_params": active_params(cfg),
        "active_params_note": ACTIVE_PARAMS_NOTE,
        "matmul_peak_tflops": matmul_peak_tflops(
            lambda fn: timed(fn, warmup=3, iters=10) * 1e-3, 512 if args.small else 8192, DEVICE
        ),
    }
    print(json.dumps(result, indent=1), flush=True)

    if "baseline" in sections:
        baseline_section(result, cfg, args)
    dec = build(cfg)
    if "check" in sections:
        # The teacher-forced check of every decode path (decode_check.py); the run fails on it.
        result["decode_check"] = check_decode_paths(
            dec, min(optical_len, cfg.max_position_embeddings - 64), steps=32
        )
        print("decode_check", json.dumps(result["decode_check"]), flush=True)
    if "scheduler" in sections:
        scheduler_section(result, dec, args)
    if "experts" in sections:
        experts_section(result, dec, cfg, args, optical_len, plain_len, base)
    write_json(args.out, result, indent=1)
    if "decode_check" in result and not result["decode_check"]["ok"]:
        print("decoder_gpu.py: FAILED: a decode path is off (decode_check)", file=sys.stderr)
        return 1
    return 0


def scheduler_section(result: dict, dec: DeepseekOCRDecoder, args) -> None:
    lengths = tuple(args.scheduler_lengths)
    mid = sum(lengths) // 2
    steps = args.scheduler_steps
    r: dict = {
        "prefill_new_lengths": prefill_new_lengths(dec, mid),
        "what": "requests of random context lengths submitted at once to one Scheduler "
        "(paged KV cache, Triton decode attention, CUDA-graph steps per batch bucket); "
        f"{steps} greedy tokens each; the baseline runs requests one at a time through the "
        "single-request CUDA-graph DecodeStep, same run",
        "alone_tokens_per_s": alone_tokens_per_s(dec, mid, steps),
        "batches": [],
    }
    for b in args.scheduler_batches:
        r["batches"].append(scheduler_tokens_per_s(dec, b, lengths, steps))
        print("scheduler", json.dumps(r["batches"][-1]), flush=True)
    if args.compile_step:
        r["compiled_step"] = []
        for b in (1,):
            try:
                r["compiled_step"].append(
                    scheduler_tokens_per_s(dec, b, lengths, steps, compile_step=True)
                )
            except Exception as exc:  # noqa: BLE001 - recorded, the rest of the run goes on
                r["compiled_step"].append({"batch": b, "error": repr(exc)[:500]})
            print("scheduler compiled", json.dumps(r["compiled_step"][-1]), flush=True)
    result["scheduler"] = r


def baseline_section(result: dict, cfg: DecoderConfig, args) -> None:
    # Baseline: transformers' own text model as it comes (its default experts implementation).
    hf_config = cfg.to_transformers()
    hf_config._attn_implementation = "sdpa"
    with DEVICE:
        baseline = DeepseekOcr2TextModel(hf_config).to(torch.bfloat16).eval()
    result["baseline"] = {
        "what": "transformers DeepseekOcr2TextModel, default experts implementation, SDPA, "
        "input_ids, no LM head",
        "experts_implementation": baseline.config._experts_implementation,
        "prefill_len": args.prefill_len,
        "prefill_ms": text_model_prefill_ms(baseline, args.prefill_len),
        "prefill_1024_ms": text_model_prefill_ms(baseline, 1024),
    }
    del baseline
    print(json.dumps(result["baseline"]), flush=True)


def experts_section(
    result: dict, dec: DeepseekOCRDecoder, cfg: DecoderConfig, args, optical_len, plain_len, base
) -> None:
    runs = {}
    for impl in args.experts:
        dec.model.config._experts_implementation = impl
        r: dict = {
            "prefill_ms": prefill_ms(dec, args.prefill_len),
            "prefill_1024_ms": prefill_ms(dec, 1024),
        }
        r["prefill_tflops"] = prefill_flops(cfg, args.prefill_len) / (r["prefill_ms"] * 1e-3) / 1e12
        r["fraction_of_matmul_peak"] = r["prefill_tflops"] / result["matmul_peak_tflops"]
        r["optical_prefill_ms"] = prefill_ms(dec, optical_len)
        r["decode_tokens_per_s_eager_steps"] = {
            str(b): decode_tokens_per_s(dec, optical_len, b, graphs=False) for b in (1, 8)
        }
        if impl == EXPERTS_IMPLEMENTATION:
            r["decode_tokens_per_s_graph_steps"] = {
                str(b): decode_tokens_per_s(dec, optical_len, b, graphs=True) for b in (1, 8)
            }
        runs[impl] = r
        print(impl, json.dumps(r), flush=True)
    best = min(runs, key=lambda k: runs[k]["prefill_ms"])
    dec.model.config._experts_implementation = best
    plain_ms = prefill_ms(dec, plain_len) if plain_len <= 65536 else None
    result["experts"] = runs
    result["chosen_experts_implementation"] = best
    if "baseline" in result:
        result["ratio_baseline_over_ours_prefill"] = (
            result["baseline"]["prefill_ms"] / runs[best]["prefill_ms"]
        )
    per_token = cfg.kv_cache_bytes_per_token(torch.bfloat16)
    result["conversation"] = {
        "pages": args.pages,
        "page_mode": "base",
        "vision_tokens_per_page": base,
        "text_turns": args.turns,
        "tokens_per_turn": args.tokens_per_turn,
        "text_tokens_per_page": args.text_tokens_per_page,
        "optical": {
            "positions": optical_len,
            "fits_window": optical_len <= cfg.max_position_embeddings,
            "prefill_ms": runs[best]["optical_prefill_ms"],
            "kv_cache_bytes": optical_len * per_token,
        },
        "plain_text": {
            "positions": plain_len,
            "fits_window": plain_len <= cfg.max_position_embeddings,
            "prefill_ms": plain_ms,
            "kv_cache_bytes": plain_len * per_token,
            "note": "past the 8192 window the model cannot read it; measured for cost only",
        },
    }
    if plain_ms is not None:
        result["conversation"]["prefill_ratio_plain_over_optical"] = (
            plain_ms / runs[best]["optical_prefill_ms"]
        )
    result["conversation"]["kv_ratio_plain_over_optical"] = plain_len / optical_len
    print(json.dumps(result["conversation"], indent=1), flush=True)


if __name__ == "__main__":
    sys.exit(main())
