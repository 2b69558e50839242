"""Search-R1-compatible retrieval server and the rollout's search client, over real loopback HTTP.

Every server binds 127.0.0.1 on an OS-assigned port; every wait is bounded (timeouts, joins, retry counts).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from jax_hd.retrieval import Passage
from jax_hd.retrieval.client import (
    DEFAULT_EMPTY_QUERY_TEXT,
    DEFAULT_FAILURE_TEXT,
    SearchClient,
    SearchError,
    format_information,
    format_observation,
    parse_retrieve_response,
    truncate_query,
)
from jax_hd.retrieval.server import BackgroundServer, make_app, resolve_topk

MAX_QUERIES = 8
MAX_TOPK = 5

CORPUS = [
    Passage(id="d0", contents='"Paris"\nParis is the capital of France.', score=0.0),
    Passage(id="d1", contents='"Berlin"\nBerlin is the capital of Germany.\nIt lies on the Spree.', score=0.0),
    Passage(id="d2", contents='"The Beatles"\nThe Beatles were a rock band from Liverpool.', score=0.0),
    Passage(id="d3", contents='"Ça va"\nA French greeting, «ça va ?»', score=0.0),
    Passage(id="d4", contents='"Spree"\nThe Spree is a river in Germany.', score=0.0),
    Passage(id="d5", contents='"Liverpool"\nLiverpool is a city in England.', score=0.0),
]


class FakeRetriever:
    """Word-overlap ranking over `CORPUS` with a small id tie-break; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        self.calls.append((list(queries), topk))
        results = []
        for query in queries:
            words = set(query.lower().split())
            scored = [
                dataclasses.replace(p, score=len(words & set(p.contents.lower().split())) - 0.125 * i)
                for i, p in enumerate(CORPUS)
            ]
            results.append(sorted(scored, key=lambda p: -p.score)[:topk])
        return results


class SlowRetriever:
    """Blocks until released (at most 5 s), longer than any client timeout used here."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.num_calls = 0

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        self.num_calls += 1
        self.release.wait(timeout=5.0)
        return [CORPUS[:topk] for _ in queries]


class FailingRetriever:
    def __init__(self) -> None:
        self.num_calls = 0

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        self.num_calls += 1
        raise RuntimeError("index shard missing")


@pytest.fixture(scope="module")
def fake_server() -> Iterator[BackgroundServer]:
    app = make_app(FakeRetriever(), max_topk=MAX_TOPK, max_queries=MAX_QUERIES)
    with BackgroundServer(app) as server:
        yield server


def _post(url: str, body: Any, timeout_s: float = 10.0) -> tuple[int, Any]:
    """(status, JSON body) of a POST with no proxies; `body` bytes are sent raw, anything else as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _closed_port_url() -> str:
    """A loopback URL nobody listens on: a port the OS just handed out, then released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/retrieve"


QUERIES = ["capital of France", "rock band from Liverpool", "river in Germany"]


# ----------------------------------------------------------------------------------------------------------------
# Server API.


def test_http_round_trip_equals_inprocess(fake_server: BackgroundServer) -> None:
    http_client = SearchClient("http", url=fake_server.url + "/retrieve", timeout_s=5.0)
    inprocess_client = SearchClient("inprocess", retriever=FakeRetriever())
    for topk in (1, 3, MAX_TOPK):
        assert http_client.search(QUERIES, topk) == inprocess_client.search(QUERIES, topk)
    http_results = http_client.search_or_error(QUERIES)
    assert http_results == inprocess_client.search_or_error(QUERIES)
    assert [r.passages[0].id for r in http_results] == ["d0", "d2", "d4"]
    assert all(r.status == "ok" and not r.error and len(r.passages) == 3 for r in http_results)
    assert http_results[0].text == format_information(http_results[0].passages)


@pytest.mark.parametrize("return_scores", [True, False])
def test_return_scores_shapes(fake_server: BackgroundServer, return_scores: bool) -> None:
    status, body = _post(fake_server.url + "/retrieve",
                         {"queries": QUERIES[:2], "topk": 2, "return_scores": return_scores})
    assert status == 200 and list(body) == ["result"] and len(body["result"]) == 2
    for entry in body["result"]:
        assert len(entry) == 2
        for item in entry:
            if return_scores:
                assert set(item) == {"document", "score"} and set(item["document"]) == {"id", "contents"}
                assert isinstance(item["score"], float)
            else:
                assert set(item) == {"id", "contents"}
    parsed = parse_retrieve_response(body, 2)
    assert parsed[0][0].id == "d0" and parsed[0][0].contents == CORPUS[0].contents


@pytest.mark.parametrize("request_topk", [None, 0])
def test_missing_or_zero_topk_uses_server_default(fake_server: BackgroundServer, request_topk: int | None) -> None:
    body = {"queries": ["Paris"]} if request_topk is None else {"queries": ["Paris"], "topk": request_topk}
    status, response = _post(fake_server.url + "/retrieve", body)
    assert status == 200 and len(response["result"][0]) == 3
    assert set(response["result"][0][0]) == {"id", "contents"}  # return_scores defaults to false


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"queries": []}, "non-empty"),
        ({"queries": ["q"] * (MAX_QUERIES + 1)}, "too many queries"),
        ({"queries": ["q"], "topk": -1}, "topk must be between 1 and 5"),
        ({"queries": ["q"], "topk": MAX_TOPK + 1}, "topk must be between 1 and 5"),
        ({"queries": ["q"], "topk": "3"}, "body.topk"),
        ({"queries": ["q", 7]}, "body.queries.1"),
        ({"queries": "just one string"}, "body.queries"),
        ({"topk": 3}, "body.queries"),
        (b"{not json", "invalid request"),
    ],
)
def test_validation_errors(fake_server: BackgroundServer, body: Any, message: str) -> None:
    status, response = _post(fake_server.url + "/retrieve", body)
    assert status == 422
    assert isinstance(response["detail"], str) and message in response["detail"], response


def test_health(fake_server: BackgroundServer) -> None:
    client = SearchClient("http", url=fake_server.url + "/retrieve", timeout_s=5.0)
    assert client.health_check() and client.wait_until_healthy(timeout_s=1.0)
    down = SearchClient("http", url=_closed_port_url(), timeout_s=0.5)
    assert not down.health_check()
    assert not down.wait_until_healthy(timeout_s=0.2, poll_s=0.05)


def test_app_and_server_arguments() -> None:
    with pytest.raises(ValueError, match="default_topk"):
        make_app(FakeRetriever(), default_topk=10, max_topk=5)
    with pytest.raises(ValueError, match="non-loopback"):
        BackgroundServer(make_app(FakeRetriever()), host="0.0.0.0")
    assert resolve_topk(None, 3, 10) == 3 and resolve_topk(0, 3, 10) == 3 and resolve_topk(7, 3, 10) == 7


# ----------------------------------------------------------------------------------------------------------------
# Client failure handling.


def test_server_down_retries_then_failure_observation() -> None:
    client = SearchClient("http", url=_closed_port_url(), timeout_s=1.0, max_retries=2, backoff_s=0.01)
    started = time.monotonic()
    results = client.search_or_error(["capital of France", ""])
    assert time.monotonic() - started < 5.0
    assert results[0].error and results[0].status == "failed" and results[0].passages == ()
    assert results[0].text == DEFAULT_FAILURE_TEXT and "URLError" in results[0].error_message
    assert not results[1].error and results[1].status == "empty_query" and results[1].text == DEFAULT_EMPTY_QUERY_TEXT
    stats = client.stats
    assert (stats.calls, stats.retries, stats.failures, stats.failed_queries, stats.queries) == (3, 2, 1, 1, 1)
    assert stats.empty_queries == 1 and stats.requests == 1 and stats.max_latency_s >= stats.total_latency_s > 0
    with pytest.raises(SearchError):
        client.search(["capital of France"])


def test_slow_server_times_out_and_retries() -> None:
    slow = SlowRetriever()
    with BackgroundServer(make_app(slow), shutdown_timeout_s=2.0) as server:
        client = SearchClient("http", url=server.url + "/retrieve", timeout_s=0.2, max_retries=1, backoff_s=0.01,
                              failure_text="SEARCH DOWN")
        started = time.monotonic()
        try:
            results = client.search_or_error(["capital of France", "river in Germany"])
        finally:
            slow.release.set()
        elapsed = time.monotonic() - started
    assert elapsed < 3.0
    assert [r.text for r in results] == ["SEARCH DOWN", "SEARCH DOWN"] and all(r.error for r in results)
    assert "timed out" in results[0].error_message
    stats = client.stats
    assert (stats.calls, stats.retries, stats.failures, stats.failed_queries) == (2, 1, 1, 2)


def test_server_side_exception_is_retried() -> None:
    failing = FailingRetriever()
    with BackgroundServer(make_app(failing)) as server:
        client = SearchClient("http", url=server.url + "/retrieve", timeout_s=5.0, max_retries=2, backoff_s=0.01)
        result = client.search_or_error(["anything"])[0]
    assert result.error and "HTTP 500" in result.error_message and "index shard missing" in result.error_message
    assert failing.num_calls == 3 and client.stats.retries == 2


def test_client_errors_are_not_retried(fake_server: BackgroundServer) -> None:
    client = SearchClient("http", url=fake_server.url + "/retrieve", timeout_s=5.0, max_retries=3, backoff_s=0.01,
                          max_queries_per_request=MAX_QUERIES + 1)
    results = client.search_or_error([f"query {i}" for i in range(MAX_QUERIES + 1)])
    assert all(r.error for r in results) and "HTTP 422" in results[0].error_message
    assert client.stats.calls == 1 and client.stats.retries == 0


def test_inprocess_exception_never_raises_into_rollout() -> None:
    failing = FailingRetriever()
    client = SearchClient("inprocess", retriever=failing, max_retries=1, backoff_s=0.0)
    result = client.search_or_error(["q"])[0]
    assert result.error and result.text == DEFAULT_FAILURE_TEXT and failing.num_calls == 2
    with pytest.raises(SearchError, match="index shard missing"):
        client.search(["q"])


def test_chunking_preserves_order_and_isolates_empty_queries() -> None:
    retriever = FakeRetriever()
    client = SearchClient("inprocess", retriever=retriever, max_queries_per_request=2)
    queries = ["capital of France", "  ", "rock band from Liverpool", "river in Germany", "Berlin Spree"]
    results = client.search(queries, topk=1)
    assert [r[0].id if r else None for r in results] == ["d0", None, "d2", "d4", "d1"]
    assert [call[0] for call in retriever.calls] == [queries[0:1] + queries[2:3], queries[3:5]]
    assert client.stats.as_dict()["search/requests"] == 2.0


def test_long_queries_are_truncated_before_the_backend() -> None:
    retriever = FakeRetriever()
    client = SearchClient("inprocess", retriever=retriever, max_query_words=4, max_query_chars=20)
    result = client.search_or_error(["  one two three four five six  "])[0]
    assert result.query == "one two three four" and result.truncated and retriever.calls[0][0] == [result.query]
    assert client.stats.truncated_queries == 1
    assert truncate_query("  short query \n", 64, 512) == ("short query", False)
    assert truncate_query("alpha beta gamma", 64, 12) == ("alpha beta", True)
    assert truncate_query("alpha beta gamma", 64, 10) == ("alpha beta", True)
    assert truncate_query("abcdefghijkl mn", 64, 5) == ("abcde", True)
    assert truncate_query("a\nb  c", 2, 512) == ("a b", True)


def test_format_information_and_observation_match_search_r1() -> None:
    passages = [CORPUS[1], CORPUS[0]]
    expected = ('Doc 1(Title: "Berlin") Berlin is the capital of Germany.\nIt lies on the Spree.\n'
                'Doc 2(Title: "Paris") Paris is the capital of France.\n')
    assert format_information(passages) == expected
    assert format_information([Passage(id="x", contents="no newline", score=1.0)]) == "Doc 1(Title: no newline) \n"
    assert format_information([]) == ""
    assert format_observation(expected) == "\n\n<information>" + expected.strip() + "</information>\n\n"
    assert format_observation("x", tag="documents") == "\n\n<documents>x</documents>\n\n"


def test_client_argument_errors() -> None:
    with pytest.raises(ValueError, match="retriever="):
        SearchClient("inprocess")
    with pytest.raises(ValueError, match="url="):
        SearchClient("http")
    with pytest.raises(ValueError, match="unknown backend"):
        SearchClient("grpc", url="x")
    client = SearchClient("inprocess", retriever=FakeRetriever())
    with pytest.raises(ValueError, match="topk"):
        client.search_or_error(["q"], topk=0)
    with pytest.raises(TypeError):
        client.search_or_error("a single string")
    assert client.reset_stats().queries == 0 and client.stats.calls == 0
