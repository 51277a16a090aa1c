"""`optical-memory` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optical_memory.memory import OpticalMemory


# --- render (renderers) -------------------------------------------------------
def _add_render(sub: argparse._SubParsersAction) -> None:
    from optical_memory.modes import MODES

    p = sub.add_parser("render", help="render a transcript to page PNGs and pages.json")
    p.add_argument(
        "transcript", help="JSONL file of messages, JSON array of messages, or - for stdin"
    )
    p.add_argument("--out", required=True, help="directory for page-NNNN.png and pages.json")
    p.add_argument(
        "--mode", choices=list(MODES), default="gundam", help="page geometry (default: gundam)"
    )
    p.set_defaults(handler=_render)


def _render(args: argparse.Namespace) -> int:
    from optical_memory.messages import MessageError, load_transcript
    from renderers import FontNotFoundError, RenderConfig, Renderer, TurnTooLongError
    from renderers.export import write_pages

    try:
        messages = load_transcript(args.transcript)
        renderer = Renderer(RenderConfig.for_mode(args.mode))
        pages = renderer.paginate(messages)
    except (MessageError, FontNotFoundError, TurnTooLongError) as exc:
        print(f"optical-memory render: {exc}", file=sys.stderr)
        return 1
    manifest = write_pages(renderer, pages, args.out)
    tokens = sum(p["text_tokens"] for p in manifest["pages"])
    print(f"{len(pages)} pages ({args.mode}, {tokens} text tokens) -> {args.out}")
    return 0


# --- check-checkpoint (encoder) ----------------------------------------------
def _add_check_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-checkpoint", help="report what a checkpoint directory holds")
    p.add_argument("directory", help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.set_defaults(handler=_check_checkpoint)


def _check_checkpoint(args: argparse.Namespace) -> int:
    from optical_memory.backends.deepseek_ocr import CheckpointError, check_checkpoint

    try:
        report = check_checkpoint(args.directory)
    except CheckpointError as exc:
        print(f"optical-memory check-checkpoint: {exc}", file=sys.stderr)
        return 1
    print(report.describe())
    return 0 if report.ok else 1


# --- ocr (decoder) -----------------------------------------------------------
def _add_ocr(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ocr", help="read one image with a checkpoint")
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("--model", required=True, help="DeepSeek-OCR checkpoint directory")
    p.add_argument("--mode", default="gundam", help="tiny, small, base, large or gundam (default)")
    p.add_argument(
        "--prompt", default="<image>\nFree OCR.", help="prompt with one <image> placeholder"
    )
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(handler=_run_ocr)


def _run_ocr(args: argparse.Namespace) -> int:
    from PIL import Image

    from optical_memory.backends.deepseek_ocr import PageImage, load_model
    from optical_memory.backends.deepseek_ocr.context import split_prompt

    image = Image.open(args.image).convert("RGB")
    page = PageImage(image, args.mode)
    model = load_model(args.model, device=args.device)
    prompt = split_prompt(args.prompt, [page])
    for piece in model.stream(prompt, max_new_tokens=args.max_new_tokens, no_repeat_ngram_size=20):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# --- memory commands: demo, ingest, plan, ask, stats --------------------------
_STORE_DEFAULT = "$OPTICAL_MEMORY_STORE, else the embedded SQLite file"


def _store_option(p: argparse.ArgumentParser, default_help: str = _STORE_DEFAULT) -> None:
    p.add_argument(
        "--store",
        help="redis://host:port/db, rediss://..., redis+cluster://host:port, unix:///socket, "
        "sqlite:///path or a file path "
        f"(default: {default_help})",
    )


def _memory_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Turn the API's errors into one clear line on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from optical_memory.backends import BackendError
        from optical_memory.stores import StoreError

        try:
            return handler(args)
        except (ValueError, LookupError, TypeError, StoreError, OSError, BackendError) as exc:
            raise SystemExit(f"optical-memory {args.command}: {exc}") from None

    return run


def _open_memory(args: argparse.Namespace) -> OpticalMemory:
    from optical_memory.memory import OpticalMemory

    return OpticalMemory(
        args.store,
        model=getattr(args, "model", None),
        profile=getattr(args, "profile", None),
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
    )


def _demo(args: argparse.Namespace) -> int:
    from optical_memory.demo import run_demo

    result = run_demo(
        args.out, transcript=args.transcript, turns=args.turns, store=args.store,
        model=args.model, question=args.ask,
    )
    print(result.plan.table())
    if result.answer is not None:
        print(f"\nQ: {args.ask or result.plan.session_id}\nA: {result.answer}")
    for path in result.pictures:
        print(f"wrote {path}")
    print(f"done in {result.seconds['total']:.1f} s")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from optical_memory.messages import load_transcript
    from optical_memory.stores import TurnConflictError

    # read first: a bad file creates no store. Each message keeps the "turn_id" it carries,
    # which extend honours: a message already stored under its id is not stored twice.
    messages = load_transcript(args.transcript)
    with _open_memory(args) as mem:
        before = mem.store.turn_count(args.session) if messages else 0
        try:
            stored = mem.extend(args.session, messages)
        except TurnConflictError as exc:
            if "nothing" in str(exc):
                raise
            raise TurnConflictError(
                f"{exc}; nothing of {args.transcript} was stored (a transcript is stored in one "
                "batch: all of it or nothing)"
            ) from None
        new = sum(t.index >= before for t in stored)
        print(f"session {args.session!r}: {new} turns appended, {len(stored) - new} already "
              f"stored, {mem.store.turn_count(args.session)} in all ({mem.store.url})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    with _open_memory(args) as mem:
        mem.pages(args.session, progress=True)
        plan = mem.plan(args.session, query=args.query, budget=args.budget)
    print(plan.to_json() if args.json else plan.table())
    if not plan.fits:
        sys.stdout.flush()
        print(
            f"optical-memory plan: over the window: the context needs {plan.total:,} positions "
            f"with every page out of it, {plan.total - plan.window:,} more than the "
            f"{plan.window:,}-position window holds (see the table: pinned text "
            f"{plan.pinned_tokens:,}, recent text {plan.text_tokens:,}, query "
            f"{plan.query_tokens:,}, answer reserve "
            f"{plan.answer_tokens:,}, prompt {plan.overhead:,})",
            file=sys.stderr,
        )
        return 1
    return 0


def _ask(args: argparse.Namespace) -> int:
    with _open_memory(args) as mem:
        for piece in mem.stream(args.session, args.question, args.max_new_tokens, progress=True):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _messages(args: argparse.Namespace) -> int:
    import json

    with _open_memory(args) as mem:
        messages = mem.messages(args.session, args.query, budget=args.budget)
    print(json.dumps(messages, indent=1, ensure_ascii=False))
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _open_memory(args) as mem:
        print(mem.stats(args.session).table())
    return 0


def _search(args: argparse.Namespace) -> int:
    import json

    with _open_memory(args) as mem:
        hits = [(h, mem.turns(args.session, h.turn, h.turn + 1)[0])
                for h in mem.search(args.session, args.query, args.limit)]
    for hit, turn in hits:
        print(json.dumps({"turn": hit.turn, "score": round(hit.score, 4), "turn_id": turn.turn_id,
                          "role": turn.role, "content": turn.content}, ensure_ascii=False))
    return 0


def _sessions(args: argparse.Namespace) -> int:
    with _open_memory(args) as mem:
        for session_id in mem.sessions():
            print(session_id)
    return 0


def _turns(args: argparse.Namespace) -> int:
    import json

    with _open_memory(args) as mem:
        turns = mem.turns(args.session)
    if args.json:
        records = [
            {**t.to_message(), "turn_id": t.turn_id, "index": t.index, "created": t.created}
            for t in turns
        ]
        print(json.dumps(records, indent=1, ensure_ascii=False))
    else:
        for t in turns:
            print(json.dumps({**t.to_message(), "turn_id": t.turn_id}, ensure_ascii=False))
    return 0


def _export(args: argparse.Namespace) -> int:
    import tempfile

    with _open_memory(args) as mem:
        if args.out is not None:
            count = mem.export_jsonl(args.session, args.out)
            print(f"session {args.session!r}: {count} turns -> {args.out}", file=sys.stderr)
            return 0
        with tempfile.TemporaryDirectory() as tmp:  # export_jsonl writes files: copy it out
            mem.export_jsonl(args.session, Path(tmp) / "session.jsonl")
            data = (Path(tmp) / "session.jsonl").read_bytes()
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _delete(args: argparse.Namespace) -> int:
    from optical_memory.memory import check_id

    check_id(args.session, "session id")
    with _open_memory(args) as mem:
        count = mem.store.turn_count(args.session)
        if not mem.delete(args.session):
            print(f"optical-memory delete: unknown session {args.session!r}: it holds no turns; "
                  "nothing deleted", file=sys.stderr)
            return 1
    print(f"session {args.session!r} deleted ({count} turns, its pages and cache entries)")
    return 0


def _pin(args: argparse.Namespace) -> int:
    with _open_memory(args) as mem:
        verb = "unpin" if args.unpin else "pin"
        if not hasattr(mem, verb):
            raise SystemExit(f"optical-memory pin: this OpticalMemory has no {verb}() yet")
        getattr(mem, verb)(args.session, args.turn_id)
    print(f"turn {args.turn_id!r} of session {args.session!r} {verb}ned")
    return 0


_MODEL_HELP = (
    "a DeepSeek-OCR checkpoint directory, or a backend spec such as "
    "openai:http://127.0.0.1:8001/v1?model=NAME&profile=qwen2.5-vl"
)
_PROFILES = "deepseek-ocr (default), deepseek-ocr-vllm, qwen2-vl, qwen2.5-vl, gpt-4o"


def _add_memory_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="page, plan and picture a long conversation (no GPU, no weights)"
    )
    p.add_argument("--out", default="out/demo", help="directory for the pictures and plan.json")
    p.add_argument(
        "--transcript", help="JSONL or JSON array of messages (default: a synthetic one)"
    )
    p.add_argument("--turns", type=int, default=1000, help="turns of the synthetic conversation")
    p.add_argument("--model", help="also answer --ask with this model: " + _MODEL_HELP)
    p.add_argument("--ask", help="question to answer with --model")
    _store_option(p, "OUT/memory.sqlite3")
    p.set_defaults(handler=_memory_errors(_demo))

    p = sub.add_parser(
        "ingest", help="append a transcript to a session (a message's turn_id makes it idempotent)"
    )
    p.add_argument("session")
    p.add_argument(
        "transcript", help="JSONL file of messages, JSON array of messages, or - for stdin"
    )
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_ingest))

    p = sub.add_parser("plan", help="show what the context of a session would hold")
    p.add_argument("session")
    p.add_argument("--query", help="the question the context is for (counts its tokens)")
    p.add_argument("--budget", type=int, help="decoder positions (default: the window, 8192)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_plan))

    p = sub.add_parser("messages", help="the context for a query as OpenAI chat messages (JSON)")
    p.add_argument("session")
    p.add_argument("--query", help="the question the context is for (sent last)")
    p.add_argument("--budget", type=int, help="positions (default: the profile's window)")
    p.add_argument("--profile", help="how the reading model counts images: " + _PROFILES)
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_messages))

    p = sub.add_parser("ask", help="answer a question from a session's memory (needs --model)")
    p.add_argument("session")
    p.add_argument("question")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the reserve)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", help="bfloat16, float32, ... (default: bf16 on GPU, fp32 on CPU)")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_ask))

    p = sub.add_parser("stats", help="turns, pages per mode, cache use of a session")
    p.add_argument("session")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_stats))

    p = sub.add_parser("search", help="the turns that best match a query (BM25), as JSONL")
    p.add_argument("session")
    p.add_argument("query")
    p.add_argument("--limit", type=int, default=10, help="at most this many turns (default 10)")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_search))

    p = sub.add_parser("sessions", help="the sessions of the store, one id per line")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_sessions))

    p = sub.add_parser("turns", help="the stored messages of a session, as JSONL with turn_id")
    p.add_argument("session")
    p.add_argument(
        "--json", action="store_true", help="one JSON array, with each turn's index and time"
    )
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_turns))

    p = sub.add_parser("export", help="a session as JSONL (what ingest and import_jsonl read)")
    p.add_argument("session")
    p.add_argument("--out", help="file to write (default: standard output)")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_export))

    p = sub.add_parser("delete", help="remove a session, its pages and cache entries")
    p.add_argument("session")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_delete))

    p = sub.add_parser("pin", help="keep a turn as text at the start of every context")
    p.add_argument("session")
    p.add_argument("turn_id")
    p.add_argument("--unpin", action="store_true", help="page the turn again like any other")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_pin))


# --- mcp (integrations) --------------------------------------------------------
def _add_mcp(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mcp", help="serve the memory to MCP clients (stdio, or streamable HTTP with --port)"
    )
    p.add_argument("--profile", help="how the reading model counts images: " + _PROFILES)
    p.add_argument(
        "--port", type=int, help="serve streamable HTTP at http://HOST:PORT/mcp (default: stdio)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address for --port (default: 127.0.0.1)")
    _store_option(p)
    p.set_defaults(handler=_memory_errors(_mcp))


def _mcp(args: argparse.Namespace) -> int:
    try:
        from optical_memory.integrations.mcp import serve
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "mcp":
            raise
        raise SystemExit(
            "optical-memory mcp: needs the MCP Python SDK: pip install 'optical-memory[mcp]'"
        ) from None
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1 to 65535, got {args.port}")
    import signal

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)  # unwinds the server (uvicorn shuts down first) and closes the store

    signal.signal(signal.SIGTERM, stop)
    try:
        serve(args.store, profile=args.profile, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


# --- serve (apps/server) -------------------------------------------------------
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible chat endpoint with memory, a REST API and a memory viewer",
    )
    _store_option(p)
    p.add_argument(
        "--model",
        help="the backend that answers: a DeepSeek-OCR checkpoint directory or "
        "openai:http://host/v1?model=NAME&profile=NAME",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--keys",
        help="API keys file: lines 'TENANT SHA256-OF-KEY' (also $OPTICAL_MEMORY_API_KEYS); "
        "without keys the server is open",
    )
    p.add_argument(
        "--add-key", metavar="TENANT",
        help="make a new key for TENANT, append its hash to --keys, print the key, and exit",
    )
    p.add_argument(
        "--max-body", type=int, default=16 * 1024 * 1024,
        help="bytes of one request body; larger ones get 413 (default: 16 MiB)",
    )
    p.add_argument("--device", help="cpu or cuda for a local checkpoint")
    p.add_argument("--threads", type=int, help="worker threads for memory and model calls")
    p.add_argument(
        "--debug", action="store_true", help="debug logs, which include message content"
    )
    p.set_defaults(handler=_memory_errors(_serve))


def _serve(args: argparse.Namespace) -> int:
    try:
        from optical_memory.apps import server
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("starlette", "uvicorn", "prometheus_client"):
            raise
        raise SystemExit(
            "optical-memory serve: needs the server libraries: pip install 'optical-memory[serve]'"
        ) from None
    if args.add_key is not None:
        if not args.keys:
            raise ValueError("--add-key needs --keys FILE (the file that keeps the key's hash)")
        key = server.add_key(args.keys, args.add_key)
        print(key)
        print(f"(the key of tenant {args.add_key!r}; {args.keys} keeps only its hash)",
              file=sys.stderr)
        return 0
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1 to 65535, got {args.port}")
    if args.max_body < 1024:
        raise ValueError(f"--max-body must be at least 1024 bytes, got {args.max_body}")
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve(
            args.store, args.model, host=args.host, port=args.port, keys_file=args.keys,
            max_body=args.max_body, debug=args.debug, device=args.device,
            threads=args.threads,
        )
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    from optical_memory import __version__

    parser = argparse.ArgumentParser(
        prog="optical-memory",
        description="Long-context chat memory: old turns as vision tokens that fade with age.",
    )
    parser.add_argument("--version", action="version", version=f"optical-memory {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_render(sub)
    _add_check_checkpoint(sub)
    _add_ocr(sub)
    _add_memory_commands(sub)
    _add_mcp(sub)
    _add_serve(sub)
    from optical_memory.apps.worker import add_worker

    add_worker(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
