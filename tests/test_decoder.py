"""The decoder: official-name conversion, loading, KV cache, bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from optical_memory.backends.deepseek_ocr.configuration import DecoderConfig
from optical_memory.backends.deepseek_ocr.experts import grouped_experts_forward
from optical_memory.backends.deepseek_ocr.model import load_decoder
from optical_memory.backends.deepseek_ocr.testing import (
    TINY_DECODER,
    decoder_tensors,
    write_checkpoint,
)
from optical_memory.backends.deepseek_ocr.weights import (
    convert_decoder_tensors,
    resolve_device_dtype,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), encoder=False)


@pytest.fixture(scope="module")
def decoder(ckpt):
    return load_decoder(ckpt, "cpu", torch.float32)


def reference_moe(x, tensors, layer, cfg):
    """The DeepSeek-V2 MoE written out from the official per-expert weights."""
    p = f"model.layers.{layer}.mlp"

    def mlp(prefix, h):
        g = h @ tensors[f"{prefix}.gate_proj.weight"].T
        u = h @ tensors[f"{prefix}.up_proj.weight"].T
        return (torch.nn.functional.silu(g) * u) @ tensors[f"{prefix}.down_proj.weight"].T

    scores = (x @ tensors[f"{p}.gate.weight"].T).softmax(-1)
    weights, idx = scores.topk(cfg["num_experts_per_tok"], dim=-1)
    out = mlp(f"{p}.shared_experts", x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], idx[t]):
            out[t] += w * mlp(f"{p}.experts.{int(e)}", x[t : t + 1])[0]
    return out


def test_config_reads_language_config_and_rejects_unsupported():
    cfg = DecoderConfig.from_checkpoint_config({"language_config": TINY_DECODER})
    assert cfg.hidden_size == 64 and cfg.n_routed_experts == 8 and cfg.first_k_dense_replace == 1
    with pytest.raises(ValueError, match="use_mla"):
        DecoderConfig.from_checkpoint_config({**TINY_DECODER, "use_mla": True})
    with pytest.raises(ValueError, match="norm_topk_prob"):
        DecoderConfig.from_checkpoint_config({**TINY_DECODER, "norm_topk_prob": True})
    assert DecoderConfig().kv_cache_bytes_per_token(torch.bfloat16) == 2 * 12 * 1280 * 2


def test_converted_experts_compute_the_official_moe(decoder):
    tensors = decoder_tensors(TINY_DECODER, seed=0)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ours = decoder.model.layers[1].mlp(x[None])[0]
    torch.testing.assert_close(
        ours, reference_moe(x, tensors, 1, TINY_DECODER), rtol=1e-4, atol=1e-5
    )
    assert type(decoder.model.layers[0].mlp).__name__.endswith("MLP")  # first layer dense


def test_experts_forward_matches_transformers_eager_experts(decoder):
    """Our grouped forward against transformers' per-expert loop, with idle and crowded experts."""
    experts = decoder.model.layers[1].mlp.experts
    torch.manual_seed(1)
    x = torch.randn(7, 64)
    index = torch.tensor([[0, 1], [1, 0], [5, 1], [1, 5], [0, 1], [5, 0], [1, 0]])  # 5 experts idle
    weights = torch.rand(7, 2)
    with torch.no_grad():
        ours = grouped_experts_forward(experts, x, index, weights)
        # transformers' decorator keeps the module's own (eager) forward as __wrapped__
        eager = type(experts).forward.__wrapped__(experts, x, index, weights)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


def test_missing_expert_is_named():
    tensors = decoder_tensors(TINY_DECODER, seed=0)
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.2.mlp.experts"):
        convert_decoder_tensors(tensors.items(), DecoderConfig.from_checkpoint_config(TINY_DECODER))


def test_kv_cache_matches_full_forward(decoder):
    emb = torch.randn(1, 12, 64)
    with torch.no_grad():
        full = decoder(emb)
        cache = decoder.new_cache()
        first = decoder(emb[:, :8], cache=cache)
        rest = decoder(emb[:, 8:], position_ids=torch.arange(8, 12)[None], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 12


def test_static_decode_step_matches_dynamic_cache(decoder):
    """Prefill + one-token steps over the static window buffers == transformers' DynamicCache."""
    torch.manual_seed(2)
    emb = torch.randn(2, 10, 64)
    tokens = torch.randint(0, 512, (2, 4))
    with torch.no_grad():
        cache = decoder.new_cache()
        expected = [decoder(emb, cache=cache, logits_to_keep=1)[:, -1]]
        for i in range(4):
            pos = torch.full((2, 1), 10 + i)
            step_emb = decoder.embed_tokens(tokens[:, i : i + 1])
            expected.append(decoder(step_emb, position_ids=pos, cache=cache)[:, -1])
        with decoder.decode_step(batch=2) as step:
            got = [step.prefill(emb, torch.arange(10).expand(2, 10))]
            got += [step(tokens[:, i : i + 1], torch.full((2, 1), 10 + i)) for i in range(4)]
            assert step.length == 14 and int(step.mask.sum()) == 2 * 14
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_decode_steps_are_reused_and_never_shared(decoder):
    with decoder.decode_step(batch=1) as a, decoder.decode_step(batch=1) as b:
        assert a is not b
    with decoder.decode_step(batch=1) as c:
        assert c in (a, b)
    with decoder.decode_step(batch=1) as step, pytest.raises(RuntimeError, match="before prefill"):
        step.length = 0
        step(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    with decoder.decode_step(batch=1) as step, pytest.raises(ValueError, match="window"):
        step.prefill(torch.zeros(1, decoder.config.max_position_embeddings, 64), None)


def test_loading_is_deterministic_and_float32_rope(ckpt, decoder):
    other = load_decoder(ckpt, "cpu", torch.bfloat16)
    assert other.dtype == torch.bfloat16
    assert other.model.rotary_emb.inv_freq.dtype == torch.float32
    emb = torch.randn(1, 6, 64)
    with torch.no_grad():
        a, b = decoder(emb), load_decoder(ckpt, "cpu", torch.float32)(emb)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_decoder(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"language_config": TINY_DECODER}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_decoder(tmp_path, "cpu")
    save_file({"model.vision_model.x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no decoder tensors"):
        load_decoder(tmp_path, "cpu")
    tensors = decoder_tensors(TINY_DECODER)
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_decoder(tmp_path, "cpu")


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="dtype"):
        resolve_device_dtype("cpu", "int8")
    with pytest.raises(ValueError, match="dtype"):
        resolve_device_dtype("cpu", torch.int64)
    with pytest.raises(ValueError, match="device"):
        resolve_device_dtype("gpu0", None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device_dtype("cuda", None)
    assert resolve_device_dtype("cpu", None) == (torch.device("cpu"), torch.float32)
