"""`optical-memory` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optical_memory.memory import OpticalMemory


# --- render (renderers) -------------------------------------------------------
def _add_render(sub: argparse._SubParsersAction) -> None:
    from optical_memory.modes import MODES

    p = sub.add_parser("render", help="render a transcript to page PNGs and pages.json")
    p.add_argument("transcript", help="JSONL file of messages, JSON array of messages, or - for stdin")
    p.add_argument("--out", required=True, help="directory for page-NNNN.png and pages.json")
    p.add_argument("--mode", choices=list(MODES), default="gundam", help="page geometry (default: gundam)")
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
    p.add_argument("--prompt", default="<image>\nFree OCR.", help="prompt with one <image> placeholder")
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
    for piece in model.stream(
        split_prompt(args.prompt, [page]), max_new_tokens=args.max_new_tokens, no_repeat_ngram_size=20
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# --- memory commands: demo, ingest, plan, ask, stats --------------------------
def _store_option(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--store",
        help=f"sqlite:///path, a file path, or redis://host:port/db (default: {default_help})",
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

    mem = _open_memory(args)
    stored = mem.extend(args.session, load_transcript(args.transcript))
    print(f"session {args.session!r}: {len(stored)} turns appended, "
          f"{mem.store.turn_count(args.session)} in all ({mem.store.url})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    mem = _open_memory(args)
    mem.pages(args.session, progress=True)
    plan = mem.plan(args.session, query=args.query, budget=args.budget)
    print(json.dumps(plan.to_json(), indent=1) if args.json else plan.table())
    return 0


def _ask(args: argparse.Namespace) -> int:
    mem = _open_memory(args)
    for piece in mem.stream(args.session, args.question, args.max_new_tokens, progress=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _messages(args: argparse.Namespace) -> int:
    import json

    mem = _open_memory(args)
    messages = mem.messages(args.session, args.query, budget=args.budget)
    print(json.dumps(messages, indent=1, ensure_ascii=False))
    return 0


def _stats(args: argparse.Namespace) -> int:
    print(_open_memory(args).stats(args.session).table())
    return 0


_MODEL_HELP = (
    "a DeepSeek-OCR checkpoint directory, or a backend spec such as "
    "openai:http://127.0.0.1:8001/v1?model=NAME&profile=qwen2.5-vl"
)
_PROFILES = "deepseek-ocr (default), deepseek-ocr-vllm, qwen2-vl, qwen2.5-vl, gpt-4o"


def _add_memory_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="page, plan and picture a long conversation (no GPU, no weights)")
    p.add_argument("--out", default="out/demo", help="directory for the pictures and plan.json")
    p.add_argument("--transcript", help="JSONL or JSON array of messages (default: a synthetic one)")
    p.add_argument("--turns", type=int, default=1000, help="turns of the synthetic conversation")
    p.add_argument("--model", help="also answer --ask with this model: " + _MODEL_HELP)
    p.add_argument("--ask", help="question to answer with --model")
    _store_option(p, "OUT/memory.sqlite3")
    p.set_defaults(handler=_memory_errors(_demo))

    p = sub.add_parser("ingest", help="append a transcript to a session")
    p.add_argument("session")
    p.add_argument("transcript", help="JSONL file of messages, JSON array of messages, or - for stdin")
    _store_option(p, "the embedded SQLite file")
    p.set_defaults(handler=_memory_errors(_ingest))

    p = sub.add_parser("plan", help="show what the context of a session would hold")
    p.add_argument("session")
    p.add_argument("--query", help="the question the context is for (counts its tokens)")
    p.add_argument("--budget", type=int, help="decoder positions (default: the window, 8192)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _store_option(p, "the embedded SQLite file")
    p.set_defaults(handler=_memory_errors(_plan))

    p = sub.add_parser("messages", help="the context for a query as OpenAI chat messages (JSON)")
    p.add_argument("session")
    p.add_argument("--query", help="the question the context is for (sent last)")
    p.add_argument("--budget", type=int, help="positions (default: the profile's window)")
    p.add_argument("--profile", help="how the reading model counts images: " + _PROFILES)
    _store_option(p, "the embedded SQLite file")
    p.set_defaults(handler=_memory_errors(_messages))

    p = sub.add_parser("ask", help="answer a question from a session's memory (needs --model)")
    p.add_argument("session")
    p.add_argument("question")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the reserve)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", help="bfloat16, float32, ... (default: bf16 on GPU, fp32 on CPU)")
    _store_option(p, "the embedded SQLite file")
    p.set_defaults(handler=_memory_errors(_ask))

    p = sub.add_parser("stats", help="turns, pages per mode, cache use of a session")
    p.add_argument("session")
    _store_option(p, "the embedded SQLite file")
    p.set_defaults(handler=_memory_errors(_stats))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optical-memory",
        description="Long-context chat memory: old turns as vision tokens that fade with age.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_render(sub)
    _add_check_checkpoint(sub)
    _add_ocr(sub)
    _add_memory_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
