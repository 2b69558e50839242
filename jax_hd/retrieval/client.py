"""The rollout's search backend: in-process or Search-R1-compatible HTTP, with timeouts, retries and error text.

The rollout calls `SearchClient.search_or_error(queries)` once per turn with the queries of every rollout that issued
a `<search>`; it never raises for a backend failure. Each query gets a `SearchResult` whose `text` is the body of the
observation block, which the rollout wraps with `format_observation` (`<information>` for Search-R1, `<documents>`
for AutoRefine):

* success: `format_information(passages)`, Search-R1's `_passages2string`: one line `Doc {i}(Title: {title}) {text}`
  per passage, i from 1, where `title` is the first line of `contents` (quotes kept) and `text` the rest;
* failure (after retries): `failure_text`, default `DEFAULT_FAILURE_TEXT`;
* empty query (blank after stripping): `empty_query_text`, default `DEFAULT_EMPTY_QUERY_TEXT`; the backend is not
  called.

Query preprocessing: a query is stripped; if it has more than `max_query_words` whitespace-separated words, the first
`max_query_words` are kept, joined by single spaces; if it is then longer than `max_query_chars` characters, it is cut
at the last word boundary at or before that length (hard cut if the first word alone is too long). Queries within the
limits are sent exactly as stripped, as Search-R1 does.

Failure handling: each request is tried at most `1 + max_retries` times, sleeping `backoff_s * 2**attempt` (capped at
`max_backoff_s`) between tries. Retried: connection errors, timeouts, HTTP 5xx/408/429, exceptions raised by an
in-process retriever. Not retried: other HTTP 4xx and malformed responses. `timeout_s` is the socket timeout of each
blocking HTTP operation (connect, each read); the in-process backend has no timeout. Queries are sent in chunks of at
most `max_queries_per_request`; a failed chunk fails only its own queries.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol

from jax_hd.retrieval import Passage, Retriever

DEFAULT_FAILURE_TEXT = (
    "Search failed: the search engine returned an error, so no documents were retrieved for this query. "
    "You may search again or answer from what you already know."
)
DEFAULT_EMPTY_QUERY_TEXT = (
    "No search was run because the query was empty. Write the search query between <search> and </search>."
)
DEFAULT_TOPK = 3
DEFAULT_MAX_QUERY_WORDS = 64
DEFAULT_MAX_QUERY_CHARS = 512

STATUS_OK = "ok"
STATUS_EMPTY_QUERY = "empty_query"
STATUS_FAILED = "failed"

_RETRYABLE_HTTP_CODES = frozenset({408, 429})
_MAX_ERROR_BODY_CHARS = 500


class SearchError(RuntimeError):
    """A search request that failed; `retryable` tells whether trying again may help."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


# ----------------------------------------------------------------------------------------------------------------
# Observation text.


def split_contents(contents: str) -> tuple[str, str]:
    """(title, text) of a Search-R1 corpus `contents`: the first line (quotes kept) and the remaining lines."""
    lines = contents.split("\n")
    return lines[0], "\n".join(lines[1:])


def format_information(passages: Sequence[Passage]) -> str:
    """Search-R1's document block text: `Doc {i}(Title: {title}) {text}\\n` per passage, i from 1; "" for none."""
    lines = []
    for index, passage in enumerate(passages, start=1):
        title, text = split_contents(passage.contents)
        lines.append(f"Doc {index}(Title: {title}) {text}\n")
    return "".join(lines)


def format_observation(body: str, tag: str = "information") -> str:
    """The observation appended after a `<search>`, as Search-R1 builds it: `\\n\\n<tag>{body.strip()}</tag>\\n\\n`.

    `tag` is "information" for Search-R1 and "documents" for AutoRefine.
    """
    return f"\n\n<{tag}>{body.strip()}</{tag}>\n\n"


# ----------------------------------------------------------------------------------------------------------------
# Query preprocessing.


def truncate_query(query: str, max_words: int, max_chars: int) -> tuple[str, bool]:
    """(query to send, whether it was truncated); see the module docstring for the rule."""
    stripped = query.strip()
    words = stripped.split()
    truncated = False
    if len(words) > max_words:
        stripped, truncated = " ".join(words[:max_words]), True
    if len(stripped) > max_chars:
        cut = stripped[:max_chars]
        at_boundary = stripped[max_chars].isspace()
        if not at_boundary and any(ch.isspace() for ch in cut):
            cut = cut[: max(i for i, ch in enumerate(cut) if ch.isspace())]
        stripped, truncated = cut.rstrip(), True
    return stripped, truncated


# ----------------------------------------------------------------------------------------------------------------
# Backends.


class _Backend(Protocol):
    def retrieve(self, queries: list[str], topk: int) -> list[list[Passage]]: ...

    def health(self) -> bool: ...


class _InProcessBackend:
    """Calls a `Retriever` directly; its exceptions become retryable `SearchError`s."""

    def __init__(self, retriever: Retriever):
        self._retriever = retriever

    def retrieve(self, queries: list[str], topk: int) -> list[list[Passage]]:
        try:
            return [list(passages) for passages in self._retriever.search(queries, topk)]
        except Exception as exc:
            raise SearchError(f"retriever raised {type(exc).__name__}: {exc}", retryable=True) from exc

    def health(self) -> bool:
        return True


def parse_document(item: Any) -> Passage:
    """A `Passage` from one entry of a `/retrieve` result list, with scores (`{"document", "score"}`) or without
    (a bare `{"id", "contents"}`, score NaN). Raises `SearchError` (not retryable) for any other shape."""
    if not isinstance(item, dict):
        raise SearchError(f"malformed document entry: {item!r:.200}", retryable=False)
    document, score = (item["document"], item.get("score")) if "document" in item else (item, None)
    if not isinstance(document, dict) or not isinstance(document.get("contents"), str):
        raise SearchError(f"document without string 'contents': {document!r:.200}", retryable=False)
    try:
        score_value = math.nan if score is None else float(score)
    except (TypeError, ValueError) as exc:
        raise SearchError(f"non-numeric score {score!r:.50}", retryable=False) from exc
    return Passage(id=str(document.get("id", "")), contents=document["contents"], score=score_value)


def parse_retrieve_response(payload: Any, num_queries: int) -> list[list[Passage]]:
    """The passages per query from a Search-R1 `/retrieve` JSON response; `SearchError` if malformed."""
    if not isinstance(payload, dict) or not isinstance(payload.get("result"), list):
        raise SearchError(f"response has no 'result' list: {payload!r:.200}", retryable=False)
    result = payload["result"]
    if len(result) != num_queries:
        raise SearchError(f"response has {len(result)} result lists for {num_queries} queries", retryable=False)
    if not all(isinstance(entry, list) for entry in result):
        raise SearchError("response 'result' entries must be lists", retryable=False)
    return [[parse_document(item) for item in entry] for entry in result]


def default_health_url(retrieve_url: str) -> str:
    """`.../retrieve` -> `.../health`; any other URL gets `/health` appended to its path."""
    base = retrieve_url.rstrip("/")
    if base.endswith("/retrieve"):
        base = base[: -len("/retrieve")]
    return base + "/health"


class _HttpBackend:
    """POSTs to a Search-R1-compatible `/retrieve` URL with the standard library (no proxies unless asked)."""

    def __init__(self, url: str, timeout_s: float, health_url: str | None = None, use_env_proxy: bool = False):
        self._url = url
        self._health_url = health_url or default_health_url(url)
        self._timeout_s = timeout_s
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    def _open(self, request: urllib.request.Request) -> bytes:
        """The response body; transport failures become `SearchError` with the right `retryable` flag."""
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")[:_MAX_ERROR_BODY_CHARS]
            retryable = exc.code >= 500 or exc.code in _RETRYABLE_HTTP_CODES
            raise SearchError(f"HTTP {exc.code} from {request.full_url}: {body}", retryable=retryable) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise SearchError(f"{type(exc).__name__} from {request.full_url}: {reason}", retryable=True) from exc

    def retrieve(self, queries: list[str], topk: int) -> list[list[Passage]]:
        body = json.dumps({"queries": queries, "topk": topk, "return_scores": True}).encode("utf-8")
        request = urllib.request.Request(self._url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        raw = self._open(request)
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SearchError(f"response is not JSON: {raw[:200]!r}", retryable=False) from exc
        return parse_retrieve_response(payload, len(queries))

    def health(self) -> bool:
        try:
            payload = json.loads(self._open(urllib.request.Request(self._health_url, method="GET")))
        except (SearchError, ValueError):
            return False
        return isinstance(payload, dict) and payload.get("status") == "ok"


# ----------------------------------------------------------------------------------------------------------------
# Results and stats.


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The outcome of one query of `search_or_error`.

    Attributes:
      query: the query sent to the backend (stripped, maybe truncated); "" for an empty query.
      passages: retrieved passages, best first; empty on failure or for an empty query.
      text: observation body for the model: the formatted documents, `failure_text` or `empty_query_text`.
      error: True iff the backend failed for this query (after retries).
      status: "ok", "empty_query" or "failed".
      truncated: whether the query was cut to the configured limits.
      error_message: why the search failed, for logs (never shown to the model); "" otherwise.
    """

    query: str
    passages: tuple[Passage, ...]
    text: str
    error: bool
    status: str
    truncated: bool = False
    error_message: str = ""


@dataclasses.dataclass
class SearchStats:
    """Counters since construction or the last `reset_stats`; latencies are per logical request incl. retries.

    Attributes:
      calls: backend requests attempted (every try counts).
      retries: tries after the first.
      requests: logical requests (one per chunk of queries, retries included).
      failures: logical requests that failed after all tries.
      queries: non-empty queries searched; failed_queries: those among them whose search failed.
      empty_queries, truncated_queries: preprocessing counts.
      total_latency_s, max_latency_s: wall time of logical requests, successful or not.
    """

    calls: int = 0
    retries: int = 0
    failures: int = 0
    requests: int = 0
    queries: int = 0
    failed_queries: int = 0
    empty_queries: int = 0
    truncated_queries: int = 0
    total_latency_s: float = 0.0
    max_latency_s: float = 0.0

    def as_dict(self, prefix: str = "search/") -> dict[str, float]:
        """Flat metrics for a metric writer, plus `mean_latency_s` and `failure_rate` (per query)."""
        values = {field.name: float(getattr(self, field.name)) for field in dataclasses.fields(self)}
        values["mean_latency_s"] = self.total_latency_s / self.requests if self.requests else 0.0
        values["failure_rate"] = self.failed_queries / self.queries if self.queries else 0.0
        return {prefix + name: value for name, value in values.items()}


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------------------
# The client.


class SearchClient:
    """Search for the rollout, in-process (`backend="inprocess"`, `retriever=`) or over HTTP (`backend="http"`,
    `url=` a Search-R1-compatible `/retrieve` URL). Thread-safe; see the module docstring for the behaviour."""

    def __init__(
        self,
        backend: str = "inprocess",
        *,
        retriever: Retriever | None = None,
        url: str | None = None,
        health_url: str | None = None,
        topk: int = DEFAULT_TOPK,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_queries_per_request: int = 512,
        max_query_words: int = DEFAULT_MAX_QUERY_WORDS,
        max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
        failure_text: str = DEFAULT_FAILURE_TEXT,
        empty_query_text: str = DEFAULT_EMPTY_QUERY_TEXT,
        use_env_proxy: bool = False,
    ):
        _check_positive(topk=topk, max_queries_per_request=max_queries_per_request, max_query_words=max_query_words,
                        max_query_chars=max_query_chars)
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("need timeout_s > 0 and max_retries, backoff_s, max_backoff_s >= 0")
        if backend == "inprocess":
            if retriever is None:
                raise ValueError('backend="inprocess" needs retriever=')
            self._backend: _Backend = _InProcessBackend(retriever)
        elif backend == "http":
            if not url:
                raise ValueError('backend="http" needs url= (e.g. "http://127.0.0.1:8000/retrieve")')
            self._backend = _HttpBackend(url, timeout_s, health_url=health_url, use_env_proxy=use_env_proxy)
        else:
            raise ValueError(f'unknown backend {backend!r}; expected "inprocess" or "http"')
        self.backend = backend
        self.topk = topk
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_queries_per_request = max_queries_per_request
        self.max_query_words = max_query_words
        self.max_query_chars = max_query_chars
        self.failure_text = failure_text
        self.empty_query_text = empty_query_text
        self._stats = SearchStats()
        self._lock = threading.Lock()

    # -- stats ----------------------------------------------------------------------------------------------------

    @property
    def stats(self) -> SearchStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def reset_stats(self) -> SearchStats:
        """Returns the counters and zeroes them (e.g. once per logged training step)."""
        with self._lock:
            snapshot, self._stats = self._stats, SearchStats()
        return snapshot

    def _count(self, **increments: float) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def _record_latency(self, seconds: float) -> None:
        with self._lock:
            self._stats.requests += 1
            self._stats.total_latency_s += seconds
            self._stats.max_latency_s = max(self._stats.max_latency_s, seconds)

    # -- health ---------------------------------------------------------------------------------------------------

    def health_check(self) -> bool:
        """True if the backend answers its health check (always True in-process)."""
        return self._backend.health()

    def wait_until_healthy(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> bool:
        """Polls `health_check` until it passes or `timeout_s` elapses; returns whether it passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.health_check():
                return True
            if time.monotonic() + poll_s > deadline:
                return False
            time.sleep(poll_s)

    # -- search ---------------------------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * (2**attempt), self.max_backoff_s)

    def _request(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """One logical request, tried at most `1 + max_retries` times; raises the last `SearchError`."""
        started = time.perf_counter()
        last_error = SearchError("no attempt made", retryable=False)
        try:
            for attempt in range(self.max_retries + 1):
                if attempt:
                    time.sleep(self._backoff(attempt - 1))
                self._count(calls=1, retries=int(attempt > 0))
                try:
                    results = self._backend.retrieve(queries, topk)
                except Exception as exc:
                    last_error = _as_search_error(exc)
                    if not last_error.retryable:
                        break
                    continue
                if len(results) != len(queries):
                    last_error = SearchError(f"{len(results)} result lists for {len(queries)} queries", False)
                    break
                return [list(passages)[:topk] for passages in results]
            self._count(failures=1)
            raise last_error
        finally:
            self._record_latency(time.perf_counter() - started)

    def _resolve_topk(self, topk: int | None) -> int:
        topk = self.topk if topk is None else topk
        _check_positive(topk=topk)
        return topk

    def _prepare(self, queries: Sequence[str]) -> list[tuple[str, bool]]:
        if isinstance(queries, str) or not all(isinstance(query, str) for query in queries):
            raise TypeError(f"queries must be a sequence of strings, got {queries!r:.200}")
        prepared = [truncate_query(query, self.max_query_words, self.max_query_chars) for query in queries]
        self._count(empty_queries=sum(not query for query, _ in prepared),
                    truncated_queries=sum(truncated for _, truncated in prepared))
        return prepared

    def search(self, queries: Sequence[str], topk: int | None = None) -> list[list[Passage]]:
        """The `topk` (default `self.topk`) passages per query, best first; [] for an empty query.

        Queries are preprocessed as the module docstring says. Raises `SearchError` if any request still fails
        after retries; the rollout should use `search_or_error` instead.
        """
        topk = self._resolve_topk(topk)
        prepared = self._prepare(queries)
        results: list[list[Passage]] = [[] for _ in prepared]
        indices = [i for i, (query, _) in enumerate(prepared) if query]
        self._count(queries=len(indices))
        for chunk in _chunks(indices, self.max_queries_per_request):
            try:
                chunk_results = self._request([prepared[i][0] for i in chunk], topk)
            except SearchError:
                self._count(failed_queries=len(chunk))
                raise
            for i, passages in zip(chunk, chunk_results, strict=True):
                results[i] = passages
        return results

    def search_or_error(self, queries: Sequence[str], topk: int | None = None) -> list[SearchResult]:
        """One `SearchResult` per query; never raises for a backend failure (see `SearchResult.error`)."""
        topk = self._resolve_topk(topk)
        prepared = self._prepare(queries)
        results: list[SearchResult] = [
            SearchResult(query="", passages=(), text=self.empty_query_text, error=False, status=STATUS_EMPTY_QUERY,
                         truncated=truncated)
            for _, truncated in prepared
        ]
        indices = [i for i, (query, _) in enumerate(prepared) if query]
        self._count(queries=len(indices))
        for chunk in _chunks(indices, self.max_queries_per_request):
            chunk_queries = [prepared[i][0] for i in chunk]
            try:
                chunk_results = self._request(chunk_queries, topk)
            except Exception as exc:  # never raise into the rollout
                self._count(failed_queries=len(chunk))
                message = f"{type(exc).__name__}: {exc}"
                for i in chunk:
                    results[i] = SearchResult(query=prepared[i][0], passages=(), text=self.failure_text, error=True,
                                              status=STATUS_FAILED, truncated=prepared[i][1], error_message=message)
                continue
            for i, passages in zip(chunk, chunk_results, strict=True):
                results[i] = SearchResult(query=prepared[i][0], passages=tuple(passages),
                                          text=format_information(passages), error=False, status=STATUS_OK,
                                          truncated=prepared[i][1])
        return results


def _as_search_error(exc: Exception) -> SearchError:
    """`exc` itself if it is a `SearchError`, else a non-retryable one describing it (an unexpected failure)."""
    if isinstance(exc, SearchError):
        return exc
    return SearchError(f"unexpected {type(exc).__name__}: {exc}", retryable=False)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
