"""Loading DeepEncoder from a checkpoint directory and encoding page images at a mode.

enc = load_encoder("/models/DeepSeek-OCR")          # cuda + bf16 when available, else cpu + fp32
tokens = enc.encode(page, "base")                   # [273, 1280]
pages = enc.encode_batch([p1, p2, p3], "gundam")    # one forward pass per view size
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from PIL import Image

from optical_memory.model import checkpoint as ckpt
from optical_memory.model.config import EncoderConfig
from optical_memory.model.deepencoder import DeepEncoder, clip_attn_implementation
from optical_memory.model.preprocess import Views, make_views, normalize
from optical_memory.modes import Mode, get_mode

MAX_CUDA_GRAPHS = 16


def encoder_shapes(config: EncoderConfig) -> dict[str, torch.Size]:
    """Our parameter names -> shapes for `config`, without allocating weights."""
    with torch.device("meta"):
        model = DeepEncoder(config)
    return {name: p.shape for name, p in model.state_dict().items()}


def random_encoder_tensors(
    config: EncoderConfig, seed: int = 0, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Random fp32 encoder weights under the official names, for tests and benchmarks.

    Norm weights are near 1, position tables (absolute, relative, CLIP) ~ N(0, 0.5)
    so that a wrong position mapping shows, the rest ~ N(0, std). Every tensor is
    random: nothing can hide behind zeros.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(ckpt.expected_shapes(encoder_shapes(config)).items()):
        scale = 0.5 if re.search(r"pos|class_embedding", name) else std
        t = torch.randn(shape, generator=generator) * scale
        if re.search(r"(norm\d?|neck\.[13]|layer_norm\d|pre_layrnorm)\.weight$", name):
            t += 1.0
        out[name] = t
    return out


def fingerprint(config: EncoderConfig, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the encoder config and every encoder tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Encoder:
    """A loaded DeepEncoder on one device and dtype, with preprocessing and the token layout."""

    def __init__(
        self,
        model: DeepEncoder,
        fingerprint: str,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.fingerprint = fingerprint
        self.device = device
        self.dtype = dtype
        self.config = model.config
        # input shape -> (graph, static input, static output), oldest first
        self._graphs: dict[tuple[int, ...], tuple] | None = None
        if cuda_graphs:
            self.enable_cuda_graphs()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @classmethod
    def from_tensors(
        cls,
        config: EncoderConfig,
        tensors: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        sam_implementation: str = "fast",
        cuda_graphs: bool | None = None,
    ) -> Encoder:
        """Build from official-named tensors (already checked against `config`).

        `cuda_graphs` defaults to on for CUDA devices (see `enable_cuda_graphs`).
        """
        device, dtype = resolve_device_dtype(device, dtype)
        with torch.device("meta"):
            model = DeepEncoder(config, clip_attn_implementation(device, dtype), sam_implementation)
        names = list(model.state_dict())
        state = {
            k: v.to(device=device, dtype=dtype) for k, v in ckpt.to_internal(tensors, names).items()
        }
        model.load_state_dict(state, strict=True, assign=True)
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        return cls(model, fingerprint(config, tensors), device, dtype, cuda_graphs)

    def enable_cuda_graphs(self) -> None:
        """Replay one captured CUDA graph per input shape instead of launching kernels one by one.

        Removes the launch overhead that dominates small batches. Each new
        (batch, view size) is captured on first use (tens of milliseconds) and
        keeps its own memory; the `MAX_CUDA_GRAPHS` most recent shapes are kept.
        """
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._graphs = {}

    def compile(self) -> None:
        """torch.compile every SAM and CLIP layer in place (fuses the elementwise work).

        Each new view size and batch size compiles on its first call (tens of
        seconds). Measured on an H100 (README): faster at Tiny, slower at Base,
        so it is not on by default.
        """
        for layer in (*self.model.sam_model.layers, *self.model.vision_model.transformer.layers):
            layer.compile()

    @torch.inference_mode()
    def encode(self, image: Image.Image, mode: str | Mode) -> torch.Tensor:
        """Vision tokens of one image at `mode`: [n_tokens, hidden_size]."""
        return self.encode_batch([image], mode)[0]

    @torch.inference_mode()
    def encode_batch(self, images: list[Image.Image], mode: str | Mode) -> list[torch.Tensor]:
        """Vision tokens of each image at `mode`; global views (and Gundam tiles) batched."""
        mode = get_mode(mode)
        views = [make_views(image, mode) for image in images]
        return self.encode_views(views)

    @torch.inference_mode()
    def encode_views(self, views: list[Views]) -> list[torch.Tensor]:
        """Like `encode_batch` for views already prepared (e.g. by worker processes)."""
        if not views:
            return []
        global_features = self._features(torch.stack([v.global_view for v in views]))
        tile_counts = [v.tiles.shape[0] for v in views]
        tile_features = (
            self._features(torch.cat([v.tiles for v in views if v.tiles.shape[0]]))
            if sum(tile_counts)
            else None
        )
        out, start = [], 0
        for i, v in enumerate(views):
            tiles = None
            if tile_counts[i]:
                tiles = tile_features[start : start + tile_counts[i]]
                start += tile_counts[i]
            out.append(self.model.layout(global_features[i], tiles, v.tile_grid))
        return out

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: uint8 [B, 3, S, S] -> features [B, (S/64)^2, hidden]; with CUDA graphs the
        # result lives in the graph's output buffer until the next call of the same shape
        pixels = pixels.to(self.device, non_blocking=True)
        if self._graphs is None:
            return self.model(normalize(pixels, self.dtype))
        key = tuple(pixels.shape)
        if key not in self._graphs:
            static_in = pixels.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: library plans and workspaces
                self.model(normalize(static_in, self.dtype))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model(normalize(static_in, self.dtype))
            self._graphs[key] = (graph, static_in, static_out)
            if len(self._graphs) > MAX_CUDA_GRAPHS:
                del self._graphs[next(iter(self._graphs))]
        else:
            self._graphs[key] = self._graphs.pop(key)  # most recently used last
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(pixels)
        graph.replay()
        return static_out


def resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Default device: cuda when available, else cpu; default dtype: bf16 on GPU, fp32 on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_encoder(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    sam_implementation: str = "fast",
    cuda_graphs: bool | None = None,
) -> Encoder:
    """Load DeepEncoder from a checkpoint directory (config.json + *.safetensors, official names).

    Works with the full DeepSeek-OCR checkpoint and with a directory holding only
    the encoder tensors. Missing, unexpected or mis-shaped encoder tensors raise
    one CheckpointError listing all of them. `sam_implementation`: "fast" (default;
    see `sam_attention`: relative positions folded into the query-key product,
    patch embedding as a GEMM) or "transformers" (its SAM modules as they are);
    both compute the same function. `cuda_graphs` (default: on for CUDA) replays
    one captured CUDA graph per input shape.
    """
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ckpt.CheckpointError(f"{directory}: no config.json")
    config = EncoderConfig.from_file(config_path)
    locations = ckpt.tensor_locations(directory)
    if not locations:
        raise ckpt.CheckpointError(f"{directory}: no *.safetensors files")
    expected = ckpt.expected_shapes(encoder_shapes(config))
    problems = ckpt.compare(locations, expected)
    if problems:
        raise ckpt.CheckpointError(
            f"{directory}: encoder tensors do not match config.json\n{problems.describe()}"
        )
    tensors = ckpt.read_tensors(locations, sorted(expected))
    return Encoder.from_tensors(
        config,
        tensors,
        device,
        dtype,
        sam_implementation=sam_implementation,
        cuda_graphs=cuda_graphs,
    )
