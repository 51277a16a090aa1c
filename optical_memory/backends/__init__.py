"""Models that read the memory, behind one interface, registered by name.

    from optical_memory.backends import OpenAIBackend, open_backend

    qwen = OpenAIBackend("http://127.0.0.1:8001/v1", "Qwen/Qwen2.5-VL-7B-Instruct",
                         profile="qwen2.5-vl")
    local = open_backend("/models/DeepSeek-OCR")            # a checkpoint directory
    same = open_backend("deepseek-ocr:/models/DeepSeek-OCR")
    gpt = open_backend("openai:https://api.openai.com/v1?model=gpt-4o&profile=gpt-4o")

A spec is `NAME` or `NAME:ARGUMENT` for a registered backend, or a checkpoint
directory. Backends are imported on first use, so this package needs no torch.
"""

from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path
from typing import Any

from optical_memory.backends.base import Answer, AnswerStream, Backend, BackendError
from optical_memory.backends.profiles import PROFILES, Profile, Tier, get_profile

__all__ = [
    "BACKENDS",
    "PROFILES",
    "Answer",
    "AnswerStream",
    "Backend",
    "BackendError",
    "OpenAIBackend",
    "Profile",
    "Tier",
    "get_profile",
    "open_backend",
    "register_backend",
]

# name -> "module:Class"; the class opens a spec argument with `from_spec(argument, **options)`
BACKENDS: dict[str, str] = {
    "deepseek-ocr": "optical_memory.backends.deepseek_ocr.backend:DeepSeekOCRBackend",
    "openai": "optical_memory.backends.openai:OpenAIBackend",
}


def register_backend(name: str, target: str | type[Backend]) -> None:
    """Make `open_backend("NAME[:ARGUMENT]")` open `target` (a class or "module:Class")."""
    if not name or ":" in name:
        raise ValueError(f"backend name must be non-empty and have no ':', got {name!r}")
    BACKENDS[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered backends: {', '.join(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(import_module(module), attr)


def open_backend(spec: str | os.PathLike | Backend, **options: Any) -> Backend:
    """A backend from a spec (see the module docstring); `options` go to its constructor."""
    if isinstance(spec, Backend):
        return spec
    text = os.fspath(spec)
    if Path(text).is_dir():
        return backend_class("deepseek-ocr").from_spec(text, **options)
    name, sep, argument = text.partition(":")
    if name not in BACKENDS:
        raise ValueError(
            f"backend {text!r}: not a checkpoint directory and not a registered backend "
            f"(NAME or NAME:ARGUMENT with NAME one of {', '.join(BACKENDS)})"
        )
    return backend_class(name).from_spec(argument if sep else None, **options)


def __getattr__(name: str) -> Any:
    if name == "OpenAIBackend":
        return backend_class("openai")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
