"""Continuous-batched decoding (tiny checkpoint, float32, CPU): a request batched with others of
other lengths, joining mid-generation, cancelled or streamed gives what it gives alone."""

from __future__ import annotations

import threading

import pytest
import torch

from optical_memory.backends.deepseek_ocr import load_model
from optical_memory.backends.deepseek_ocr.backend import DeepSeekOCRBackend
from optical_memory.backends.deepseek_ocr.generation import GenerationConfig
from optical_memory.backends.deepseek_ocr.paged import PagedKVCache, reference_decode_attention
from optical_memory.backends.deepseek_ocr.scheduler import RequestCancelled, Scheduler
from optical_memory.memory import OpticalMemory
from optical_memory.policy import Policy, Schedule


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def contexts():
    """Contexts of 9 to 260 positions (page embeddings and text)."""
    gen = torch.Generator().manual_seed(0)
    return [
        [torch.randn(n, 64, generator=gen), f"user: question {n}?", "\nassistant:"]
        for n in (3, 250, 40, 120, 9, 60)
    ]


def scheduler(model, **options) -> Scheduler:
    return Scheduler(model.decoder, model.tokenizer.eos_id, **{"block_size": 16, **options})


def test_batched_requests_of_different_lengths_equal_alone(model, contexts):
    alone = [model.generate_ids(c, max_new_tokens=16) for c in contexts]
    s = scheduler(model, max_batch=8)
    handles = [
        s.submit(model.assemble(c, 16), GenerationConfig(max_new_tokens=16)) for c in contexts
    ]
    assert [h.result() for h in handles] == alone
    assert s.steps < sum(map(len, alone)) and s.step_rows > s.steps  # steps were shared
    assert s.cache.free_blocks == s.cache.blocks - 1  # everything released
    s.close()


def test_requests_join_mid_generation_and_wait_for_cache(model, contexts):
    # a cache of 40 blocks of 16 positions holds only some requests: the rest wait, then join
    # between steps while others are still generating
    alone = [model.generate_ids(c, max_new_tokens=24) for c in contexts]
    s = scheduler(model, max_batch=3, kv_cache_tokens=40 * 16)
    first = s.submit(model.assemble(contexts[0], 24), GenerationConfig(max_new_tokens=24))
    stream = iter(first)
    got = [next(stream) for _ in range(5)]  # running before the others arrive
    rest = [
        s.submit(model.assemble(c, 24), GenerationConfig(max_new_tokens=24)) for c in contexts[1:]
    ]
    got += list(stream)
    assert [got, *(h.result() for h in rest)] == alone
    joined = [h.request for h in rest]
    assert max(r.first_token for r in joined) > min(r.finished for r in [first.request, *joined])
    s.close()


def test_options_and_eos_per_request(model, contexts):
    options = [
        {"max_new_tokens": 5},
        {"max_new_tokens": 30, "no_repeat_ngram_size": 2},
        {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "seed": 3},
        {"max_new_tokens": 20},
    ]
    alone = [model.generate_ids(c, **o) for c, o in zip(contexts, options)]
    s = scheduler(model)
    handles = [
        s.submit(model.assemble(c, o["max_new_tokens"]), GenerationConfig(**o))
        for c, o in zip(contexts, options)
    ]
    assert [h.result() for h in handles] == alone
    # EOS ends a request early, the others go on
    eos_first = scheduler(model, max_batch=4)
    eos_first.eos_id = alone[3][2]
    h = eos_first.submit(model.assemble(contexts[3], 20), GenerationConfig(max_new_tokens=20))
    assert h.result() == alone[3][:3]
    s.close()
    eos_first.close()


def test_teacher_forced_logits_equal_alone(model, contexts):
    """Fed the same ids, each step's logits equal the single-request path's (float32)."""
    c = contexts[1]
    inputs = model.assemble(c, 8)
    ids = model.generate_ids(c, max_new_tokens=8)
    with model.decoder.decode_step(1) as step:
        expected = [step.prefill(inputs.inputs_embeds, inputs.position_ids)]
        for i, t in enumerate(ids[:-1]):
            tok = torch.tensor([[t]])
            expected.append(step(tok, torch.tensor([[inputs.length + i]])))
    s = scheduler(model)
    other = s.submit(model.assemble(contexts[0], 8), GenerationConfig(max_new_tokens=8))
    h = s.submit(inputs, GenerationConfig(max_new_tokens=8), forced_ids=ids, record_logits=True)
    assert h.result() == ids and len(other.result()) == 8
    for a, b in zip(h.request.logits, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    s.close()


def test_cancel_frees_the_request_and_others_go_on(model, contexts):
    alone = model.generate_ids(contexts[2], max_new_tokens=20)
    s = scheduler(model)
    victim = s.submit(model.assemble(contexts[1], 200), GenerationConfig(max_new_tokens=200))
    keep = s.submit(model.assemble(contexts[2], 20), GenerationConfig(max_new_tokens=20))
    tokens = iter(victim)
    next(tokens)
    victim.cancel()
    with pytest.raises(RequestCancelled):
        list(tokens)
    assert len(victim.request.generated) < 200
    assert keep.result() == alone
    # a consumer that walks away (closes the iterator) cancels too
    gone = s.submit(model.assemble(contexts[1], 200), GenerationConfig(max_new_tokens=200))
    it = iter(gone)
    next(it)
    it.close()
    assert gone.cancelled
    s.submit(model.assemble(contexts[0], 2), GenerationConfig(max_new_tokens=2)).result()
    assert s.cache.free_blocks == s.cache.blocks - 1
    s.close()


def test_streams_in_order_per_request_across_threads(model, contexts):
    alone = [model.generate_ids(c, max_new_tokens=12) for c in contexts]
    s = scheduler(model)
    got: dict[int, list[int]] = {}

    def client(i: int) -> None:
        got[i] = []
        for token in s.submit(model.assemble(contexts[i], 12), GenerationConfig(max_new_tokens=12)):
            got[i].append(token)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(contexts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(contexts))] == alone
    s.close()


def test_paged_attention_reference_matches_dense():
    gen = torch.Generator().manual_seed(1)
    cache = PagedKVCache(
        1, 2, 8, blocks=12, block_size=4, device=torch.device("cpu"), dtype=torch.float32
    )
    lengths = [1, 7, 13]
    blocks = [cache.allocate(n) for n in lengths]
    dense = []
    for n, owned in zip(lengths, blocks):
        k, v = torch.randn(n, 2, 8, generator=gen), torch.randn(n, 2, 8, generator=gen)
        cache.write(0, cache.slots(owned, 0, n), k, v)
        dense.append((k, v))
    table = torch.zeros(3, 4, dtype=torch.int32)
    for i, owned in enumerate(blocks):
        table[i, : len(owned)] = torch.tensor(owned)
    q = torch.randn(3, 2, 8, generator=gen)
    out = reference_decode_attention(
        q, cache.keys[0], cache.values[0], table, torch.tensor(lengths), 4, 0.5
    )
    for i, (k, v) in enumerate(dense):
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i], k) * 0.5, -1)
        torch.testing.assert_close(out[i], torch.einsum("hn,nhd->hd", w, v))


def test_backend_threads_share_the_scheduler(tmp_path, checkpoint, model, conversation):
    """ask() and stream() from threads through one backend: the answers a single request gives."""
    policy = Policy(
        schedule=Schedule(((1000, "tiny"),)), recent_turns=3, recent_tokens=120, answer_tokens=8
    )
    backend = DeepSeekOCRBackend(model, batching=True, scheduler={"block_size": 16})
    alone = DeepSeekOCRBackend(model, batching=False)
    with OpticalMemory(tmp_path / "m.sqlite3", model=backend, policy=policy) as mem:
        for i in range(3):
            mem.extend(f"s{i}", conversation(12, seed=i))
        prompts = [mem.prompt(f"s{i}", f"what about {i}?") for i in range(3)]
        expected = [alone.answer(p, max_tokens=8).text for p in prompts]
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            if i % 2:
                answers[i] = "".join(backend.stream(prompts[i], max_tokens=8))
            else:
                answers[i] = backend.answer(prompts[i], max_tokens=8).text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [answers[i] for i in range(3)] == expected
        assert model.scheduler().steps > 0
