"""optical-memory: long-context chat memory compressed into vision tokens.

Public names are imported lazily so that `import optical_memory` stays cheap
(no torch import) for the parts that need no model.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "OpticalMemory": "optical_memory.memory",
    "Mode": "optical_memory.modes",
    "MODES": "optical_memory.modes",
    "get_mode": "optical_memory.modes",
    "Message": "optical_memory.messages",
    "load_encoder": "optical_memory.backends.deepseek_ocr",
    "load_model": "optical_memory.backends.deepseek_ocr",
}

__all__ = [
    "MODES",
    "Message",
    "Mode",
    "OpticalMemory",
    "__version__",
    "get_mode",
    "load_encoder",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optical_memory' has no attribute {name!r}")
