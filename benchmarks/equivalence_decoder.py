"""Equivalence of the whole model (DeepEncoder + decoder) with the DeepSeek-OCR reference code.

The reference is the Hugging Face remote code of deepseek-ai/DeepSeek-OCR
(modeling_deepseekocr.py, modeling_deepseekv2.py, ...), which needs
transformers 4.46.3: it runs in its own Python (`--reference-python`), imported
from `--reference-code`; nothing of it is part of this project. Both sides load
one random checkpoint directory written here under the official tensor names.

Compared, in `--dtype` on `--device` (each side in its own process; weights,
pixels and logits travel as safetensors files in `--work`):
1. one Gundam page, prompt `<image>\\nFree OCR.`: the reference's own
   preprocessing and tokenization (its `infer`, stopped at `generate`) against
   ours; the first-pass logits; greedy token ids from the reference's
   `generate` against ours for `--steps` steps, and the logits of every step
   (the reference's generation scores against ours teacher-forced along the
   reference's ids, so a near-tie at one step cannot hide the later ones);
2. several pages in mixed modes with text between them: each page's embeddings
   from the reference's vision path, scattered into the reference's input
   embeddings as its forward does, and the logits of its language model.

Both sides get the same pixels (ours, normalised in float32): the reference's
`infer` casts pixels to bfloat16, and that rounding alone would exceed the
tolerance; its bf16 pixels are compared with ours to within bf16 rounding.

In float32 all logits must agree to `--tolerance` (relative to the largest
reference logit) and greedy ids must be identical. In bfloat16 the reference
also runs in float32 on the same device, and the tolerance is twice the
reference's own bfloat16 error against its float32 logits: two bfloat16
implementations, each within e of the exact result, can differ by up to 2e.
With random weights the top two logits can lie closer than e, so free-running
bfloat16 greedy ids are reported, not required: either implementation may
take either branch (`greedy.first_token` records the first step's margin).
The reference's bfloat16 run is its documented use: weights in bfloat16 under
`torch.autocast` (as its `infer` does). TF32 is off on both sides.

    python benchmarks/equivalence_decoder.py --reference-code /work/ref/code \\
        --reference-python /work/ref/venv/bin/python --layers 4
    # GPU, full size; the reference's transformers 4.46.3 in its own --target dir:
    python benchmarks/equivalence_decoder.py --reference-code .reference/hfcode \\
        --reference-python 'env PYTHONPATH=/tmp/ref_site python3' --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from common import REFERENCE_MODES, ROOT, command, write_json
from PIL import Image, ImageDraw

PROMPT_TAIL = "\nFree OCR."
# The multi-page prompt: (kind, value) in order.
MULTI = [
    ("page", ("gundam", 0)),
    ("text", "\nuser: what did we decide about the release?\n"),
    ("page", ("base", 1)),
    ("text", " assistant: Friday. "),
    ("page", ("tiny", 2)),
    ("text", PROMPT_TAIL),
]


def make_images() -> list[Image.Image]:
    """Deterministic test pages: a wide Gundam page (2x1 tiles), a tall one, a small one."""
    images = []
    for i, size in enumerate([(1300, 700), (800, 1100), (600, 500)]):
        img = Image.new("RGB", size, (250, 250, 245))
        draw = ImageDraw.Draw(img)
        for row in range(0, size[1] - 20, 24):
            draw.text(
                (20, row),
                f"page {i} line {row // 24}: the quick brown fox {row * 7 % 97}",
                fill=(0, 0, 0),
            )
        draw.rectangle(
            [size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2], outline=(200, 30, 30), width=5
        )
        images.append(img)
    return images


# --------------------------------------------------------------------------- ours
def write_random_checkpoint(path: Path, layers: int, experts: int, seed: int) -> None:
    from safetensors.torch import save_file

    from optical_memory.backends.deepseek_ocr import EncoderConfig
    from optical_memory.backends.deepseek_ocr.testing import (
        OFFICIAL_DECODER,
        decoder_tensors,
        random_encoder_tensors,
        write_tokenizer,
    )

    lang = {**OFFICIAL_DECODER, "num_hidden_layers": layers, "n_routed_experts": experts}
    enc = EncoderConfig()
    config = {"model_type": "deepseek_vl_v2", "language_config": lang, **lang, **enc.to_dict()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(decoder_tensors(lang, seed), str(path / "decoder.safetensors"))
    save_file(random_encoder_tensors(enc, seed=seed + 1), str(path / "encoder.safetensors"))
    write_tokenizer(path, lang["vocab_size"], image_token_id=128815)
    (path / "config.json").write_text(json.dumps(config, indent=1))


def save_views(images: list[Image.Image], path: Path) -> None:
    """Our preprocessing of every (image, mode) the comparison uses, normalised float32."""
    from safetensors.torch import save_file

    from optical_memory.backends.deepseek_ocr.preprocess import make_views, normalize

    out = {}
    for kind, value in [("page", ("gundam", 0)), *MULTI]:
        if kind != "page":
            continue
        mode, index = value
        views = make_views(images[index], mode)
        key = f"{mode}_{index}"
        out[f"{key}.global"] = normalize(views.global_view[None], torch.float32)
        if views.tiles.shape[0]:
            out[f"{key}.tiles"] = normalize(views.tiles, torch.float32)
            out[f"{key}.grid"] = torch.tensor(views.tile_grid)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))


def run_ours(
    ckpt: Path,
    images: list[Image.Image],
    steps: int,
    device: str,
    dtype: torch.dtype,
    reference_ids: list[int],
) -> dict:
    """Our side; `step_logits` are teacher-forced along the reference's greedy ids."""
    from optical_memory.backends.deepseek_ocr import PageImage, load_model

    model = load_model(ckpt, device, dtype)
    single = [PageImage(images[0], "gundam"), PROMPT_TAIL]
    multi = [PageImage(images[v[1]], v[0]) if k == "page" else v for k, v in MULTI]
    t0 = time.perf_counter()
    single_inputs = model.assemble(single, max_new_tokens=steps)
    forced = torch.tensor([reference_ids[:-1]], device=model.decoder.device)
    embeds = torch.cat([single_inputs.inputs_embeds, model.decoder.embed_tokens(forced)], 1)
    with torch.no_grad():
        step_logits = model.decoder(embeds, logits_to_keep=len(reference_ids))[0]
    out = {
        "single_ids": single_inputs.input_ids[0].tolist(),
        "single_logits": model.logits(single).float().cpu(),
        "generated": model.generate_ids(single, max_new_tokens=steps),
        "step_logits": step_logits.float().cpu(),  # [steps, vocab]
        "multi_ids": model.assemble(multi, max_new_tokens=0).input_ids[0].tolist(),
        "multi_logits": model.logits(multi).float().cpu(),
    }
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------- reference
def _stub_torchvision() -> None:
    """Just what the reference imports: ToTensor, Normalize, Compose, InterpolationMode."""
    import numpy as np

    class ToTensor:
        def __call__(self, img):
            return (
                torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
                / 255
            )

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = (
                torch.tensor(mean)[:, None, None],
                torch.tensor(std)[:, None, None],
            )

        def __call__(self, x):
            return (x - self.mean) / self.std

    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, x):
            for step in self.steps:
                x = step(x)
            return x

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms.ToTensor, transforms.Normalize, transforms.Compose = ToTensor, Normalize, Compose
    functional.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    transforms.functional = functional
    tv.transforms = transforms
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    )


class _Captured(Exception):
    pass


def run_reference(args: argparse.Namespace) -> None:
    """Reference side: writes reference_<dtype>.json/.safetensors into `--work`."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(args.reference_code).resolve()))
    import transformers  # noqa: F401  (imported before any torchvision stub, which it must not see)

    try:
        import torchvision  # noqa: F401
    except ImportError:
        _stub_torchvision()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *a, **k: self  # the reference moves tensors to CUDA inline
    import modeling_deepseekocr as ref
    from transformers import PreTrainedTokenizerFast

    ckpt = Path(args.ckpt)
    work = Path(args.work)
    config = ref.DeepseekOCRConfig.from_pretrained(str(ckpt))
    with device:
        model = ref.DeepseekOCRForCausalLM(config).eval()
    state = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    model.to(dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(ckpt / "tokenizer.json"),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
    )
    views = {k: v.to(device) for k, v in load_file(str(work / "views.safetensors")).items()}
    images = make_images()

    def capture(mode: str, index: int) -> dict:
        """The reference's own prompt ids, mask and pixels for one page (its infer, stopped at generate)."""
        image_file = work / f"page{index}.png"
        images[index].save(image_file)

        def stop(*a, **k):
            raise _Captured(a, k)

        model.generate = stop
        base_size, image_size, crop = REFERENCE_MODES[mode]
        try:
            model.infer(
                tokenizer,
                prompt="<image>" + PROMPT_TAIL,
                image_file=str(image_file),
                output_path=str(work / "ref_out"),
                base_size=base_size,
                image_size=image_size,
                crop_mode=crop,
                eval_mode=True,
            )
        except _Captured as c:
            a, k = c.args
        del model.generate
        crops, ori = k["images"][0]
        key = f"{mode}_{index}"
        ours_ori = views[f"{key}.global"]
        ours_crops = views.get(
            f"{key}.tiles", torch.zeros(1, 3, base_size, base_size, device=device)
        )
        pixel_diff = max(
            float((ori.to(device).float() - ours_ori).abs().max()),
            float((crops.to(device).float() - ours_crops).abs().max())
            if crops.abs().sum()
            else 0.0,
        )
        return {
            "input_ids": a[0],
            "mask": k["images_seq_mask"],
            "crop": k["images_spatial_crop"],
            "images": [(ours_crops.to(dtype), ours_ori.to(dtype))],
            "pixel_max_abs_diff_vs_bf16": pixel_diff,
        }

    captured_embeds: list[torch.Tensor] = []

    def hook(module, a, k):
        captured_embeds.append((a[0] if a else k["hidden_states"]).detach().clone())

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    result: dict = {"missing_keys": list(missing), "unexpected_keys": list(unexpected)}
    tensors: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        single = capture("gundam", 0)
        out = model(
            input_ids=single["input_ids"],
            images=single["images"],
            images_seq_mask=single["mask"],
            images_spatial_crop=single["crop"],
        )
        tensors["single_logits"] = out.logits[0].float().cpu()
        result["single_ids"] = single["input_ids"][0].tolist()
        result["pixel_max_abs_diff_vs_bf16"] = {"gundam_0": single["pixel_max_abs_diff_vs_bf16"]}
        handle.remove()
        gen = model.generate(
            single["input_ids"],
            images=single["images"],
            images_seq_mask=single["mask"],
            images_spatial_crop=single["crop"],
            do_sample=False,
            max_new_tokens=args.steps,
            eos_token_id=1,
            pad_token_id=1,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
        result["generated"] = gen.sequences[0, single["input_ids"].shape[1] :].tolist()
        tensors["step_logits"] = torch.stack(gen.scores)[:, 0].float().cpu()  # [steps, vocab]
        handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)

        # Several pages: each page's embeddings from the reference vision path, then its LM.
        ids, pages = [0], []
        for kind, value in MULTI:
            if kind == "text":
                ids += tokenizer.encode(value, add_special_tokens=False)
                continue
            cap = capture(*value)
            captured_embeds.clear()
            model(
                input_ids=cap["input_ids"],
                images=cap["images"],
                images_seq_mask=cap["mask"],
                images_spatial_crop=cap["crop"],
            )
            emb = captured_embeds[0][0][cap["mask"][0]]
            result["pixel_max_abs_diff_vs_bf16"][f"{value[0]}_{value[1]}"] = cap[
                "pixel_max_abs_diff_vs_bf16"
            ]
            pages.append(emb)
            ids += [128815] * emb.shape[0]
        handle.remove()
        input_ids = torch.tensor([ids], device=device)
        mask = input_ids == 128815
        embeds = model.model.embed_tokens(input_ids)
        embeds[0].masked_scatter_(mask[0].unsqueeze(-1), torch.cat(pages))
        blank = [(torch.zeros(1, 3, 16, 16, device=device, dtype=dtype),) * 2]
        out = model(
            input_ids=input_ids,
            inputs_embeds=embeds,
            images=blank,
            images_seq_mask=mask,
            images_spatial_crop=torch.zeros(1, 2, dtype=torch.long, device=device),
        )
        tensors["multi_logits"] = out.logits[0].float().cpu()
        result["multi_ids"] = ids
    result["seconds"] = time.perf_counter() - t0
    result["steps"], result["device"] = args.steps, str(device)
    stem = work / f"reference_{args.dtype}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- main
def compare_logits(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (ours - ref).abs()
    scale = float(ref.abs().max())
    return {
        "shape": list(ref.shape),
        "max_abs_diff": float(diff.max()),
        "max_abs_reference": scale,
        "relative": float(diff.max()) / scale,
        "argmax_agree": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def identical_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def first_token(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> dict:
    """Why a first greedy token may differ: the exact top-2 margin at the last position
    against both sides' error there (last-position logits [vocab] each; `exact` in float32)."""
    top = exact.topk(2).values
    return {
        "float32_top2_margin": float(top[0] - top[1]),
        "ours_max_abs_error": float((ours - exact).abs().max()),
        "reference_max_abs_error": float((ref - exact).abs().max()),
        "ours_argmax": int(ours.argmax()),
        "reference_argmax": int(ref.argmax()),
        "float32_argmax": int(exact.argmax()),
    }


def reference_outputs(
    args: argparse.Namespace, ckpt: Path, work: Path, dtype: str
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run the reference side in its own process, or reuse its files from an equal earlier run."""
    from safetensors.torch import load_file

    stem = work / f"reference_{dtype}"
    meta = Path(f"{stem}.json")
    cached = json.loads(meta.read_text()) if meta.is_file() else {}
    if (cached.get("steps"), cached.get("device")) != (args.steps, str(torch.device(args.device))):
        cmd = [
            *args.reference_python.split(),
            __file__,
            "--role",
            "reference",
            "--reference-code",
            args.reference_code,
            "--ckpt",
            str(ckpt),
            "--work",
            str(work),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--dtype",
            dtype,
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(meta.read_text()), load_file(f"{stem}.safetensors")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--reference-code", required=True, help="directory holding modeling_deepseekocr.py etc."
    )
    ap.add_argument(
        "--reference-python",
        help="command running a python with transformers 4.46.3 for the reference side "
        "(split on spaces, e.g. 'env PYTHONPATH=/tmp/ref_site python3')",
    )
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="relative, float32 only")
    ap.add_argument("--work", help="scratch directory (checkpoint, pixels, reference outputs)")
    ap.add_argument("--out", default="benchmarks/results/equivalence_decoder.json")
    ap.add_argument("--role", choices=["main", "reference"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.role == "reference":
        run_reference(args)
        return 0
    if not args.reference_python:
        ap.error("--reference-python is required")

    work = Path(args.work or tempfile.mkdtemp(prefix="equiv-"))
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        write_random_checkpoint(ckpt, args.layers, args.experts, args.seed)
    images = make_images()
    save_views(images, work / "views.safetensors")
    ref, ref_t = reference_outputs(args, ckpt, work, args.dtype)
    gen_ref = ref["generated"]
    ours = run_ours(ckpt, images, args.steps, args.device, getattr(torch, args.dtype), gen_ref)
    gen_ours = ours["generated"]
    agree = identical_prefix(gen_ref, gen_ours)
    single = compare_logits(ours["single_logits"], ref_t["single_logits"])
    multi = compare_logits(ours["multi_logits"], ref_t["multi_logits"])
    steps = compare_logits(ours["step_logits"], ref_t["step_logits"])
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {
        "command": command("python", sys.argv[0], argv=argv, quote=True),
        "machine": f"{platform.machine()} {machine}",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "decoder_size": {
            "hidden": 1280,
            "vocab": 129280,
            "layers": args.layers,
            "routed_experts": args.experts,
            "note": "official widths; depth/experts as given",
        },
        "encoder_size": "official (SAM ViT-B + CLIP-L/14 + projector)",
        "reference_missing_keys": ref["missing_keys"],
        "reference_unexpected_keys": ref["unexpected_keys"],
        "pixel_max_abs_diff_vs_reference_bf16": ref["pixel_max_abs_diff_vs_bf16"],
        "single_gundam_page": {
            "ids_equal": ours["single_ids"] == ref["single_ids"],
            "positions": len(ref["single_ids"]),
            "logits": single,
        },
        "multi_page": {
            "pages": [v for k, v in MULTI if k == "page"],
            "ids_equal": ours["multi_ids"] == ref["multi_ids"],
            "positions": len(ref["multi_ids"]),
            "logits": multi,
        },
        "greedy": {
            "steps_requested": args.steps,
            "reference": gen_ref,
            "ours": gen_ours,
            "identical_prefix": agree,
            "teacher_forced_step_logits": steps,
        },
        "seconds": {"reference": ref["seconds"], "ours": ours["seconds"]},
    }
    tolerance = {"single": args.tolerance, "multi": args.tolerance, "step": args.tolerance}
    if args.dtype != "float32":
        ref32, ref32_t = reference_outputs(args, ckpt, work, "float32")
        common = identical_prefix(gen_ref, ref32["generated"])  # same path: comparable steps
        ref32_t["step_logits"] = ref32_t["step_logits"][:common]
        ours["step_logits"] = ours["step_logits"][:common]
        ref_t["step_logits"] = ref_t["step_logits"][:common]
        result["greedy"]["teacher_forced_step_logits"]["steps_on_reference_float32_path"] = common
        for key, name in [("single", "single_gundam_page"), ("multi", "multi_page")]:
            ref_err = compare_logits(ref_t[f"{key}_logits"], ref32_t[f"{key}_logits"])
            ours_err = compare_logits(ours[f"{key}_logits"], ref32_t[f"{key}_logits"])
            tolerance[key] = 2 * ref_err["relative"]
            result[name]["reference_vs_reference_float32"] = ref_err
            result[name]["ours_vs_reference_float32"] = ours_err
            result[name]["tolerance"] = tolerance[key]
        ref_err = compare_logits(ref_t["step_logits"], ref32_t["step_logits"])
        tolerance["step"] = 2 * ref_err["relative"]
        forced = result["greedy"]["teacher_forced_step_logits"]
        forced["reference_vs_reference_float32"] = ref_err
        forced["ours_vs_reference_float32"] = compare_logits(
            ours["step_logits"], ref32_t["step_logits"]
        )
        forced["tolerance"] = tolerance["step"]
        result["greedy"]["first_token"] = first_token(
            ours["single_logits"][-1], ref_t["single_logits"][-1], ref32_t["single_logits"][-1]
        )
        result["greedy"]["reference_float32"] = ref32["generated"]
        result["greedy"]["reference_vs_reference_float32_prefix"] = identical_prefix(
            gen_ref, ref32["generated"]
        )
        result["greedy"]["ours_vs_reference_float32_prefix"] = identical_prefix(
            gen_ours, ref32["generated"]
        )
    result["pass"] = bool(
        result["single_gundam_page"]["ids_equal"]
        and result["multi_page"]["ids_equal"]
        and single["relative"] <= tolerance["single"]
        and multi["relative"] <= tolerance["multi"]
        and steps["relative"] <= tolerance["step"]
        and steps["shape"][0] >= min(32, len(gen_ref))
        and (args.dtype != "float32" or gen_ref == gen_ours)
    )
    print(json.dumps({k: v for k, v in result.items() if k != "greedy"}, indent=1))
    print("greedy identical prefix:", agree, "of", len(gen_ref))
    write_json(args.out, result, indent=1)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
