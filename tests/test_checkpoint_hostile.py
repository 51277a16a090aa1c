"""Hostile checkpoint directories (issue 13, part 5): shapes, config sizes, shard paths.

Each corruption of a small random checkpoint must raise CheckpointError (ConfigError is one)
naming the problem, quickly and before anything large is allocated, and `check_checkpoint`
must report it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from optical_memory.backends.deepseek_ocr import (
    CheckpointError,
    ConfigError,
    check_checkpoint,
    load_decoder,
    load_encoder,
    load_model,
)
from optical_memory.backends.deepseek_ocr.configuration import (
    BOUNDS,
    ClipConfig,
    DecoderConfig,
    ProjectorConfig,
    SamConfig,
)
from optical_memory.backends.deepseek_ocr.modeling_decoder import DeepseekOCRDecoder
from optical_memory.backends.deepseek_ocr.testing import (
    OFFICIAL_DECODER,
    TINY_DECODER,
    decoder_tensors,
    write_checkpoint,
    write_tiny_encoder,
)
from optical_memory.backends.deepseek_ocr.weights import (
    convert_decoder_tensors,
    decoder_shapes,
)

FAST_S = 5.0  # every refusal below takes milliseconds; the issue saw 23 s and 32 GB


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    """A fresh copy of the tiny checkpoint (config.json, decoder/encoder shards, tokenizer)."""
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def edit_decoder(ckpt: Path, **changes: torch.Tensor | None) -> None:
    """Rewrite decoder.safetensors with tensors replaced (a tensor) or removed (None)."""
    path = ckpt / "decoder.safetensors"
    tensors = load_file(str(path))
    for name, tensor in changes.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, str(path))


def edit_config(ckpt: Path, edit) -> None:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def refused(load, *args, match: str | None = None, error: type = CheckpointError) -> str:
    """The message of the `error` (a CheckpointError) `load(*args)` raises, within FAST_S s."""
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        load(*args)
    assert time.perf_counter() - start < FAST_S
    return str(info.value)


def test_pristine_checkpoint_is_fine(ckpt):
    report = check_checkpoint(ckpt)
    assert report.ok, report.describe()
    assert report.encoder and report.decoder
    load_decoder(ckpt, "cpu")  # loads as before


# --------------------------------------------------------------------------- tensor shapes
H, V, E = TINY_DECODER["hidden_size"], TINY_DECODER["vocab_size"], TINY_DECODER["n_routed_experts"]
INTER, MOE = TINY_DECODER["intermediate_size"], TINY_DECODER["moe_intermediate_size"]
SHARED = MOE * TINY_DECODER["n_shared_experts"]
MIS_SHAPED = {  # official name -> (a wrong shape, the expected one)
    "model.layers.1.mlp.experts.3.down_proj.weight": ((1, MOE), (H, MOE)),  # the issue's [1, 32]
    "model.layers.2.mlp.experts.0.gate_proj.weight": ((1, H), (MOE, H)),
    "model.layers.1.mlp.experts.7.up_proj.weight": ((MOE, 1), (MOE, H)),
    "model.embed_tokens.weight": ((V, 1), (V, H)),
    "lm_head.weight": ((1, H), (V, H)),
    "model.norm.weight": ((1,), (H,)),
    "model.layers.0.input_layernorm.weight": ((H, 1), (H,)),
    "model.layers.2.post_attention_layernorm.weight": ((2 * H,), (H,)),
    "model.layers.0.self_attn.q_proj.weight": ((H, 1), (H, H)),
    "model.layers.1.self_attn.k_proj.weight": ((1, H), (H, H)),
    "model.layers.2.self_attn.v_proj.weight": ((H // 2, H), (H, H)),
    "model.layers.0.self_attn.o_proj.weight": ((H, 1), (H, H)),
    "model.layers.0.mlp.gate_proj.weight": ((H, INTER), (INTER, H)),  # the dense MLP
    "model.layers.0.mlp.up_proj.weight": ((1, H), (INTER, H)),
    "model.layers.0.mlp.down_proj.weight": ((H, 1), (H, INTER)),
    "model.layers.1.mlp.gate.weight": ((1, H), (E, H)),  # the router
    "model.layers.2.mlp.shared_experts.up_proj.weight": ((MOE, H), (SHARED, H)),
    "model.layers.1.mlp.shared_experts.down_proj.weight": ((H, 1), (H, SHARED)),
}


@pytest.mark.parametrize("name", sorted(MIS_SHAPED))
def test_mis_shaped_decoder_tensor_is_refused(ckpt, name):
    wrong, expected = MIS_SHAPED[name]
    edit_decoder(ckpt, **{name: torch.zeros(wrong)})
    named = f"{name}: {list(wrong)} in decoder.safetensors, expected {list(expected)}"
    assert named in refused(load_decoder, ckpt, "cpu")
    assert named in refused(load_model, ckpt, "cpu")
    report = check_checkpoint(ckpt)
    assert not report.ok and named in report.describe()


def test_mis_shaped_expert_is_refused_not_broadcast():
    """convert_decoder_tensors itself (which copies each expert into a stacked tensor, where a
    [1, 32] tensor broadcasts into [64, 32]) refuses the shape."""
    tensors = decoder_tensors(TINY_DECODER)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    tensors[name] = torch.ones(1, MOE)
    config = DecoderConfig.from_checkpoint_config(TINY_DECODER)
    with pytest.raises(
        CheckpointError, match=rf"{name}: shape \[1, {MOE}\], expected \[{H}, {MOE}\]"
    ):
        convert_decoder_tensors(tensors.items(), config)


@pytest.mark.parametrize(
    ("changes", "listed"),
    [
        ({"model.layers.2.mlp.experts.5.up_proj.weight": None}, "missing (1):"),
        ({"model.layers.1.mlp.gate.weight": None}, "missing (1):"),
        ({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(MOE, H)}, "unexpected (1):"),
        ({"model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(MOE, H)}, "unexpected (1):"),
        ({"model.layers.3.input_layernorm.weight": torch.zeros(H)}, "unexpected (1):"),
    ],
    ids=[
        "missing expert",
        "missing router",
        "expert past n_routed",
        "expert in dense layer",
        "extra layer",
    ],
)
def test_missing_and_unexpected_decoder_tensors_are_listed(ckpt, changes, listed):
    edit_decoder(ckpt, **changes)
    (name,) = changes
    message = refused(load_decoder, ckpt, "cpu")
    assert f"{listed}\n  {name}" in message
    report = check_checkpoint(ckpt)
    assert not report.ok and name in report.describe()


def test_one_error_lists_every_decoder_problem(ckpt):
    edit_decoder(
        ckpt,
        **{
            "model.layers.1.mlp.experts.3.down_proj.weight": torch.zeros(1, MOE),
            "lm_head.weight": None,
            "model.layers.9.mlp.gate.weight": torch.zeros(E, H),
        },
    )
    message = refused(load_decoder, ckpt, "cpu")
    for part in (
        "missing (1):\n  lm_head.weight",
        "unexpected (1):\n  model.layers.9",
        "mis-shaped (1)",
    ):
        assert part in message


def test_expected_shapes_are_those_of_the_model():
    """decoder_shapes (official names, per-expert weights) against the decoder module built on
    the meta device, for the tiny and the official configuration."""
    for lang in (TINY_DECODER, OFFICIAL_DECODER):
        config = DecoderConfig.from_checkpoint_config(lang)
        shapes = decoder_shapes(config)
        with torch.device("meta"):
            module = DeepseekOCRDecoder(config)
        stacked = {}  # the stacked experts of each layer, from the per-expert shapes
        for name in module.state_dict():
            if name.endswith("experts.gate_up_proj"):
                gate = shapes[name.removesuffix("gate_up_proj") + "0.gate_proj.weight"]
                stacked[name] = (config.n_routed_experts, 2 * gate[0], gate[1])
            elif name.endswith("experts.down_proj"):
                down = shapes[name.removesuffix("down_proj") + "0.down_proj.weight"]
                stacked[name] = (config.n_routed_experts, *down)
        plain = {k: v for k, v in shapes.items() if ".mlp.experts." not in k}
        got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert got == {**plain, **stacked}
    written = decoder_tensors(TINY_DECODER)
    expected = decoder_shapes(DecoderConfig.from_checkpoint_config(TINY_DECODER))
    assert {k: tuple(v.shape) for k, v in written.items()} == expected


# --------------------------------------------------------------------------- config.json sizes
LANGUAGE_CASES = [
    ("n_routed_experts", 2_000_000),
    ("num_hidden_layers", 1_000_000),
    ("hidden_size", 10**9),
    ("vocab_size", 10**12),
    ("intermediate_size", -1),
    ("moe_intermediate_size", 0),
    ("num_attention_heads", 0),
    ("num_key_value_heads", 3),  # does not divide 4 heads
    ("num_experts_per_tok", 9),  # more than the 8 experts
    ("first_k_dense_replace", 4),  # more than the 3 layers
    ("max_position_embeddings", 10**9),
    ("n_shared_experts", 10**6),
    ("eos_token_id", 10**6),
    ("hidden_size", "64"),
    ("hidden_size", 64.0),
    ("num_hidden_layers", True),
    ("rms_norm_eps", float("nan")),
    ("rms_norm_eps", -1.0),
    ("rope_theta", "inf"),
    ("routed_scaling_factor", 1e300),
]


@pytest.mark.parametrize(
    ("key", "value"), LANGUAGE_CASES, ids=[f"{k}={v!r}" for k, v in LANGUAGE_CASES]
)
def test_decoder_config_sizes_are_bounded(ckpt, key, value):
    edit_config(ckpt, lambda c: c["language_config"].__setitem__(key, value))
    for load in (load_decoder, load_model):
        refused(load, ckpt, "cpu", match=f"language_config.*{key}", error=ConfigError)
    report = check_checkpoint(ckpt)
    assert not report.ok and key in report.describe()


SAM = ("vision_config", "width", "sam_vit_b")
CLIP = ("vision_config", "width", "clip-l-14-224")
ENCODER_CASES = [
    (SAM, "layers", 20_000),
    (SAM, "width", 10**6),
    (SAM, "heads", 0),
    (SAM, "image_size", 10**7),
    (SAM, "window_size", 10**6),
    (SAM, "out_channels", 10**8),
    (SAM, "patch_size", 0),
    (SAM, "global_attn_indexes", [1, 10**9]),
    (SAM, "global_attn_indexes", list(range(10**5))),
    (SAM, "downsample_channels", [16, 10**9]),
    (SAM, "mlp_ratio", 1e9),
    (CLIP, "layers", 10**5),
    (CLIP, "width", 10**7),
    (CLIP, "image_size", 10**6),
    (CLIP, "intermediate_size", 10**9),
    (CLIP, "heads", -2),
    (("projector_config",), "n_embed", 10**9),
    (("projector_config",), "input_dim", "64"),
]


@pytest.mark.parametrize(
    ("where", "key", "value"),
    ENCODER_CASES,
    ids=[f"{w[-1]}.{k}={str(v)[:20]}" for w, k, v in ENCODER_CASES],
)
def test_encoder_config_sizes_are_bounded(ckpt, where, key, value):
    def edit(config):
        section = config
        for part in where:
            section = section[part]
        section[key] = value

    edit_config(ckpt, edit)
    refused(load_encoder, ckpt, match=key, error=ConfigError)
    refused(load_model, ckpt, "cpu", match=key, error=ConfigError)
    report = check_checkpoint(ckpt)
    assert not report.ok and key in report.describe()


def test_bound_errors_name_the_key_and_the_bound(ckpt):
    edit_config(ckpt, lambda c: c["language_config"].__setitem__("n_routed_experts", 2_000_000))
    message = refused(load_decoder, ckpt, "cpu")
    assert (
        "language_config.n_routed_experts = 2000000 is out of bounds: expected [1, 512]" in message
    )
    edit_config(ckpt, lambda c: c["language_config"].__setitem__("n_routed_experts", 8))
    edit_config(
        ckpt, lambda c: c["vision_config"]["width"]["sam_vit_b"].__setitem__("layers", 20_000)
    )
    message = refused(load_encoder, ckpt)
    assert (
        "vision_config.width.sam_vit_b.layers = 20000 is out of bounds: expected [1, 64]" in message
    )


def test_bounds_are_generous():
    """Every upper bound is at least 4x the official value, every official value is in bounds
    (the defaults of the config dataclasses are the official ones), and the unsupported
    settings still raise ValueError as before."""
    for section, kind in (
        ("sam_vit_b", SamConfig()),
        ("clip-l-14-224", ClipConfig()),
        ("projector_config", ProjectorConfig()),
        ("language_config", DecoderConfig()),
    ):
        for key, (_, high) in BOUNDS[section].items():
            values = getattr(kind, key)
            for value in values if isinstance(values, tuple) else (values,):
                if key.endswith(("_token_id", "eps")):
                    continue
                assert high >= 4 * value, (section, key)
    DecoderConfig.from_checkpoint_config({"language_config": OFFICIAL_DECODER})
    assert issubclass(ConfigError, CheckpointError) and issubclass(CheckpointError, ValueError)
    with pytest.raises(ValueError, match="use_mla"):
        DecoderConfig.from_checkpoint_config({**TINY_DECODER, "use_mla": True})


@pytest.mark.parametrize(
    "config",
    [b"[1, 2, 3]", b"{not json", b'{"language_config": [1]}', b" " * (5 * 2**20)],
    ids=["not an object", "not JSON", "language_config not an object", "5 MiB"],
)
def test_unreadable_config_is_a_checkpoint_error(ckpt, config):
    (ckpt / "config.json").write_bytes(config)
    refused(load_decoder, ckpt, "cpu")
    refused(load_model, ckpt, "cpu")
    assert not check_checkpoint(ckpt).ok


# --------------------------------------------------------------------------- shard paths
def write_index(ckpt: Path, entries: dict[str, str] | object) -> None:
    weight_map = entries
    if isinstance(entries, dict):
        names = load_file(str(ckpt / "decoder.safetensors"))
        weight_map = {name: "decoder.safetensors" for name in names}
        weight_map.update(
            {n: "encoder.safetensors" for n in load_file(str(ckpt / "encoder.safetensors"))}
        )
        weight_map.update(entries)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid safetensors file outside the checkpoint directory."""
    path = tmp_path / "outside" / "x.safetensors"
    path.parent.mkdir()
    save_file({"model.norm.weight": torch.zeros(H)}, str(path))
    return path


@pytest.mark.parametrize(
    "entry",
    ["../outside/x.safetensors", "../../x", "/etc/passwd", "sub/../../outside/x.safetensors", ""],
)
def test_index_entries_outside_the_directory_are_refused(ckpt, outside, entry):
    write_index(ckpt, {"model.norm.weight": entry})
    for load, args in ((load_decoder, ("cpu",)), (load_encoder, ()), (load_model, ("cpu",))):
        message = refused(load, ckpt, *args, match="outside the directory")
        assert repr(entry) in message and "model.safetensors.index.json" in message
    report = check_checkpoint(ckpt)
    assert not report.ok and "outside the directory" in report.describe()


def test_index_entry_through_an_escaping_link_is_refused(ckpt, outside):
    os.symlink(outside.parent, ckpt / "sub")
    write_index(ckpt, {"model.norm.weight": "sub/x.safetensors"})
    message = refused(load_decoder, ckpt, "cpu", match="outside the directory")
    assert "'sub/x.safetensors' leads to" in message
    assert not check_checkpoint(ckpt).ok


def test_escaping_link_among_the_shards_is_refused(ckpt, outside):
    os.symlink(outside, ckpt / "extra.safetensors")  # no index: every *.safetensors is read
    refused(load_decoder, ckpt, "cpu", match="'extra.safetensors' leads to")
    refused(load_encoder, ckpt, match="outside the directory")
    assert not check_checkpoint(ckpt).ok


@pytest.mark.parametrize(
    "weight_map",
    [
        ["decoder.safetensors"],
        {"model.norm.weight": 7},
        {"model.norm.weight": "absent.safetensors"},
    ],
    ids=["not an object", "not a name", "absent file"],
)
def test_bad_index_is_a_checkpoint_error(ckpt, weight_map):
    write_index(ckpt, weight_map)
    refused(load_decoder, ckpt, "cpu")
    assert not check_checkpoint(ckpt).ok


def test_tensor_in_two_shards_is_refused(ckpt):
    save_file({"model.norm.weight": torch.zeros(H)}, str(ckpt / "again.safetensors"))
    refused(load_decoder, ckpt, "cpu", match="model.norm.weight is in")
    assert not check_checkpoint(ckpt).ok


def test_unreadable_shard_is_a_checkpoint_error(ckpt):
    (ckpt / "junk.safetensors").write_bytes(b"\xff" * 64)
    refused(load_decoder, ckpt, "cpu", match="junk.safetensors")
    assert not check_checkpoint(ckpt).ok


def test_hugging_face_cache_snapshot_links_are_followed(tmp_path):
    """A hub cache snapshot (snapshots/REV/ holding links to ../../blobs/) is a checkpoint."""
    blobs, snapshot = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / "abc123"
    write_tiny_encoder(blobs)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        os.symlink(Path("../../blobs") / name, snapshot / name)
    load_encoder(snapshot)
    assert check_checkpoint(snapshot).ok
