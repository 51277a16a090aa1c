import json

import pytest
import torch
from safetensors.torch import save_file

from optical_memory.apps.cli import main
from optical_memory.backends.deepseek_ocr import CheckpointError, check_checkpoint, load_encoder
from optical_memory.backends.deepseek_ocr.testing import write_tiny_encoder
from optical_memory.backends.deepseek_ocr.weights import official_name, to_official


def test_round_trip_through_official_names(tmp_path):
    written = write_tiny_encoder(tmp_path, seed=3)
    enc = load_encoder(tmp_path)
    back = to_official(enc.model.state_dict())
    assert set(back) == set(written)
    for name, tensor in written.items():
        assert torch.equal(back[name], tensor), name


def test_official_names_of_renamed_parts():
    assert (
        official_name("sam_model.layers.3.layer_norm1.weight")
        == "model.sam_model.blocks.3.norm1.weight"
    )
    assert official_name("sam_model.neck.layer_norm2.bias") == "model.sam_model.neck.3.bias"
    assert official_name("sam_model.proj.conv2.weight") == "model.sam_model.net_3.weight"
    assert (
        official_name("vision_model.transformer.layers.0.self_attn.k_proj.bias")
        == "model.vision_model.transformer.layers.0.self_attn.qkv_proj.bias"
    )
    assert official_name("view_seperator") == "model.view_seperator"


def test_full_checkpoint_with_decoder_shards_and_unused_clip_tensors(tmp_path):
    written = write_tiny_encoder(tmp_path, filename="model-00001-of-00002.safetensors")
    decoder = {
        "model.embed_tokens.weight": torch.zeros(10, 48),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 48),
    }
    decoder["model.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(32, 3, 14, 14)
    save_file(decoder, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in written}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in decoder})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "tokenizer.json").write_text("{}")
    enc = load_encoder(tmp_path)
    assert torch.equal(enc.model.view_seperator, written["model.view_seperator"])
    report = check_checkpoint(tmp_path)
    assert report.ok and report.encoder and report.decoder
    assert report.tokenizer == ["tokenizer.json"]


def test_one_error_lists_missing_unexpected_and_mis_shaped(tmp_path):
    tensors = write_tiny_encoder(tmp_path)
    del tensors["model.image_newline"]
    tensors["model.sam_model.blocks.0.attn.extra"] = torch.zeros(2)
    tensors["model.projector.layers.bias"] = torch.zeros(7)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_encoder(tmp_path)
    message = str(info.value)
    assert "missing (1):\n  model.image_newline" in message
    assert "unexpected (1):\n  model.sam_model.blocks.0.attn.extra" in message
    assert "model.projector.layers.bias: [7] in model.safetensors, expected [48]" in message
    report = check_checkpoint(tmp_path)
    assert not report.ok and report.encoder and not report.decoder
    assert "model.image_newline" in report.describe()


def test_fingerprint_follows_weights(tmp_path):
    write_tiny_encoder(tmp_path / "a", seed=1)
    write_tiny_encoder(tmp_path / "b", seed=1)
    write_tiny_encoder(tmp_path / "c", seed=2)
    a, b, c = (load_encoder(tmp_path / d).fingerprint for d in "abc")
    assert a == b != c


def test_missing_config_and_weights_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_encoder(tmp_path)
    report = check_checkpoint(tmp_path)
    assert report.problems == ["no *.safetensors files", "no config.json"]


def test_check_checkpoint_command(tmp_path, capsys):
    write_tiny_encoder(tmp_path)
    assert main(["check-checkpoint", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "encoder: yes" in out and "decoder: no" in out and "problems: none" in out
    (tmp_path / "config.json").unlink()
    assert main(["check-checkpoint", str(tmp_path)]) == 1
