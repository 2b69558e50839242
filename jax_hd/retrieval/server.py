"""HTTP retrieval service compatible with Search-R1's `/retrieve` API (spec §5.3), serving any `Retriever`.

API (same JSON shapes as Search-R1's `search_r1/search/retrieval_server.py`):

* `POST /retrieve` with `{"queries": [str, ...], "topk": int | null, "return_scores": bool}`. `topk` missing, null
  or 0 means the server default (3, as in Search-R1). The response is `{"result": [entry per query]}`; with
  `return_scores=true` an entry is a list of `{"document": {"id": str, "contents": str}, "score": float}`, otherwise
  a list of bare `{"id": str, "contents": str}` documents, best first.
* `GET /health` returns `{"status": "ok", ...limits}` once the index is loaded (for start-up checks).

Invalid requests (malformed JSON, a non-string query, an empty query list, more than `max_queries` queries, `topk`
negative or above `max_topk`) get HTTP 422 with a readable `detail` string. A retriever exception or a retriever
returning the wrong number of result lists gets HTTP 500; clients may retry those.

The retriever is called under a lock, one request at a time: the rollout sends all queries of a turn in one batched
request (spec §8.6), so concurrency would buy little and retrievers need not be thread-safe.

Servers bind to loopback by default; `serve` refuses any other address unless `allow_remote=True`.

Entry point (index classes are imported lazily, only the chosen kind)::

    python -m jax_hd.retrieval.server --kind=bm25 --index=/path/to/bm25_index --port=8000
    python -m jax_hd.retrieval.server --kind=dense --index=/path/to/dense_index --encoder=minilm --port=8000
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import fastapi
import pydantic
import uvicorn
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from fastapi.encoders import jsonable_encoder

from jax_hd.retrieval import Passage, Retriever

DEFAULT_TOPK = 3
DEFAULT_MAX_TOPK = 100
DEFAULT_MAX_QUERIES = 4096
LOOPBACK_HOST = "127.0.0.1"

_logger = logging.getLogger(__name__)


class RetrieveRequest(pydantic.BaseModel):
    """Body of `POST /retrieve`. Types are strict: `"3"` is not a topk and `1` is not a query."""

    queries: list[pydantic.StrictStr]
    topk: pydantic.StrictInt | None = None
    return_scores: pydantic.StrictBool = False


class RequestError(ValueError):
    """A request that is well-formed JSON but violates the server's limits (answered with HTTP 422)."""


def resolve_topk(topk: int | None, default_topk: int, max_topk: int) -> int:
    """The topk to serve: `default_topk` for None or 0 (Search-R1 semantics), else `topk` if in [1, max_topk]."""
    if topk is None or topk == 0:
        return default_topk
    if topk < 0 or topk > max_topk:
        raise RequestError(f"topk must be between 1 and {max_topk} (0 or null for the default {default_topk}), "
                           f"got {topk}")
    return topk


def check_queries(queries: Sequence[str], max_queries: int) -> None:
    """Raises `RequestError` for an empty query list or one longer than `max_queries`."""
    if not queries:
        raise RequestError("queries must be a non-empty list of strings")
    if len(queries) > max_queries:
        raise RequestError(f"too many queries: {len(queries)} > max_queries={max_queries}; split the request")


def document_json(passage: Passage) -> dict[str, str]:
    """A passage as a Search-R1 corpus document: `{"id", "contents"}`."""
    return {"id": passage.id, "contents": passage.contents}


def result_entry_json(passages: Sequence[Passage], return_scores: bool) -> list[dict[str, Any]]:
    """One query's entry of the `result` list, in the shape selected by `return_scores`."""
    if return_scores:
        return [{"document": document_json(p), "score": float(p.score)} for p in passages]
    return [document_json(p) for p in passages]


def _validation_message(errors: Sequence[Any]) -> str:
    """A one-line summary of pydantic/FastAPI validation errors, e.g. `body.queries.1: Input should be a string`."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{location}: {error.get('msg', 'invalid')}" if location else str(error.get("msg", "invalid")))
    return "invalid request: " + "; ".join(parts)


def make_app(
    retriever: Retriever,
    *,
    default_topk: int = DEFAULT_TOPK,
    max_topk: int = DEFAULT_MAX_TOPK,
    max_queries: int = DEFAULT_MAX_QUERIES,
) -> fastapi.FastAPI:
    """A FastAPI app serving `retriever` through Search-R1's `/retrieve` API plus `GET /health`.

    Args:
      retriever: any `Retriever`; called as `retriever.search(queries, topk)` under a lock.
      default_topk: topk used when a request omits it or sends 0.
      max_topk: largest topk a request may ask for.
      max_queries: largest number of queries in one request.
    """
    if not 1 <= default_topk <= max_topk:
        raise ValueError(f"need 1 <= default_topk <= max_topk, got default_topk={default_topk}, max_topk={max_topk}")
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")

    app = fastapi.FastAPI(title="jax_hd retrieval (Search-R1 compatible)")
    lock = threading.Lock()

    @app.exception_handler(fastapi_exceptions.RequestValidationError)
    async def _on_validation_error(request: fastapi.Request, exc: fastapi_exceptions.RequestValidationError):
        del request
        errors = exc.errors()
        return responses.JSONResponse(
            status_code=422,
            content={"detail": _validation_message(errors), "errors": jsonable_encoder(errors)},
        )

    @app.exception_handler(RequestError)
    async def _on_request_error(request: fastapi.Request, exc: RequestError):
        del request
        return responses.JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "default_topk": default_topk, "max_topk": max_topk, "max_queries": max_queries}

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> dict[str, Any]:
        topk = resolve_topk(request.topk, default_topk, max_topk)
        check_queries(request.queries, max_queries)
        started = time.perf_counter()
        try:
            with lock:
                results = retriever.search(list(request.queries), topk)
        except Exception as exc:
            _logger.exception("retriever failed on %d queries", len(request.queries))
            detail = f"retriever failed: {type(exc).__name__}: {exc}"
            raise fastapi.HTTPException(status_code=500, detail=detail) from exc
        if len(results) != len(request.queries):
            raise fastapi.HTTPException(
                status_code=500,
                detail=f"retriever returned {len(results)} result lists for {len(request.queries)} queries",
            )
        _logger.debug("retrieved %d queries in %.3fs", len(results), time.perf_counter() - started)
        return {"result": [result_entry_json(passages[:topk], request.return_scores) for passages in results]}

    return app


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_host(host: str, allow_remote: bool) -> None:
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"refusing to bind the retrieval server to non-loopback host {host!r}; "
                         "pass allow_remote=True to expose it deliberately")


def serve(
    retriever: Retriever,
    host: str = LOOPBACK_HOST,
    port: int = 8000,
    *,
    allow_remote: bool = False,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Serves `retriever` with uvicorn until interrupted (blocking). `app_kwargs` go to `make_app`."""
    _check_host(host, allow_remote)
    uvicorn.run(make_app(retriever, **app_kwargs), host=host, port=port, log_level=log_level)


class BackgroundServer:
    """Runs an app with uvicorn in a daemon thread, on a socket bound before start (port 0 = a free port).

    Binding the socket ourselves avoids the find-a-free-port-then-bind race. Use as a context manager::

        with BackgroundServer(make_app(retriever)) as server:
            client = SearchClient("http", url=server.url + "/retrieve")
    """

    def __init__(
        self,
        app: fastapi.FastAPI,
        host: str = LOOPBACK_HOST,
        port: int = 0,
        *,
        allow_remote: bool = False,
        startup_timeout_s: float = 10.0,
        shutdown_timeout_s: float = 5.0,
        log_level: str = "warning",
    ):
        _check_host(host, allow_remote)
        self._app = app
        self._host = host
        self._requested_port = port
        self._startup_timeout_s = startup_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("server not started")
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:41234` (append `/retrieve` or `/health`)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Binds, starts the server thread and waits (bounded) until uvicorn reports it is serving."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self._host, self._requested_port))
        config = uvicorn.Config(self._app, log_level=self._log_level, lifespan="off",
                                timeout_graceful_shutdown=max(1, int(self._shutdown_timeout_s)))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="retrieval-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("retrieval server thread exited during start-up")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"retrieval server did not start within {self._startup_timeout_s}s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Asks uvicorn to exit and joins the thread (bounded); forces exit if graceful shutdown overruns."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=self._shutdown_timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=self._shutdown_timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread = None, None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def load_retriever(kind: str, index_path: str, encoder: str = "minilm") -> Retriever:
    """Loads a saved index of `kind` ("bm25" or "dense") from `index_path`, importing only that kind's module.

    A dense index needs a query encoder: `encoder` is "minilm" (the embedded all-MiniLM-L6-v2) or a HF model dir;
    it must be the encoder the index was built with.
    """
    if kind == "bm25":
        from jax_hd.retrieval.bm25 import BM25Index

        return BM25Index.load(index_path)
    if kind == "dense":
        from jax_hd.retrieval.dense import DenseIndex, Encoder

        query_encoder = Encoder.minilm() if encoder == "minilm" else Encoder.from_pretrained(encoder)
        return DenseIndex.load(index_path, encoder=query_encoder)
    raise ValueError(f"unknown index kind {kind!r}; expected 'bm25' or 'dense'")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("index", None, "Index directory or file written by the chosen index class.", required=True)
    flags.DEFINE_enum("kind", "bm25", ["bm25", "dense"], "Index kind.")
    flags.DEFINE_string("encoder", "minilm", "Dense only: 'minilm' (embedded default) or a HF model dir.")
    flags.DEFINE_string("host", LOOPBACK_HOST, "Address to bind (loopback unless --allow_remote).")
    flags.DEFINE_integer("port", 8000, "Port to bind.")
    flags.DEFINE_bool("allow_remote", False, "Allow binding a non-loopback address.")
    flags.DEFINE_integer("topk", DEFAULT_TOPK, "Default topk when a request omits it or sends 0.")
    flags.DEFINE_integer("max_topk", DEFAULT_MAX_TOPK, "Largest topk a request may ask for.")
    flags.DEFINE_integer("max_queries", DEFAULT_MAX_QUERIES, "Largest number of queries per request.")


def _main(argv: Sequence[str]) -> None:
    from absl import flags

    del argv
    flag_values = flags.FLAGS
    retriever = load_retriever(flag_values.kind, flag_values.index, flag_values.encoder)
    serve(retriever, host=flag_values.host, port=flag_values.port, allow_remote=flag_values.allow_remote,
          default_topk=flag_values.topk, max_topk=flag_values.max_topk, max_queries=flag_values.max_queries)


if __name__ == "__main__":
    from absl import app as absl_app

    _define_flags()
    absl_app.run(_main)
