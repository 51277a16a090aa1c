"""The decode-path check every GPU benchmark run makes (and fails on): teacher-forced logits.

Every decode path is fed the same ids, the greedy ids of the CUDA-graph step
(the path generation takes on the GPU): the same static-cache step launched
eagerly, transformers' DynamicCache steps, and the continuous-batching
scheduler (paged cache, Triton attention) with the request batched among
others of other lengths. Each path's logits, step by step, must be within the
bf16 tolerance of the equivalence harness of the graph's, and pick the same
argmax wherever the graph's top-2 margin is wider than twice the difference
between the two paths (a narrower margin is a tie at bf16 precision).

Why teacher-forced: comparing free-running greedy ids compares two different
sequences as soon as one near-tie falls the other way; every later logit then
belongs to another text and the relative difference is of order 1. The
free-running comparison is still reported (`free_running_graph_vs_eager`),
with the step where the ids first part and the graph's top-2 margin there.

    from decode_check import check_decode_paths
    report = check_decode_paths(decoder, context=6061)   # report["ok"]
"""

from __future__ import annotations

import torch

from optical_memory.backends.deepseek_ocr.context import DecoderInputs
from optical_memory.backends.deepseek_ocr.generation import GenerationConfig
from optical_memory.backends.deepseek_ocr.runtime import DecodeStep
from optical_memory.backends.deepseek_ocr.scheduler import Scheduler

# Twice the reference's own bf16 error against its float32 logits
# (results/equivalence_decoder_gpu_bfloat16.json: tolerances 0.056 and 0.060).
BF16_TOLERANCE = 0.056


def random_inputs(
    length: int, hidden: int, device, dtype, generator: torch.Generator
) -> DecoderInputs:
    """A context of `length` random embeddings (unit scale), as the assembler would give it."""
    emb = torch.randn(1, length, hidden, generator=generator).to(device, dtype)
    ids = torch.zeros(1, length, dtype=torch.long, device=device)
    return DecoderInputs(
        input_ids=ids,
        inputs_embeds=emb,
        attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(length, device=device)[None],
        image_mask=torch.zeros_like(ids, dtype=torch.bool),
        page_spans=[],
    )


@torch.no_grad()
def _static_step(dec, inputs: DecoderInputs, ids: list[int] | None, steps: int, graph: bool):
    """(ids, logits) of the static-cache DecodeStep: free-running greedy when `ids` is None,
    else fed `ids`."""
    step = DecodeStep(dec, batch=1)
    step.use_graph = step.use_graph and graph
    logits = step.prefill(inputs.inputs_embeds, inputs.position_ids)
    out_ids, out_logits = [], [logits.float()]
    for i in range(steps):
        token = int(logits.argmax(-1)) if ids is None else ids[i]
        out_ids.append(token)
        t = torch.tensor([[token]], device=dec.device)
        logits = step(t, torch.full_like(t, inputs.length + i))
        out_logits.append(logits.float())
    return out_ids, out_logits


@torch.no_grad()
def _dynamic(dec, inputs: DecoderInputs, ids: list[int]):
    cache = dec.new_cache()
    out = [dec(inputs.inputs_embeds, cache=cache, logits_to_keep=1)[:, -1].float()]
    for i, token in enumerate(ids):
        pos = torch.full((1, 1), inputs.length + i, device=dec.device, dtype=torch.long)
        t = torch.tensor([[token]], device=dec.device)
        out.append(dec(dec.embed_tokens(t), position_ids=pos, cache=cache)[:, -1].float())
    return out


def _scheduled(dec, inputs: DecoderInputs, ids: list[int], others: list[DecoderInputs]):
    """Teacher-forced through the scheduler, batched with `others` (free-running)."""
    total = sum(o.length + len(ids) + 1 for o in [inputs, *others])
    scheduler = Scheduler(dec, eos_id=-1, max_batch=8, kv_cache_tokens=total + 1024)
    config = GenerationConfig(max_new_tokens=len(ids) + 1)
    handles = [scheduler.submit(o, config) for o in others[: len(others) // 2]]
    forced = scheduler.submit(inputs, config, forced_ids=[*ids, 0], record_logits=True)
    handles += [scheduler.submit(o, config) for o in others[len(others) // 2 :]]
    forced.result()
    for h in handles:
        h.result()
    scheduler.close()
    return [x.to(dec.device) for x in forced.request.logits[: len(ids) + 1]]


def compare(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """Max relative difference (max |a - b| / max |b| per step) and argmax agreement on steps
    whose reference top-2 margin exceeds twice the difference."""
    rel, decisive, agree, ties = 0.0, 0, 0, 0
    for a, b in zip(logits, reference, strict=True):
        diff = float((a - b).abs().max())
        rel = max(rel, diff / float(b.abs().max()))
        top2 = b[0].topk(2).values
        if float(top2[0] - top2[1]) > 2 * diff:
            decisive += 1
            agree += int(a.argmax() == b.argmax())
        else:
            ties += 1
    return {"max_rel": rel, "decisive_steps": decisive, "argmax_agree": agree, "tie_steps": ties}


def check_decode_paths(
    dec,
    context: int,
    steps: int = 32,
    tolerance: float = BF16_TOLERANCE,
    other_lengths: tuple[int, ...] = (300, 2000, 5000),
    seed: int = 0,
) -> dict:
    """Teacher-forced check of every decode path against the CUDA-graph step (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = dec.config.hidden_size
    room = dec.config.max_position_embeddings - steps - 2
    inputs = random_inputs(min(context, room), hidden, dec.device, dec.dtype, gen)
    others = [
        random_inputs(min(n, room), hidden, dec.device, dec.dtype, gen) for n in other_lengths
    ]
    ids, graph = _static_step(dec, inputs, None, steps, graph=True)
    paths = {
        "eager_static_cache": _static_step(dec, inputs, ids, steps, graph=False)[1],
        "dynamic_cache": _dynamic(dec, inputs, ids),
        "scheduler_batched": _scheduled(dec, inputs, ids, others),
    }
    report: dict = {"context": inputs.length, "steps": steps, "tolerance": tolerance, "paths": {}}
    ok = True
    for name, logits in paths.items():
        r = compare(logits, graph)
        r["ok"] = r["max_rel"] <= tolerance and r["argmax_agree"] == r["decisive_steps"]
        ok &= r["ok"]
        report["paths"][name] = r
    # the comparison the old check made: two free-running greedy runs
    eager_ids, eager_logits = _static_step(dec, inputs, None, steps, graph=False)
    parted = next((i for i, (a, b) in enumerate(zip(ids, eager_ids)) if a != b), None)
    free = {
        "ids_identical": parted is None,
        "logits_max_rel": compare(eager_logits, graph)["max_rel"],
    }
    if parted is not None:
        top2 = graph[parted][0].topk(2).values
        free["first_differing_step"] = parted
        free["graph_top2_margin_there"] = float(top2[0] - top2[1])
        free["teacher_forced_abs_diff_there"] = float(
            (paths["eager_static_cache"][parted] - graph[parted]).abs().max()
        )
    report["free_running_graph_vs_eager"] = free
    report["ok"] = ok
    return report
