"""Equivalence of our DeepEncoder with the DeepSeek-OCR reference, fp32 on CPU, full size.

The reference is imported from the directory given with --reference, which must
hold (from the published DeepSeek-OCR code, kept outside this repository):
  deepencoder.py              Hugging Face remote code: SAM ViT-B, CLIP-L, MlpProjector
  hf_modeling_deepseekocr.py  Hugging Face remote code: dynamic_preprocess (Gundam tiling)
  vllm_deepseek_ocr.py        vLLM model file: _pixel_values_to_embedding (token layout)
  config.json                 the official config.json
and their pure-Python dependencies (einops, easydict).

Both sides get the same random weights, saved once under the official names;
ours loads them with `load_encoder` from the official config.json. Reference
per-image embeddings come from the reference modules and its own
`_pixel_values_to_embedding`; its pixels from its own `dynamic_preprocess` and
the global-view calls of its `infer` (resize for image_size <= 640 when not
cropping, `ImageOps.pad` with the mean colour), normalised like its
`BasicImageTransform`. Only one thing is changed in the reference: the layout
function casts the tiles to bf16, which we redirect to fp32 for an fp32
comparison.

    python benchmarks/equivalence_encoder.py --reference /work/ref/encoder \
        --out benchmarks/results/equivalence_encoder.json
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from common import REFERENCE_MODES, command, reference_encoder, text_page, write_json
from PIL import Image, ImageOps
from safetensors.torch import save_file

from optical_memory.backends.deepseek_ocr import EncoderConfig, load_encoder, make_views
from optical_memory.backends.deepseek_ocr.preprocess import normalize
from optical_memory.backends.deepseek_ocr.testing import random_encoder_tensors
from optical_memory.modes import MODES


def extract_function(path: Path, name: str, namespace: dict) -> types.FunctionType:
    """Define one top-level or method function of a reference file, verbatim, in `namespace`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            node.decorator_list = []
            node.returns = None
            for arg in node.args.args:
                arg.annotation = None
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)  # noqa: S102
            return namespace[name]
    raise LookupError(f"{name} not found in {path}")


class TorchFp32:
    """`torch` as seen by the reference layout function, with its bf16 cast made an fp32 one."""

    bfloat16 = torch.float32

    def __getattr__(self, name: str):
        return getattr(torch, name)


def reference_model(ref_dir: Path, tensors: dict[str, torch.Tensor]) -> types.SimpleNamespace:
    sam, clip, projector, loaded = reference_encoder(ref_dir, tensors)
    for module, result in zip((sam, clip, projector), loaded):
        module.eval()
        assert not result.unexpected_keys, result.unexpected_keys
        assert set(result.missing_keys) <= {"embeddings.position_ids"}, result.missing_keys
    layout = extract_function(
        ref_dir / "vllm_deepseek_ocr.py",
        "_pixel_values_to_embedding",
        {"torch": TorchFp32(), "PRINT_NUM_VIS_TOKENS": False},
    )
    model = types.SimpleNamespace(
        sam_model=sam,
        vision_model=clip,
        projector=projector,
        image_newline=tensors["model.image_newline"],
        view_seperator=tensors["model.view_seperator"],
    )
    model.embed = lambda *args: layout(model, *args)
    return model


def reference_pixels(ref_dir: Path, image: Image.Image, mode: str):
    """(global view [1,1,3,S,S], tiles [1,1,P,3,T,T], spatial crop [1,1,2]) as the reference builds them."""
    namespace: dict = {}
    extract_function(ref_dir / "hf_modeling_deepseekocr.py", "find_closest_aspect_ratio", namespace)
    dynamic_preprocess = extract_function(
        ref_dir / "hf_modeling_deepseekocr.py", "dynamic_preprocess", namespace
    )
    base_size, image_size, crop_mode = REFERENCE_MODES[mode]
    color = tuple(int(x * 255) for x in (0.5, 0.5, 0.5))

    def transform(img: Image.Image) -> torch.Tensor:  # ToTensor + Normalize(0.5, 0.5)
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
        return (t.float().div(255) - 0.5) / 0.5

    crops, crop_ratio = [], (1, 1)
    if crop_mode:
        if not (image.size[0] <= 640 and image.size[1] <= 640):
            crops, crop_ratio = dynamic_preprocess(image)
        global_view = ImageOps.pad(image, (base_size, base_size), color=color)
    else:
        if image_size <= 640:
            image = image.resize((image_size, image_size))
        global_view = ImageOps.pad(image, (image_size, image_size), color=color)
    tiles = (
        torch.stack([transform(c) for c in crops])
        if crops
        else torch.zeros(1, 3, image_size, image_size)
    )
    return (
        transform(global_view)[None, None],
        tiles[None, None],
        torch.tensor([[list(crop_ratio)]], dtype=torch.long),
    )


def test_page(width: int, height: int) -> Image.Image:
    return text_page(width, height, margin=20, line_height=22, left=30, box=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/equivalence_encoder.json")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--sam-implementation", default="fast", choices=["fast", "transformers"])
    args = parser.parse_args()
    sys.path.insert(0, str(args.reference))
    torch.manual_seed(args.seed)
    torch.set_grad_enabled(False)

    official_config = json.loads((args.reference / "config.json").read_text())
    config = EncoderConfig.from_dict(official_config)
    tensors = random_encoder_tensors(config, seed=args.seed)
    # the official file also carries the unused CLIP pixel patch embedding
    tensors["model.vision_model.embeddings.patch_embedding.weight"] = torch.randn(1024, 3, 14, 14)
    workdir = Path(tempfile.mkdtemp(prefix="encoder-equivalence-"))
    try:
        (workdir / "config.json").write_text(json.dumps(official_config))
        save_file(tensors, str(workdir / "model.safetensors"))
        ours = load_encoder(
            workdir, device="cpu", dtype=torch.float32, sam_implementation=args.sam_implementation
        )
    finally:
        shutil.rmtree(workdir)
    ref = reference_model(args.reference, tensors)

    images = {
        "tiny": test_page(900, 1200),
        "small": test_page(900, 1200),
        "base": test_page(900, 1200),
        "large": test_page(1100, 800),
        "gundam": test_page(1500, 1000),  # 3x2 tiles of 640 + the 1024 global view
    }
    rows = []
    for mode in args.modes:
        image = images[mode]
        t0 = time.perf_counter()
        expected = ref.embed(*reference_pixels(args.reference, image, mode))[0]
        t1 = time.perf_counter()
        got = ours.encode(image, mode)
        t2 = time.perf_counter()
        views = make_views(image, mode)
        ref_global, ref_tiles, ref_crop = reference_pixels(args.reference, image, mode)
        pixel_diff = (normalize(views.global_view, torch.float32) - ref_global[0, 0]).abs().max()
        if views.tiles.shape[0]:
            tile_diff = (normalize(views.tiles, torch.float32) - ref_tiles[0, 0]).abs().max()
            pixel_diff = max(pixel_diff, tile_diff)
        row = {
            "mode": mode,
            "image": list(image.size),
            "tile_grid": list(views.tile_grid),
            "reference_tile_grid": ref_crop[0, 0].tolist(),
            "tokens": got.shape[0],
            "reference_tokens": expected.shape[0],
            "relative_error": relative_error(got, expected)
            if got.shape == expected.shape
            else None,
            "max_abs_error": (got - expected).abs().max().item()
            if got.shape == expected.shape
            else None,
            "max_pixel_diff": float(pixel_diff),
            "seconds_reference": round(t1 - t0, 2),
            "seconds_ours": round(t2 - t1, 2),
        }
        row["pass"] = row["tokens"] == row["reference_tokens"] and row["relative_error"] < 1e-4
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "what": "per-image embeddings, ours vs the DeepSeek-OCR reference, same random weights",
        "command": command("python", sys.argv[0]),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "dtype": "float32",
        "sam_implementation": args.sam_implementation,
        "threshold_relative_error": 1e-4,
        "seed": args.seed,
        "results": rows,
        "all_pass": all(r["pass"] for r in rows),
    }
    write_json(args.out, result, indent=1)
    print("all pass" if result["all_pass"] else "MISMATCH", "->", args.out)


if __name__ == "__main__":
    main()
