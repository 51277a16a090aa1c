"""Why bfloat16 greedy ids can differ from float32 from the first step on.

Loads one random checkpoint (written as `equivalence_decoder.py` writes it, seed 0)
in float32 and in bfloat16, and records for the one-Gundam-page prompt the float32
top-5 logits at the last position, the bfloat16 logits of the same tokens, and the
first generated ids of both. A float32 top-2 margin below the bfloat16 spacing at
that magnitude (1/32 for logits in [4, 8)) makes the first token a tie in bfloat16.

    python3 benchmarks/bf16_first_token.py OUT.json LAYERS EXPERTS DEVICE
"""

import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import equivalence_decoder as e

from optical_memory.model import PageImage, load_model

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
out, layers, experts, dev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ck = Path("/tmp/diag_ck")
if not (ck / "config.json").is_file():
    e.write_random_checkpoint(ck, layers, experts, 0)
im = e.make_images()
seg = [PageImage(im[0], "gundam"), e.PROMPT_TAIL]
res = {}
for dt in [torch.float32, torch.bfloat16]:
    m = load_model(ck, dev, dt)
    with torch.no_grad():
        res[str(dt)] = (m.logits(seg)[-1].float().cpu(), m.generate_ids(seg, max_new_tokens=3))
    del m
l32, g32 = res["torch.float32"]
l16, g16 = res["torch.bfloat16"]
top = l32.topk(5)
r = {
    "layers": layers,
    "experts": experts,
    "device": dev,
    "fp32_top5": top.indices.tolist(),
    "fp32_top5_values": top.values.tolist(),
    "bf16_at_fp32_top5": l16[top.indices].tolist(),
    "fp32_top2_margin": float(top.values[0] - top.values[1]),
    "bf16_argmax": int(l16.argmax()),
    "bf16_max": float(l16.max()),
    "bf16_last_position_max_abs_error": float((l16 - l32).abs().max()),
    "generated_fp32": g32,
    "generated_bf16": g16,
}
if l16.argmax() not in top.indices:
    r["fp32_at_bf16_argmax"] = float(l32[l16.argmax()])
Path(out).write_text(json.dumps(r, indent=1) + "\n")
print(json.dumps(r))
