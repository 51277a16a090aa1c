"""What the memory needs of a model: the `Backend` interface (no torch here).

A backend tells the planner how its model counts: the window in positions, the
tier table (for each tier, the page geometry it is sent at and what one page
costs, see `profiles`), and how many tokens a text takes. It answers a
`Prompt` (the planned context: pinned text, pages, recent turns, the query),
in one piece or streamed.

Implementing a backend: subclass `Backend`, set `name` and `profile`, give a
`counter` (anything with `name` and `count(text)`), and implement `answer`.
`stream` defaults to one piece holding the whole answer; override it when the
model can stream. Raise `BackendError` (naming the backend) for anything the
model or its server did wrong, so the memory stores nothing for that question.
Register the class with `register_backend` to open it by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optical_memory.backends.profiles import Profile, Tier
from optical_memory.tokens import TokenCounter, default_counter

if TYPE_CHECKING:
    from optical_memory.plan import Plan
    from optical_memory.prompt import Prompt


class BackendError(RuntimeError):
    """The model or its server failed to answer; the message names the backend."""


@dataclass(frozen=True)
class Answer:
    """A backend's answer: its text and the usage its server reported (if any); from
    `OpticalMemory.ask` also the turn ids stored and the context's positions by kind."""

    text: str
    backend: str
    model: str
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    question_id: str | None = None  # set by OpticalMemory.ask: the stored turns
    answer_id: str | None = None
    positions: dict[str, int] | None = None  # the context by kind (see Plan.positions)
    plan: Plan | None = field(default=None, repr=False, compare=False)  # the context's plan

    def __str__(self) -> str:
        return self.text


@dataclass
class AnswerStream:
    """Text pieces of an answer as they arrive; `answer` is set once the pieces are exhausted."""

    pieces: Iterator[str]
    answer: Answer | None = field(default=None, init=False)

    def __iter__(self) -> Iterator[str]:
        return self.pieces


class Backend(ABC):
    """A model that reads the memory's context. See the module docstring for implementers."""

    name: str = "backend"
    profile: Profile

    @classmethod
    def from_spec(cls, argument: str | None, **options: Any) -> Backend:
        """Open from the ARGUMENT of a "NAME:ARGUMENT" spec (default: takes none, only options)."""
        if argument:
            raise ValueError(f"backend {cls.name!r} takes no argument, got {argument!r}")
        return cls(**options)

    @property
    def window(self) -> int:
        """Positions the model reads: context, page images and answer together."""
        return self.profile.window

    @property
    def counter(self) -> TokenCounter:
        """Counts text tokens as the model does (default: the tiktoken cl100k estimate)."""
        return default_counter()

    def count_tokens(self, text: str) -> int:
        return self.counter.count(text)

    def tiers(self, canvas: tuple[int, int]) -> dict[str, Tier]:
        """Tier name -> geometry and cost of one page rendered on `canvas` (width, height)."""
        return self.profile.tiers(canvas)

    @property
    def description(self) -> str:
        """How errors name this backend, e.g. "openai backend (http://host/v1, model qwen)"."""
        return f"{self.name} backend"

    @abstractmethod
    def answer(
        self, prompt: Prompt, *, max_tokens: int, progress: bool = False, **options: Any
    ) -> Answer:
        """The model's answer to `prompt`, at most `max_tokens` tokens long. `progress` shows
        progress bars for long local work (encoding pages); `options` are model settings."""

    def stream(
        self, prompt: Prompt, *, max_tokens: int, progress: bool = False, **options: Any
    ) -> AnswerStream:
        """The answer in pieces as they are generated (default: one piece)."""
        result = AnswerStream(iter(()))

        def pieces() -> Iterator[str]:
            result.answer = self.answer(
                prompt, max_tokens=max_tokens, progress=progress, **options
            )
            yield result.answer.text

        result.pieces = pieces()
        return result
