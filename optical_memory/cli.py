"""`optical-memory` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _not_ready(args: argparse.Namespace) -> int:
    raise SystemExit(f"optical-memory {args.command}: not available in this build")


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
    from optical_memory.model import CheckpointError, check_checkpoint

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
    p.set_defaults(handler=_not_ready)


# --- memory commands: demo, ingest, plan, ask, stats --------------------------
def _add_memory_commands(sub: argparse._SubParsersAction) -> None:
    for name, help_text in [
        ("demo", "page, plan and picture a long conversation (no GPU, no weights)"),
        ("ingest", "append a transcript to a session"),
        ("plan", "show what the context of a session would hold"),
        ("ask", "answer a question from a session's memory (needs --model)"),
        ("stats", "turns, pages per mode, cache use of a session"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(handler=_not_ready)


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
