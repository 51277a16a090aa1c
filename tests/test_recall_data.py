"""The recall benchmark's conversations (benchmarks/recall_data.py) and its OCR check
(benchmarks/ocr_check.py): determinism, evidence, paraphrase, sizes; Tesseract reads a page."""

from __future__ import annotations

import itertools
import re
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import recall_data
from recall_data import Conversation, Question, make_conversations

from optical_memory.tokens import default_counter

WORDS = re.compile(r"[a-z0-9']+")
STOP = {
    "a", "an", "and", "at", "be", "by", "can", "did", "do", "does", "for", "from", "get", "got",
    "go", "has", "have", "he", "her", "him", "his", "how", "i", "i'd", "i'm", "in", "is", "it",
    "its", "me", "my", "now", "of", "on", "or", "our", "she", "so", "that", "the", "this", "to",
    "up", "was", "we", "what", "when", "where", "which", "who", "whose", "with", "you",
}


@pytest.fixture(scope="module")
def conversations() -> list[Conversation]:
    return make_conversations(4, seed=0)


def _content_words(text: str) -> set[str]:
    return set(WORDS.findall(text.lower())) - STOP


def test_same_seed_same_conversations(conversations):
    again = make_conversations(4, seed=0)
    assert [c.messages for c in again] == [c.messages for c in conversations]
    assert [c.questions for c in again] == [c.questions for c in conversations]
    other = make_conversations(4, seed=1)
    assert [c.messages for c in other] != [c.messages for c in conversations]


def test_shape_dates_and_sizes(conversations):
    counter = default_counter()
    assert len({c.session_id for c in conversations}) == len(conversations)
    for conv in conversations:
        turns = conv.messages[1:]
        assert conv.messages[0]["role"] == "system"
        assert recall_data.TURNS[0] <= len(turns) <= recall_data.TURNS[1]
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        times = [m["created_at"] for m in conv.messages]
        assert times == sorted(times)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert sum(g > 86400 / 2 for g in gaps) >= 19  # many sessions, days apart
        tokens = sum(counter.count(m["content"]) for m in turns)
        assert recall_data.TOKENS[0] <= tokens <= recall_data.TOKENS[1]
        assert all(m["content"].isascii() for m in conv.messages)


def test_questions_and_their_evidence(conversations):
    for conv in conversations:
        kinds = [q.kind for q in conv.questions]
        assert kinds.count("fact") >= 8 and kinds.count("multi-hop") >= 3
        assert kinds.count("temporal") >= 3
        for q in conv.questions:
            assert isinstance(q, Question) and q.answer
            assert list(q.evidence) == sorted(set(q.evidence))
            assert all(conv.messages[i]["role"] == "user" for i in q.evidence)
            texts = [conv.messages[i]["content"] for i in q.evidence]
            if q.kind == "multi-hop":
                assert len(q.evidence) == 2
            if q.kind != "temporal":  # the fact is stated in an evidence turn
                assert len(q.entities) == len(q.evidence)
                assert all(key in text for key, text in zip(q.entities, texts))
                assert any(q.answer in text for text in texts)
            for text in texts:  # a paraphrase: some words in common, not the sentence
                assert q.text not in text and text not in q.text
                shared = _content_words(q.text) & _content_words(text)
                assert len(shared) <= 0.75 * len(_content_words(q.text)), (q.text, text)


def test_facts_have_distractors(conversations):
    """The key entity of a fact question turns up in other turns too (BM25 is not trivial)."""
    mentioned = []
    for conv in conversations:
        for q in conv.questions:
            if q.kind == "fact":
                key = q.entities[0]
                others = [
                    i for i, m in enumerate(conv.messages)
                    if key in m["content"] and i not in q.evidence
                ]
                mentioned.append(bool(others))
    assert sum(mentioned) >= 0.8 * len(mentioned)


def test_temporal_answers_follow_the_dates(conversations):
    for conv in conversations:
        for q in conv.questions:
            if q.text.startswith("How many days"):
                a, b = (conv.messages[i]["created_at"] for i in q.evidence)
                assert abs(int(q.answer) - (b - a) / 86400) <= 1


def test_span_cer():
    ocr_check = pytest.importorskip("ocr_check", reason="rapidfuzz (the bench extra) is missing")
    text = "Note for later: storage unit on Mill Road, the door code is 4417."
    noisy = "ASSISTANT Got it.\nUSER Note for later: storage\nunit on Mill Road, the door code is 44l7.\n"
    assert ocr_check.span_cer(text, f"xx {text} yy") == 0.0
    assert ocr_check.span_cer(text, noisy) == pytest.approx(1 / len(text))
    assert ocr_check.span_cer(text, "") == 1.0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("tesseract") is None,
    reason="the tesseract binary is missing (scripts/setup.sh deepseek-ocr,redis,bench installs it)",
)
def test_tesseract_reads_a_gundam_page(tmp_path):
    """A page at the gundam tier reads back almost exactly (a 1280x640 canvas: half the
    memory page's height, the same type, so Tesseract takes half the time)."""
    ocr_check = pytest.importorskip("ocr_check", reason="rapidfuzz (the bench extra) is missing")
    from optical_memory import OpticalMemory
    from renderers import RenderConfig

    conv = make_conversations(1, seed=0)[0]
    render = RenderConfig.memory_page(height=640)
    with OpticalMemory(tmp_path / "m.sqlite3", render=render) as mem:
        mem.extend(conv.session_id, conv.messages[:60])
        page = next(p for p in mem.pages(conv.session_id) if p.sealed)
        turn = next(t for t in range(page.first_turn, page.last_turn + 1)
                    if len(ocr_check.turn_text_on_page(mem, conv.session_id, page, t)) > 80)
        rows = ocr_check.tier_cer(mem, conv.session_id, [(turn, page.index, "gundam")])
    assert len(rows) == 1 and rows[0]["tier"] == "gundam" and rows[0]["width"] == 1280
    assert rows[0]["cer"] <= 0.05
