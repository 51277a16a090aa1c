"""context() and ask() with a tiny random checkpoint: encoding, the cache, answers appended as turns.

One memory is shared by the tests of this module (encoding on CPU takes about a second a page);
the stores' cache paths are covered on both stores by test_cache and test_stores.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from optical_memory.memory import OpticalMemory
from optical_memory.policy import Policy, Schedule
from optical_memory.prompt import RECALLED_INTRO

# verbatim recall within a quarter of the tiny checkpoint's 1024-position window: the default
# 1024 would spend all of it on turns the query recalls, leaving no page in context
POLICY = Policy(
    schedule=Schedule(((1000, "tiny"),)),
    recent_turns=3,
    recent_tokens=120,
    answer_tokens=8,
    verbatim_tokens=256,
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mem(tmp_path_factory, checkpoint, conversation) -> OpticalMemory:
    store = tmp_path_factory.mktemp("store") / "memory.sqlite3"
    m = OpticalMemory(store, model=checkpoint, device="cpu", policy=POLICY)
    m.extend("s", conversation(30))
    return m


def test_context_encodes_misses_once_then_reads_the_cache(mem):
    first = mem.context("s", "When do we launch?")
    plan = first.plan
    assert plan.window == 1024 and plan.fits  # the tiny checkpoint's window
    assert plan.counter == mem.model.token_counter.name  # counted with the decoder's tokenizer
    pages = plan.in_context()
    assert pages and first.encoded == len(pages)
    tensors = first.segments[: len(pages)]
    for page, t in zip(pages, tensors):
        assert t.shape == (plan.page_costs[page.mode], mem.model.encoder.hidden_size)
    assert isinstance(first.segments[-1], str) and first.segments[-1].endswith("assistant:")
    # the turns the query recalls verbatim come after the page embeddings, before the query
    assert plan.recalled, "the query should recall a turn verbatim"
    turns = mem.turns("s")
    assert first.segments[-1].startswith("\n" + RECALLED_INTRO + "\n")
    for r in plan.recalled:
        assert f"{turns[r.turn].role}: {turns[r.turn].content}\n" in first.segments[-1]
    again = mem.context("s", "When do we launch?")
    assert again.encoded == 0
    sealed = sum(p.sealed for p in pages)  # sealed pages cache their image too, the open page not
    assert mem.stats("s").cache_entries == len(pages) + sealed
    assert all(torch.equal(a, b) for a, b in zip(tensors, again.segments))
    info = mem.store.info("s")
    assert info.cache_hits >= len(pages) and info.cache_misses >= len(pages)
    mem.model.assemble(again.segments, max_new_tokens=8)  # fits the decoder window


def test_corrupt_cache_entry_is_recomputed(mem):
    from optical_memory.cache import cache_key

    ctx = mem.context("s", "q")
    page = ctx.plan.in_context()[0]
    record = next(r for r in mem.pages("s") if r.index == page.index)
    key = cache_key(page.content_hash, record.fingerprint, page.mode, mem.model.encoder.cache_id)
    raw = bytearray(mem.store.cache_get("s", key))
    raw[-1] ^= 0x55
    mem.store.cache_put("s", key, bytes(raw))
    again = mem.context("s", "q")
    assert again.encoded == 1
    assert torch.equal(again.segments[0], ctx.segments[0])


def test_ask_appends_question_and_answer(mem):
    before = mem.store.turn_count("s")
    answer = mem.ask("s", "Where is the launch party?", max_new_tokens=4)
    assert answer.backend == "deepseek-ocr" and answer.usage["completion_tokens"] == 4
    assert answer.finish_reason in ("stop", "length") and str(answer) == answer.text
    turns = mem.turns("s")
    assert len(turns) == before + 2
    assert turns[-2].to_message() == {"role": "user", "content": "Where is the launch party?"}
    assert turns[-1].role == "assistant" and turns[-1].content == answer.text


def test_plan_recounts_pages_with_the_decoder_tokenizer(mem):
    plan = mem.plan("s")
    records = mem.pages("s")
    tokenizer = mem.model.token_counter
    turns = mem.store.turns("s")
    for page, record in zip(plan.pages, records):
        texts = mem.pager.text_of(record, turns[record.first_turn :])
        assert page.text_tokens == sum(tokenizer.count(t) for t in texts) != record.text_tokens


_ENCODER = textwrap.dedent(
    """
    import sys
    from optical_memory.memory import OpticalMemory
    from optical_memory.policy import Policy, Schedule
    policy = Policy(schedule=Schedule(((1000, "tiny"),)), recent_turns=3, recent_tokens=120,
                    answer_tokens=8)
    mem = OpticalMemory(sys.argv[1], model=sys.argv[2], device="cpu", policy=policy)
    put = mem.cache.put_tensors

    def put_and_report(*args):
        size = put(*args)
        print("cached", flush=True)
        return size

    mem.cache.put_tensors = put_and_report
    mem.encode_pages("s", mem.plan("s", "q"), batch_size=1)
    """
)


def test_process_killed_while_encoding_loses_nothing(mem, checkpoint, tmp_path, conversation):
    store = tmp_path / "killed.sqlite3"
    OpticalMemory(store).extend("s", conversation(30))
    proc = subprocess.Popen(
        [sys.executable, "-c", _ENCODER, str(store), str(checkpoint)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "cached"  # one page encoded and cached
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed = OpticalMemory(store, model=mem.model, policy=POLICY)
    assert len(resumed.turns("s")) == 30
    ctx = resumed.context("s", "q")
    pages = ctx.plan.in_context()
    assert 0 < ctx.encoded < len(pages)  # the next call finishes the work
    encoder = mem.model.encoder
    for page, tensor in zip(pages, ctx.segments):
        expected = encoder.encode(resumed.page_image("s", page), page.mode)
        torch.testing.assert_close(tensor, expected)


def test_one_counter_before_and_after_the_model_loads(tmp_path, checkpoint, conversation):
    mem = OpticalMemory(tmp_path / "m.sqlite3", model=checkpoint, device="cpu", policy=POLICY)
    mem.extend("s", conversation(30))
    before = mem.plan("s", "When do we launch?")
    assert mem.backend._model is None  # planned with the checkpoint's tokenizer, no torch model
    mem.context("s", "When do we launch?")  # loads the model
    after = mem.plan("s", "When do we launch?")
    assert before.counter == after.counter == mem.model.token_counter.name
    assert before.to_dict() == after.to_dict()
