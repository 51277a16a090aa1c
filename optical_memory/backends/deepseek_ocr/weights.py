"""DeepSeek-OCR checkpoint directories: tensors by their official names, and where they go.

A checkpoint directory in Hugging Face layout holds `config.json`, tokenizer
files and `*.safetensors` (optionally sharded with `model.safetensors.index.json`).
The encoder's tensors are `model.sam_model.*`, `model.vision_model.*`,
`model.projector.*`, `model.image_newline` and `model.view_seperator` (sic).
Our modules reuse transformers' SAM and CLIP layers, whose names differ; the
renaming lives here as data, in both directions, and is exact (the fused CLIP
`qkv_proj` is split into q/k/v and joined back). The decoder keeps the official
names except for the routed experts, which transformers stacks (see
`convert_decoder_tensors`). The one device and dtype resolver of the package is here too.

A checkpoint directory is read as hostile: config.json's sizes are bounded
(see `configuration.BOUNDS`) before anything is built from them, every encoder
and decoder tensor's shape is checked against config.json from the safetensors
headers before a tensor is read, and the shards named by
`model.safetensors.index.json` (or found by glob) must lie inside the directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from optical_memory.backends.deepseek_ocr.configuration import (  # CheckpointError lives there
    CheckpointError,
    ConfigError,
    DecoderConfig,
    EncoderConfig,
)
from optical_memory.backends.deepseek_ocr.modeling_deepencoder import DeepEncoder

ENCODER_PREFIXES = (
    "model.sam_model.",
    "model.vision_model.",
    "model.projector.",
    "model.image_newline",
    "model.view_seperator",
)
# The decoder's tensors inside the full checkpoint.
DECODER_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
# In the official checkpoint but unused by the encoder: the CLIP pixel patch
# embedding (DeepEncoder feeds SAM features instead) and an arange buffer.
UNUSED_OFFICIAL = {
    "model.vision_model.embeddings.patch_embedding.weight",
    "model.vision_model.embeddings.position_ids",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# internal (transformers module) name -> official name, for the renamed SAM parts
_RENAMES = [
    (r"^sam_model\.patch_embed\.projection\.", "sam_model.patch_embed.proj."),
    (r"^sam_model\.layers\.(\d+)\.layer_norm([12])\.", r"sam_model.blocks.\1.norm\2."),
    (r"^sam_model\.layers\.(\d+)\.", r"sam_model.blocks.\1."),
    (r"^sam_model\.neck\.conv1\.", "sam_model.neck.0."),
    (r"^sam_model\.neck\.layer_norm1\.", "sam_model.neck.1."),
    (r"^sam_model\.neck\.conv2\.", "sam_model.neck.2."),
    (r"^sam_model\.neck\.layer_norm2\.", "sam_model.neck.3."),
    (r"^sam_model\.proj\.conv1\.", "sam_model.net_2."),
    (r"^sam_model\.proj\.conv2\.", "sam_model.net_3."),
]
_SPLIT_QKV = re.compile(
    r"^(vision_model\.transformer\.layers\.\d+\.self_attn\.)([qkv])_proj\.(\w+)$"
)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device_dtype(
    device: torch.device | str | None, dtype: torch.dtype | str | None
) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA in bfloat16 when available, else CPU in float32. Bad values raise ValueError."""
    try:
        dev = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"invalid device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"invalid dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"invalid dtype {dtype}; the model runs in float32, bfloat16 or float16")
    return dev, dtype


def encoder_shapes(config: EncoderConfig) -> dict[str, torch.Size]:
    """Our parameter names -> shapes for `config`, without allocating weights."""
    with torch.device("meta"):
        model = DeepEncoder(config)
    return {name: p.shape for name, p in model.state_dict().items()}


def encoder_fingerprint(config: EncoderConfig, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the encoder config and every encoder tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def official_name(internal: str) -> str:
    """Official checkpoint name of one of our encoder parameters (q/k/v map to the fused qkv)."""
    m = _SPLIT_QKV.match(internal)
    if m:
        return f"model.{m.group(1)}qkv_proj.{m.group(3)}"
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, internal)
        if n:
            return "model." + new
    return "model." + internal


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> tensors under the official names (q, k, v fused into qkv_proj)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = _SPLIT_QKV.match(name)
        if m:
            fused.setdefault(official_name(name), {})[m.group(2)] = tensor
        else:
            out[official_name(name)] = tensor
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_internal(
    tensors: dict[str, torch.Tensor], internal_names: list[str]
) -> dict[str, torch.Tensor]:
    """Official tensors -> our state dict for the given internal parameter names."""
    state = {}
    for name in internal_names:
        tensor = tensors[official_name(name)]
        m = _SPLIT_QKV.match(name)
        if m:
            tensor = tensor.chunk(3)["qkv".index(m.group(2))]
        state[name] = tensor
    return state


def expected_shapes(internal_shapes: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    """Official name -> shape, from our parameters' shapes."""
    meta = {k: torch.empty(s, device="meta") for k, s in internal_shapes.items()}
    return {k: tuple(v.shape) for k, v in to_official(meta).items()}


def is_encoder_name(name: str) -> bool:
    return name.startswith(ENCODER_PREFIXES)


def is_decoder_name(name: str) -> bool:
    return name.startswith(DECODER_PREFIXES)


def decoder_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Official decoder tensor name -> shape for `config` (per-expert weights as the official
    checkpoint stores them), computed without torch modules: embed_tokens and lm_head
    [vocab, hidden], the norms [hidden], the attention projections, the dense MLP of the
    first `first_k_dense_replace` layers, then per MoE layer the router `mlp.gate.weight`
    [n_routed_experts, hidden], every routed expert's gate/up [moe_intermediate, hidden] and
    down [hidden, moe_intermediate], and the shared experts (n_shared_experts x wider)."""
    h, v = config.hidden_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim

    def mlp(prefix: str, inter: int) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.gate_proj.weight": (inter, h),
            f"{prefix}.up_proj.weight": (inter, h),
            f"{prefix}.down_proj.weight": (h, inter),
        }

    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q, h)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv, h)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv, h)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, q)
        if layer < config.first_k_dense_replace:
            shapes.update(mlp(f"{p}.mlp", config.intermediate_size))
            continue
        inter = config.moe_intermediate_size
        shapes[f"{p}.mlp.gate.weight"] = (config.n_routed_experts, h)
        for e in range(config.n_routed_experts):
            shapes.update(mlp(f"{p}.mlp.experts.{e}", inter))
        shapes.update(mlp(f"{p}.mlp.shared_experts", inter * config.n_shared_experts))
    return shapes


def decoder_problems(
    found: dict[str, tuple[Path, tuple[int, ...]]], config: DecoderConfig
) -> TensorProblems:
    """Missing, unexpected and mis-shaped decoder tensors of a checkpoint against `config`."""
    return compare(found, decoder_shapes(config), part="decoder")


MAX_CONFIG_BYTES = 4 * 2**20  # config.json (the official one has 3 KB)
MAX_INDEX_BYTES = 64 * 2**20  # model.safetensors.index.json (a few hundred KB for 3B models)


def _read_json(path: Path, limit: int) -> Any:
    size = path.stat().st_size
    if size > limit:
        raise CheckpointError(f"{path}: {size} bytes, more than the {limit} a {path.name} may have")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not JSON ({str(exc)[:200]})") from None


def _roots(directory: Path) -> list[Path]:
    """Where a checkpoint's shards may lie: the directory itself, and for a Hugging Face hub
    cache snapshot (`.../snapshots/REV/`, whose files are links into `../../blobs/`) the
    repository's blobs."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def _confined(directory: Path, name: str, what: str) -> Path:
    """`directory / name` if it stays inside the directory once resolved; CheckpointError
    naming `what` if the name is absolute, climbs out (`..`) or a link leads outside."""
    pure = Path(name)
    if not name or pure.is_absolute() or pure.drive or ".." in pure.parts or "\0" in name:
        raise CheckpointError(f"{directory}: {what} names {name[:200]!r}, outside the directory")
    path = directory / pure
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in _roots(directory)):
        raise CheckpointError(
            f"{directory}: {what} {name[:200]!r} leads to {resolved}, outside the directory"
        )
    return path


def safetensors_files(directory: Path) -> list[Path]:
    """The shards of a checkpoint: those named by the index file, else every *.safetensors.

    Each must lie inside the directory (a link into a Hugging Face cache's blobs is fine);
    an index entry or a link leading elsewhere raises CheckpointError naming it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, MAX_INDEX_BYTES)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map object")
        files = set()
        for tensor, name in weight_map.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{index}: weight_map[{tensor[:200]!r}] is not a file name")
            files.add(name)
        paths = [_confined(directory, f, f"{index.name} entry") for f in sorted(files)]
        for path in paths:
            if not path.is_file():
                raise CheckpointError(f"{index}: names {path.name!r}, which is not a file")
        return paths
    return [
        _confined(directory, p.name, "shard") for p in sorted(directory.glob("*.safetensors"))
    ]


def tensor_locations(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor name in the directory's safetensors -> (file, shape), from the headers only.

    A name in two shards raises CheckpointError (which one would be read?)."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in safetensors_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if name in found and found[name][0] != path:
                        raise CheckpointError(
                            f"{directory}: tensor {name} is in {found[name][0].name} and in "
                            f"{path.name}"
                        )
                    found[name] = (path, tuple(f.get_slice(name).get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
            raise CheckpointError(
                f"{path}: unreadable safetensors file ({str(exc)[:200]})"
            ) from None
    return found


@dataclass
class TensorProblems:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)  # "name: file [..] vs expected [..]"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped)

    def describe(self) -> str:
        lines = []
        for title, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", self.mis_shaped),
        ):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in items)
        return "\n".join(lines)


def compare(
    found: dict[str, tuple[Path, tuple[int, ...]]],
    expected: dict[str, tuple[int, ...]],
    part: str = "encoder",
) -> TensorProblems:
    """A part's tensors of a checkpoint ("encoder" or "decoder") against the expected official
    names and shapes."""
    if part == "encoder":
        present = {
            k: v for k, v in found.items() if is_encoder_name(k) and k not in UNUSED_OFFICIAL
        }
    else:
        present = {k: v for k, v in found.items() if is_decoder_name(k)}
    problems = TensorProblems(
        missing=sorted(set(expected) - set(present)),
        unexpected=sorted(set(present) - set(expected)),
    )
    for name in sorted(set(expected) & set(present)):
        shape = present[name][1]
        if shape != expected[name]:
            problems.mis_shaped.append(
                f"{name}: {list(shape)} in {present[name][0].name}, expected {list(expected[name])}"
            )
    return problems


def read_tensors(
    locations: dict[str, tuple[Path, tuple[int, ...]]], names: list[str]
) -> dict[str, torch.Tensor]:
    """Read the named tensors, opening each shard once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(locations[name][0], []).append(name)
    out = {}
    for path, file_names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in file_names:
                out[name] = f.get_tensor(name)
    return out


@dataclass
class CheckpointReport:
    """What a checkpoint directory holds (see `check_checkpoint`)."""

    directory: Path
    config: bool
    encoder: bool
    decoder: bool
    tokenizer: list[str]
    tensor_count: int
    problems: list[str]  # human-readable, one per problem group

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        def mark(flag: bool) -> str:
            return "yes" if flag else "no"

        lines = [
            f"checkpoint: {self.directory}",
            f"config.json: {mark(self.config)}",
            f"tensors: {self.tensor_count}",
            f"encoder: {mark(self.encoder)}",
            f"decoder: {mark(self.decoder)}",
            f"tokenizer: {', '.join(self.tokenizer) if self.tokenizer else 'no'}",
        ]
        lines += ["problems:", *self.problems] if self.problems else ["problems: none"]
        return "\n".join(lines)


def describes_decoder(config: Any) -> bool:
    """Whether a config.json dictionary describes a decoder (its `language_config`, or the
    decoder's sizes at the top level as in a flat text config)."""
    return isinstance(config, dict) and (
        "language_config" in config or "vocab_size" in config or "num_hidden_layers" in config
    )


def check_checkpoint(path: str | Path) -> CheckpointReport:
    """Report which components (encoder, decoder, tokenizer) a directory holds and its tensor problems.

    config.json's sizes are checked against their bounds; encoder tensors are
    checked by name and shape against it, and so are decoder tensors when it
    describes the decoder (`language_config`). The decoder is reported present
    when its embedding and layer tensors are there. A shard outside the
    directory or an unreadable index or shard is a problem, not an exception.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    problems: list[str] = []
    config_path = directory / "config.json"
    try:
        found = tensor_locations(directory)
    except CheckpointError as exc:
        found = {}
        problems.append(f"safetensors: {exc}")
    else:
        if not found:
            problems.append("no *.safetensors files")
    has_encoder = any(is_encoder_name(k) for k in found)
    has_decoder = any(k.startswith("model.embed_tokens.") for k in found) and any(
        k.startswith("model.layers.") for k in found
    )
    if not config_path.is_file():
        problems.append("no config.json")
    else:
        try:
            raw = _read_json(config_path, MAX_CONFIG_BYTES)
            encoder_config = EncoderConfig.from_dict(raw) if has_encoder else None
            decoder_config = (
                DecoderConfig.from_checkpoint_config(raw)
                if has_decoder or describes_decoder(raw)
                else None
            )
        except CheckpointError as exc:  # ConfigError included
            problems.append(f"config.json: {exc}")
        else:
            if encoder_config is not None:
                encoder_problems = compare(found, expected_shapes(encoder_shapes(encoder_config)))
                if encoder_problems:
                    problems.append("encoder tensors:\n" + encoder_problems.describe())
            if decoder_config is not None and describes_decoder(raw):
                decoder_check = decoder_problems(found, decoder_config)
                if decoder_check:
                    problems.append("decoder tensors:\n" + decoder_check.describe())
    return CheckpointReport(
        directory=directory,
        config=config_path.is_file(),
        encoder=has_encoder,
        decoder=has_decoder,
        tokenizer=[f for f in TOKENIZER_FILES if (directory / f).is_file()],
        tensor_count=len(found),
        problems=problems,
    )


def decoder_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every decoder tensor in the directory's safetensors files, unchecked
    (loading goes through `checked_decoder_tensors`)."""
    files = safetensors_files(path)
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.startswith(DECODER_PREFIXES):
                    yield name, f.get_tensor(name)


def checked_decoder_tensors(
    path: Path, config: DecoderConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every decoder tensor of the directory, after checking every name and
    shape against `config` from the safetensors headers (nothing is read before): one
    CheckpointError lists the missing, unexpected and mis-shaped tensors."""
    locations = tensor_locations(path)
    if not locations:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {path}")
    if not any(is_decoder_name(k) for k in locations):
        raise CheckpointError(
            f"checkpoint {path} holds no decoder tensors (model.layers.*, lm_head, ...)"
        )
    problems = decoder_problems(locations, config)
    if problems:
        raise CheckpointError(
            f"{path}: decoder tensors do not match config.json\n{problems.describe()}"
        )
    names = sorted(k for k in locations if is_decoder_name(k))
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(locations[name][0], []).append(name)
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                yield name, f.get_tensor(name)


def read_config(path: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (at most MAX_CONFIG_BYTES of JSON)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    config = _read_json(config_file, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file}: not a JSON object")
    return config


def convert_decoder_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: DecoderConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Official decoder tensor names -> `DeepseekOCRDecoder` state dict.

    Routed experts `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight` are
    stacked into `mlp.experts.gate_up_proj` (gate rows first, then up) and
    `mlp.experts.down_proj`; every other name is kept as it is. Tensors outside
    the decoder are ignored. Each tensor is copied once into its destination on
    `device` in `dtype`, so peak memory stays near one model copy. A tensor whose shape
    is not the one `config` implies raises CheckpointError (a copy would broadcast it).
    """
    e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    expected = decoder_shapes(config)
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, set[tuple[int, str]]] = {}
    for name, tensor in tensors:
        if not name.startswith(DECODER_PREFIXES):
            continue
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{name}: shape {list(tensor.shape)}, expected {list(expected[name])}"
            )
        match = _EXPERT_RE.match(name)
        if match is None:
            out[name] = tensor.to(device=device, dtype=dtype)
            continue
        layer, expert, proj = int(match[1]), int(match[2]), match[3]
        if expert >= e:
            raise ValueError(f"{name}: expert index {expert} >= n_routed_experts {e}")
        if name not in expected:
            raise CheckpointError(f"{name}: layer {layer} has no routed experts in config.json")
        base = f"model.layers.{layer}.mlp.experts."
        if proj == "down":
            key = base + "down_proj"
            dest = out.setdefault(key, torch.empty(e, h, i, device=device, dtype=dtype))
            dest[expert].copy_(tensor)
        else:
            key = base + "gate_up_proj"
            dest = out.setdefault(key, torch.empty(e, 2 * i, h, device=device, dtype=dtype))
            rows = slice(0, i) if proj == "gate" else slice(i, 2 * i)
            dest[expert, rows].copy_(tensor)
        filled.setdefault(base, set()).add((expert, proj))
    for base, seen in filled.items():
        if len(seen) != 3 * e:
            raise ValueError(
                f"{base}*: {3 * e - len(seen)} of {3 * e} routed expert weights are missing"
            )
    return out
