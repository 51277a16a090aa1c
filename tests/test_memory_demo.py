"""The demo and the memory commands of the CLI, end to end on small inputs."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from optical_memory.apps.cli import main
from optical_memory.conversation import FACTS, build_conversation
from optical_memory.demo import run_demo


def test_conversation_is_deterministic_varied_and_multilingual():
    a, b = build_conversation(400), build_conversation(400)
    assert a == b and len(a) == 400
    assert a[0]["role"] == "system"
    assert {m["role"] for m in a[1:]} == {"user", "assistant"}
    text = " ".join(m["content"] for m in a)
    assert all(fact in text for fact in FACTS.values())
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # some Chinese
    assert any("\u0400" <= ch <= "\u04ff" for ch in text)  # some Russian
    assert len({m["content"] for m in a}) > 200
    assert build_conversation(400, seed=1) != a


def test_demo_writes_plan_and_pictures(tmp_path):
    result = run_demo(tmp_path, turns=150, progress=False)
    plan = result.plan
    assert plan.turns == 150 and plan.fits and plan.pages
    for path in result.pictures:
        with Image.open(path) as image:
            assert image.width > 800 and image.height > 300
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["total"] == plan.total and saved["history_tokens"] == plan.history_tokens
    again = run_demo(tmp_path, turns=150, progress=False)  # a rerun reuses the session
    assert again.session_id == result.session_id and again.plan.pages == plan.pages


def test_cli_ingest_plan_stats(tmp_path, capsys):
    transcript = tmp_path / "t.jsonl"
    transcript.write_text("\n".join(json.dumps(m) for m in build_conversation(120)))
    store = str(tmp_path / "s.sqlite3")
    assert main(["ingest", "chat", str(transcript), "--store", store]) == 0
    assert "120 turns appended" in capsys.readouterr().out
    assert main(["plan", "chat", "--query", "When?", "--store", store, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["turns"] == 120 and plan["fits"]
    assert main(["stats", "chat", "--store", store]) == 0
    assert "pages sealed" in capsys.readouterr().out
    assert main(["search", "chat", "launch date", "--limit", "3", "--store", store]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert 1 <= len(hits) <= 3 and all("launch" in h["content"].lower() for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    with pytest.raises(SystemExit, match="unknown session 'nobody'"):
        main(["plan", "nobody", "--store", store])
