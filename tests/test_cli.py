"""The memory commands of the CLI on both stores: ingest honours turn ids, sessions, turns,
export, delete, pin, plan over the window, --store everywhere, OPTICAL_MEMORY_STORE, --version.

Commands run in-process through `main` and, where the exit status, standard input or the
environment matter, as real `python -m optical_memory` processes. The Redis runs use a
redis-server of their own on a free loopback port (`redis_servers`; the CLI writes under the
default key prefix).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import optical_memory
from optical_memory.apps.cli import build_parser, main
from optical_memory.memory import OpticalMemory

ROOT = Path(__file__).resolve().parents[1]

MESSAGES = [
    {"role": "system", "content": "You are terse.", "turn_id": "m0"},
    {"role": "user", "content": "Our launch date is March 3rd.", "turn_id": "m1"},
    {"role": "assistant", "content": "Noted: March 3rd.", "turn_id": "m2"},
    {"role": "user", "content": "Где вечеринка? 派对在哪里？", "turn_id": "m3"},
]


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    """A fresh store URL of each kind (Redis: database 1 of a redis-server of the test's own)."""
    if request.param == "sqlite":
        return str(tmp_path / "memory.sqlite3")
    server = request.getfixturevalue("redis_servers")()
    return f"redis://127.0.0.1:{server.port}/1"


def _write_jsonl(path: Path, messages: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in messages), encoding="utf-8"
    )
    return path


def _cli(*args: str, stdin: str | None = None, env: dict | None = None, cwd: Path = ROOT):
    """`optical-memory ARGS` as a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "optical_memory", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _stored(store: str, session: str) -> list[dict]:
    with OpticalMemory(store) as mem:
        return [{**t.to_message(), "turn_id": t.turn_id} for t in mem.turns(session)]


# --------------------------------------------------------------------------- ingest
def test_ingest_twice_stores_nothing_twice(store_url, tmp_path, capsys):
    transcript = _write_jsonl(tmp_path / "chat.jsonl", MESSAGES)
    assert main(["ingest", "chat", str(transcript), "--store", store_url]) == 0
    assert "4 turns appended, 0 already stored, 4 in all" in capsys.readouterr().out
    assert main(["ingest", "chat", str(transcript), "--store", store_url]) == 0
    assert "0 turns appended, 4 already stored, 4 in all" in capsys.readouterr().out
    assert _stored(store_url, "chat") == MESSAGES

    # a file that goes on: only its new lines are stored
    more = {"role": "assistant", "content": "Lyon.", "turn_id": "m4"}
    _write_jsonl(transcript, [*MESSAGES, more])
    assert main(["ingest", "chat", str(transcript), "--store", store_url]) == 0
    assert "1 turns appended, 4 already stored, 5 in all" in capsys.readouterr().out


def test_ingest_changed_content_is_a_conflict_and_stores_nothing(store_url, tmp_path):
    transcript = _write_jsonl(tmp_path / "chat.jsonl", MESSAGES)
    assert _cli("ingest", "chat", str(transcript), "--store", store_url).returncode == 0
    changed = [*MESSAGES[:2], {**MESSAGES[2], "content": "Noted: April 1st."}, *MESSAGES[3:]]
    changed.append({"role": "user", "content": "new", "turn_id": "m9"})
    done = _cli(
        "ingest",
        "chat",
        str(_write_jsonl(tmp_path / "changed.jsonl", changed)),
        "--store",
        store_url,
    )
    assert done.returncode == 1
    assert "optical-memory ingest: turn id 'm2' of session 'chat'" in done.stderr
    assert "different content" in done.stderr and "nothing of" in done.stderr
    assert "Traceback" not in done.stderr
    assert _stored(store_url, "chat") == MESSAGES  # not even the new line


def test_ingest_keeps_ids_from_stdin_and_json_arrays(store_url, tmp_path):
    lines = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in MESSAGES)
    for _ in range(2):
        done = _cli("ingest", "piped", "-", "--store", store_url, stdin=lines)
        assert done.returncode == 0, done.stderr
    assert "0 turns appended, 4 already stored" in done.stdout
    assert _stored(store_url, "piped") == MESSAGES

    array = tmp_path / "chat.json"
    array.write_text(json.dumps(MESSAGES, ensure_ascii=False, indent=1), encoding="utf-8")
    for _ in range(2):
        assert _cli("ingest", "array", str(array), "--store", store_url).returncode == 0
    assert _stored(store_url, "array") == MESSAGES


def test_ingest_same_id_twice_in_one_file_with_other_content(tmp_path):
    store = tmp_path / "m.sqlite3"
    twice = [*MESSAGES, {**MESSAGES[1], "content": "Our launch date is May 5th."}]
    done = _cli(
        "ingest", "s", str(_write_jsonl(tmp_path / "twice.jsonl", twice)), "--store", str(store)
    )
    assert done.returncode == 1
    assert "turn id 'm1'" in done.stderr and "nothing was stored" in done.stderr
    with OpticalMemory(store) as mem:
        assert mem.sessions() == []


def test_ingest_without_ids_appends_new_turns(tmp_path, capsys):
    store = str(tmp_path / "m.sqlite3")
    mixed = [MESSAGES[0], {"role": "user", "content": "no id"}, MESSAGES[2]]
    transcript = _write_jsonl(tmp_path / "mixed.jsonl", mixed)
    for _ in range(2):
        assert main(["ingest", "s", str(transcript), "--store", store]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "1 turns appended, 2 already stored, 4 in all" in last
    stored = _stored(store, "s")
    assert [m["content"] for m in stored] == [
        "You are terse.",
        "no id",
        "Noted: March 3rd.",
        "no id",
    ]
    assert stored[1]["turn_id"] != stored[3]["turn_id"]


def test_bad_transcript_creates_no_store(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"role": "user", "content": "a"}\n{"role": "wizard", "content": "b"}\n')
    store = tmp_path / "never.sqlite3"
    done = _cli("ingest", "s", str(bad), "--store", str(store))
    assert done.returncode == 1 and "line 2" in done.stderr
    assert not store.exists()


# --------------------------------------------------------------------------- sessions ...
def test_sessions_turns_export_delete(store_url, tmp_path, capsys):
    with OpticalMemory(store_url) as mem:
        mem.extend("b-chat", MESSAGES)
        mem.extend("a-chat", MESSAGES[:2])
    assert main(["sessions", "--store", store_url]) == 0
    assert capsys.readouterr().out == "a-chat\nb-chat\n"

    assert main(["turns", "b-chat", "--store", store_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == MESSAGES
    with OpticalMemory(store_url) as mem:
        turns = mem.turns("b-chat")
    assert [json.loads(line) for line in lines] == [
        {**t.to_message(), "turn_id": t.turn_id} for t in turns
    ]
    assert main(["turns", "b-chat", "--json", "--store", store_url]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["turn_id"] for r in records] == ["m0", "m1", "m2", "m3"]
    assert [r["created"] for r in records] == [t.created for t in turns]

    # export: stdout by default, --out FILE; both the bytes export_jsonl writes
    with OpticalMemory(store_url) as mem:
        mem.export_jsonl("b-chat", tmp_path / "api.jsonl")
    expected = (tmp_path / "api.jsonl").read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "optical_memory", "export", "b-chat", "--store", store_url],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == expected
    assert (
        main(["export", "b-chat", "--out", str(tmp_path / "cli.jsonl"), "--store", store_url]) == 0
    )
    assert (tmp_path / "cli.jsonl").read_bytes() == expected
    # ... and what export writes, ingest reads back to the same session
    assert main(["ingest", "copy", str(tmp_path / "cli.jsonl"), "--store", store_url]) == 0
    assert _stored(store_url, "copy") == MESSAGES
    capsys.readouterr()

    assert main(["delete", "a-chat", "--store", store_url]) == 0
    assert "session 'a-chat' deleted (2 turns" in capsys.readouterr().out
    assert main(["delete", "a-chat", "--store", store_url]) == 1
    assert "unknown session 'a-chat'" in capsys.readouterr().err
    assert main(["sessions", "--store", store_url]) == 0
    assert capsys.readouterr().out == "b-chat\ncopy\n"

    for command in (["turns", "a-chat"], ["export", "a-chat"]):
        with pytest.raises(SystemExit, match="unknown session 'a-chat'"):
            main([*command, "--store", store_url])
    assert not (tmp_path / "never.jsonl").exists()
    with pytest.raises(SystemExit, match="unknown session"):
        main(["export", "a-chat", "--out", str(tmp_path / "never.jsonl"), "--store", store_url])
    assert not (tmp_path / "never.jsonl").exists()


def test_delete_exit_status_as_a_process(tmp_path):
    store = str(tmp_path / "m.sqlite3")
    with OpticalMemory(store) as mem:
        mem.extend("s", MESSAGES)
    assert _cli("delete", "s", "--store", store).returncode == 0
    done = _cli("delete", "s", "--store", store)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "optical-memory delete: unknown session 's': it holds no turns; nothing deleted"
    )


def test_pin_and_unpin(store_url, capsys):
    with OpticalMemory(store_url) as mem:
        mem.extend("s", MESSAGES)
        assert 1 not in mem.pinned("s")
    assert main(["pin", "s", "m1", "--store", store_url]) == 0
    assert "turn 'm1' of session 's' pinned" in capsys.readouterr().out
    with OpticalMemory(store_url) as mem:
        assert 1 in mem.pinned("s")
    assert main(["pin", "s", "m1", "--unpin", "--store", store_url]) == 0
    assert "turn 'm1' of session 's' unpinned" in capsys.readouterr().out
    with OpticalMemory(store_url) as mem:
        assert 1 not in mem.pinned("s")
    with pytest.raises(SystemExit, match="optical-memory pin: .*'nope'"):
        main(["pin", "s", "nope", "--store", store_url])


# --------------------------------------------------------------------------- plan
def test_plan_over_the_window_exits_nonzero(tmp_path):
    store = str(tmp_path / "m.sqlite3")
    chat = [
        {
            "role": ("user", "assistant")[i % 2],
            "content": f"Turn {i}: " + "the launch party is in Lyon on March 3rd, " * 4,
        }
        for i in range(6)
    ]
    with OpticalMemory(store) as mem:
        mem.extend("s", chat)
        plan = mem.plan("s", budget=600)  # the API returns the plan
    # the answer reserve and the prompt fit; with the recent text they do not
    assert not plan.fits and plan.answer_tokens + plan.overhead < 600 < plan.total
    done = _cli("plan", "s", "--budget", "600", "--store", store)
    assert done.returncode == 1
    assert "** over the window **" in done.stdout  # the table is printed
    assert done.stderr.startswith("optical-memory plan: over the window:")
    assert f"needs {plan.total:,} positions" in done.stderr
    assert f"{plan.total - 600:,} more than the 600-position window" in done.stderr

    done = _cli("plan", "s", "--budget", "600", "--json", "--store", store)
    assert done.returncode == 1 and json.loads(done.stdout)["fits"] is False
    done = _cli("plan", "s", "--json", "--store", store)
    assert done.returncode == 0 and done.stderr == "" and json.loads(done.stdout)["fits"]


def test_plan_to_json_is_text_and_to_dict_a_dict(tmp_path):
    with OpticalMemory(tmp_path / "m.sqlite3") as mem:
        mem.extend("s", MESSAGES)
        plan = mem.plan("s", query="When?")
    as_dict = plan.to_dict()
    assert isinstance(as_dict, dict) and as_dict["total"] == plan.total
    text = plan.to_json()
    assert isinstance(text, str) and json.loads(text) == as_dict
    assert json.loads(plan.to_json(indent=None)) == as_dict and "\n" not in plan.to_json(None)


# --------------------------------------------------------------------------- stores
STORE_COMMANDS = {
    "demo": [],
    "ingest": ["s", "t.jsonl"],
    "plan": ["s"],
    "messages": ["s"],
    "ask": ["s", "q", "--model", "m"],
    "stats": ["s"],
    "sessions": [],
    "turns": ["s"],
    "export": ["s"],
    "delete": ["s"],
    "pin": ["s", "t"],
}


def test_every_store_command_takes_store():
    parser = build_parser()
    for command, rest in STORE_COMMANDS.items():
        args = parser.parse_args([command, *rest, "--store", "redis://h:1/2"])
        assert args.store == "redis://h:1/2", command


def test_bad_store_url_is_an_error_and_creates_nothing(tmp_path):
    for command in ("sessions", "turns", "plan", "stats", "delete"):
        rest = [] if command == "sessions" else ["s"]
        done = _cli(command, *rest, "--store", "redis:127.0.0.1:6379/14", cwd=tmp_path)
        assert done.returncode == 1, command
        assert done.stderr.startswith(
            f"optical-memory {command}: invalid store URL 'redis:127.0.0.1:6379/14'"
        )
        assert "valid forms" in done.stderr and "Traceback" not in done.stderr
    done = _cli("sessions", "--store", "mysql://db/memory", cwd=tmp_path)
    assert done.returncode == 1 and "unknown scheme 'mysql://'" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_env_store_is_the_default(tmp_path):
    transcript = _write_jsonl(tmp_path / "chat.jsonl", MESSAGES)
    env = {
        "OPTICAL_MEMORY_STORE": f"sqlite://{tmp_path}/env.sqlite3",
        "OPTICAL_MEMORY_HOME": str(tmp_path / "home"),
    }
    assert _cli("ingest", "chat", str(transcript), env=env).returncode == 0
    assert (tmp_path / "env.sqlite3").is_file() and not (tmp_path / "home").exists()
    assert _cli("sessions", env=env).stdout == "chat\n"
    other = str(tmp_path / "other.sqlite3")  # --store wins over the environment
    assert _cli("sessions", "--store", other, env=env).stdout == ""

    done = _cli("sessions", env={**env, "OPTICAL_MEMORY_STORE": "redis:localhost"})
    assert done.returncode == 1
    assert "$OPTICAL_MEMORY_STORE: invalid store URL 'redis:localhost'" in done.stderr


def test_version():
    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout == f"optical-memory {optical_memory.__version__}\n"
