"""A small client for OpenAI-compatible chat-completions endpoints, and description generation.

Only the standard library is used (``urllib``), so any server that speaks the protocol works:
OpenAI, Azure-style proxies, vLLM, llama.cpp, Ollama (``/v1``), LM Studio...
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .descriptions import DescriptionSet, load_descriptions, save_descriptions
from .errors import LLMError
from .templates import format_question

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
SYSTEM_PROMPT = (
    "You describe the visual appearance of object categories for an image classifier. "
    "Answer in one or two sentences, mention only what can be seen (shape, colour, parts, material, "
    "typical surroundings) and start directly with the description."
)

# Errors that mean "nothing listens there" rather than "the server had a hiccup".
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}


def _is_unreachable(reason: object) -> bool:
    if isinstance(reason, socket.gaierror | ConnectionRefusedError):
        return True
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS


def _error_message(body: bytes) -> str:
    """The server's own error text (OpenAI puts it in ``error.message``), shortened to one line."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        text = err.get("message", text) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    text = " ".join(str(text).split())
    return text[:200] + ("..." if len(text) > 200 else "")


class ChatClient:
    """POST ``{base_url}/chat/completions`` with retries (429, 5xx, timeouts), backoff and a rate limit.

    ``rate_limit`` is in requests per second (0 = unlimited). An endpoint that cannot be reached at
    all (refused connection, unknown host) fails at once, before any request has succeeded.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        rate_limit: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.min_interval = 1.0 / rate_limit if rate_limit > 0 else 0.0
        self.sleep = sleep
        self.clock = clock
        self.requests_sent = 0
        self._succeeded = False
        self._next_slot = 0.0

    @classmethod
    def from_env(cls, model: str | None = None, base_url: str | None = None, **kwargs: Any) -> ChatClient:
        """Client configured from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (arguments take precedence)."""
        return cls(
            base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            model or DEFAULT_MODEL,
            os.environ.get("OPENAI_API_KEY") or None,
            **kwargs,
        )

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _wait_for_slot(self) -> None:
        if not self.min_interval:
            return
        now = self.clock()
        if self._next_slot > now:
            self.sleep(self._next_slot - now)
            now = self._next_slot
        self._next_slot = now + self.min_interval

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            self._wait_for_slot()
            self.requests_sent += 1
            retry_after: float | None = None
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
                self._succeeded = True
                try:
                    return json.loads(body)
                except json.JSONDecodeError as e:
                    raise LLMError(f"{self.url} answered with something that is not JSON: {body[:80]!r}") from e
            except urllib.error.HTTPError as e:
                message = _error_message(e.read())
                if e.code != 429 and e.code < 500:
                    hint = {
                        401: " (set OPENAI_API_KEY)",
                        403: " (check OPENAI_API_KEY's permissions)",
                        404: " (check OPENAI_BASE_URL, usually ending in /v1, and --llm-model)",
                    }.get(e.code, "")
                    raise LLMError(f"{self.url} refused the request: HTTP {e.code}: {message}{hint}") from e
                last = f"HTTP {e.code}: {message}"
                header = e.headers.get("Retry-After") if e.headers else None
                if header:
                    try:
                        retry_after = float(header)
                    except ValueError:
                        retry_after = None
            except urllib.error.URLError as e:
                if _is_unreachable(e.reason) and not self._succeeded:
                    raise LLMError(
                        f"cannot reach the chat-completions endpoint {self.url} ({e.reason}); "
                        "set OPENAI_BASE_URL to a running server or check the network"
                    ) from e
                last = str(e.reason)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                wait = min(self.backoff * 2**attempt, self.max_backoff)
                if retry_after is not None:
                    wait = min(max(wait, retry_after), self.max_backoff)
                self.sleep(wait)
        raise LLMError(f"{self.url} failed {self.max_retries + 1} times; last error: {last}")

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        n: int = 1,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[str]:
        """The contents of the returned choices (servers may return fewer than ``n``)."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages}
        if n > 1:
            payload["n"] = n
        if temperature is not None:
            payload["temperature"] = temperature
        if max_tokens:
            payload["max_tokens"] = max_tokens
        obj = self._post(payload)
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list):
            raise LLMError(f"{self.url} answered without a 'choices' list")
        contents = []
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                contents.append(content)
        return contents


_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")


def clean_description(text: str) -> str:
    """One line of text: list markers, surrounding quotes and line breaks removed."""
    def unquote(s: str) -> str:
        s = s.strip()
        return s[1:-1].strip() if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'" else s

    text = " ".join(unquote(_LIST_MARKER.sub("", unquote(line))) for line in unquote(text).splitlines())
    return " ".join(text.split())


def _describe_question(
    client: ChatClient, question: str, count: int, n_per_request: int, temperature: float | None, max_tokens: int
) -> list[str]:
    """``count`` answers to one question, asking again while the server returns fewer."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    answers: list[str] = []
    empty_rounds = 0
    while len(answers) < count:
        n = max(1, min(n_per_request, count - len(answers)))
        got = [d for d in map(clean_description, client.complete(
            messages, n=n, temperature=temperature, max_tokens=max_tokens)) if d]
        if not got:
            empty_rounds += 1
            if empty_rounds >= 3:
                raise LLMError(f"{client.url} keeps returning empty answers to {question!r}")
        answers.extend(got)
    return answers[:count]


def describe_classes(
    client: ChatClient,
    class_names: Sequence[str],
    questions: Sequence[str],
    out: str | Path,
    *,
    per_question: int = 10,
    n_per_request: int | None = None,
    temperature: float | None = 0.99,
    max_tokens: int = 80,
    dataset: str | None = None,
    progress: bool = True,
) -> DescriptionSet:
    """Ask ``per_question`` descriptions per question and class; cache them in ``out``.

    Classes that ``out`` already holds with enough descriptions are not asked again, and the file is
    rewritten (atomically) after every class, so an interrupted run resumes where it stopped.
    """
    out = Path(out)
    wanted = per_question * len(questions)
    existing = load_descriptions(out) if out.exists() else DescriptionSet({}, {})
    found = dict(existing.descriptions)
    meta = {
        **existing.meta,
        "source": "LLM output (OpenAI-compatible chat completions)",
        "dataset": dataset,
        "llm_model": client.model,
        "base_url": client.base_url,
        "system_prompt": SYSTEM_PROMPT,
        "questions": list(questions),
        "per_question": per_question,
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    todo = [c for c in class_names if len(found.get(c, [])) < wanted]
    n_per_request = n_per_request or per_question
    # delay: a run that fails on its first request prints its error line and no empty bar
    for name in tqdm(todo, desc="describe", unit="class", disable=not progress or not todo, delay=1.0):
        answers: list[str] = []
        for question in questions:
            answers += _describe_question(client, format_question(question, name), per_question,
                                          n_per_request, temperature, max_tokens)
        found[name] = answers
        meta["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # Dataset order first, then anything else the file held before.
        ordered = {c: found[c] for c in class_names if c in found}
        ordered.update({c: v for c, v in found.items() if c not in ordered})
        save_descriptions(out, ordered, meta)
    if not todo and not out.exists():
        save_descriptions(out, found, meta)
    return load_descriptions(out)
