"""Any OpenAI-compatible chat endpoint that takes `image_url` parts, through the `openai` client.

vLLM and SGLang (Qwen2.5-VL, DeepSeek-OCR, ...) and hosted GPT-4o-class models
all speak this protocol. The memory's context goes out as `Prompt.messages()`:
pages as PNG data URLs at the profile's tier geometry, recent turns as text.

    backend = OpenAIBackend("http://127.0.0.1:8001/v1", "Qwen/Qwen2.5-VL-7B-Instruct",
                            profile="qwen2.5-vl", window=32768)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import openai

from optical_memory.backends.base import Answer, AnswerStream, Backend, BackendError
from optical_memory.backends.profiles import Profile, get_profile

if TYPE_CHECKING:
    from optical_memory.prompt import Prompt


class OpenAIBackend(Backend):
    """A chat model behind an OpenAI-compatible `base_url` (e.g. "http://host:8000/v1").

    `profile`: how the model counts images (a name from `PROFILES` or a `Profile`);
    `window` overrides the profile's. `api_key` defaults to $OPENAI_API_KEY (servers that
    need none get a placeholder). `timeout` is in seconds per request; `max_retries` as
    the `openai` client's.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        profile: str | Profile = "gpt-4o",
        *,
        window: int | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"openai backend: base URL must be http(s)://host[:port]/..., "
                             f"got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"openai backend ({base_url}): model must be a non-empty string")
        try:
            resolved = get_profile(profile)
        except ValueError as exc:
            raise ValueError(f"openai backend ({base_url}, model {model}): {exc}") from None
        self.profile = resolved.with_window(window) if window is not None else resolved
        self.base_url, self.model, self.timeout = base_url, model, timeout
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused",
            timeout=timeout,
            max_retries=max_retries,
        )

    @classmethod
    def from_spec(cls, argument: str | None, **options: Any) -> OpenAIBackend:
        """From "openai:http(s)://host/v1?model=NAME&profile=NAME&window=N"."""
        if not argument:
            raise ValueError("backend 'openai' needs a URL: openai:http://host/v1?model=NAME")
        parts = urlsplit(argument)
        query = dict(parse_qsl(parts.query))
        unknown = set(query) - {"model", "profile", "window", "timeout"}
        if unknown:
            raise ValueError(f"openai backend {argument!r}: unknown parameters {sorted(unknown)}")
        if "model" not in query:
            raise ValueError(f"openai backend {argument!r}: the URL needs ?model=NAME")
        for key in ("window", "timeout"):
            if key in query:
                try:
                    query[key] = (int if key == "window" else float)(query[key])
                except ValueError:
                    raise ValueError(f"openai backend {argument!r}: {key} must be a number") from None
        base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        model = query.pop("model")
        return cls(base, model, **{**query, **options})

    @property
    def description(self) -> str:
        return f"openai backend ({self.base_url}, model {self.model})"

    def _failure(self, exc: openai.OpenAIError) -> BackendError:
        if isinstance(exc, openai.APITimeoutError):
            reason = f"no answer within {self.timeout:g} s"
        elif isinstance(exc, openai.APIStatusError):
            body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
            message = body.get("message") if isinstance(body, dict) else None
            reason = f"HTTP {exc.status_code}: {message or exc.message}"
        elif isinstance(exc, openai.APIConnectionError):
            reason = f"cannot connect: {exc.__cause__ or exc}"
        else:
            reason = str(exc)
        return BackendError(f"{self.description}: {reason}")

    def _request(self, prompt: Prompt, max_tokens: int, options: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "messages": prompt.messages(), "max_tokens": max_tokens,
                **options}

    def answer(
        self, prompt: Prompt, *, max_tokens: int, progress: bool = False, **options: Any
    ) -> Answer:
        """`options` are passed to `chat.completions.create` (temperature, top_p, seed, ...)."""
        try:
            response = self._client.chat.completions.create(
                **self._request(prompt, max_tokens, options)
            )
        except openai.OpenAIError as exc:
            raise self._failure(exc) from exc
        if not response.choices:
            raise BackendError(f"{self.description}: the response holds no choices")
        choice = response.choices[0]
        return Answer(
            choice.message.content or "", self.name, response.model or self.model,
            usage=response.usage.model_dump(exclude_none=True) if response.usage else None,
            finish_reason=choice.finish_reason,
        )

    def stream(
        self, prompt: Prompt, *, max_tokens: int, progress: bool = False, **options: Any
    ) -> AnswerStream:
        request = self._request(prompt, max_tokens, options)
        result = AnswerStream(iter(()))

        def pieces() -> Iterator[str]:
            text, usage, finish, model = [], None, None, self.model
            try:
                chunks = self._client.chat.completions.create(
                    **request, stream=True, stream_options={"include_usage": True}
                )
                for chunk in chunks:
                    model = chunk.model or model
                    if chunk.usage is not None:
                        usage = chunk.usage.model_dump(exclude_none=True)
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                        if choice.delta.content:
                            text.append(choice.delta.content)
                            yield choice.delta.content
            except openai.OpenAIError as exc:
                raise self._failure(exc) from exc
            result.answer = Answer("".join(text), self.name, model, usage, finish)

        result.pieces = pieces()
        return result
