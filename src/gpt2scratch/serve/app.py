"""``gpt2-scratch serve``: a model behind OpenAI's completions API over HTTP (FastAPI and uvicorn: the ``serve`` extra).

    POST /v1/completions        completions, streamed as server-sent events with ``"stream": true``
    GET  /v1/models             the one model served
    GET  /health                200 while serving, 503 once stopping
    GET  /metrics               Prometheus text: requests, tokens, queue depth, batch size, latency, time to 1st token
    POST /v1/chat/completions   a 400 that says why: GPT-2 has no chat format

A request is checked (serve/schema.py), split into sequences and queued for the one worker thread that decodes all of
them as a batch (serve/batching.py). Every error a client can cause is a 4xx in OpenAI's error shape; a full queue is a
429 with Retry-After. SIGTERM or Ctrl-C stops accepting connections, lets the requests in flight finish (up to
``--shutdown-timeout`` seconds), and exits 0. FastAPI, uvicorn and prometheus_client are imported only here, and only
when a server is made.
"""

# No "from __future__ import annotations" here: FastAPI reads the routes' annotations (``request: Request``, a name
# imported inside make_app) when they are defined, and could not resolve them from strings.
import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gpt2scratch.config.commands import SEEDS
from gpt2scratch.inference.engine import Engine
from gpt2scratch.serve.batching import Batcher, Closed, QueueFull, Sampling, Sequence, Update
from gpt2scratch.serve.metrics import CountRequests, Metrics
from gpt2scratch.serve.schema import (
    APIError,
    CompletionRequest,
    choice_body,
    completion_body,
    parse_completion,
    parse_json,
    usage_body,
)
from gpt2scratch.serve.tokenize import detokenize, tokenize, tokenizer_info

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes of a request body; a full-context prompt as token ids is ~10 KB
RETRY_AFTER = "1"  # seconds a client told 429 should wait: a sequence of the batch ends every few tokens
ROUTES = ("/", "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
          "/tokenizer_info", "/health", "/metrics")  # fmt: skip


def authorize(header: str | None, api_key: str | None) -> None:
    """APIError 401 unless ``header`` is ``Bearer <api_key>`` (compared in constant time) or no key is set."""
    if api_key is None:
        return
    if not hmac.compare_digest((header or "").encode(), f"Bearer {api_key}".encode()):
        raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer YOUR_KEY'.",
                       code="invalid_api_key")  # fmt: skip


async def read_body(request: Any) -> bytes:
    """The request body, at most MAX_BODY bytes (APIError 413 beyond)."""
    from starlette.requests import ClientDisconnect

    too_large = APIError(413, f"The request body is larger than {MAX_BODY:,} bytes.", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "The client disconnected while sending the request.") from None
    return b"".join(chunks)


async def until_disconnect(request: Any) -> None:
    """Return when the client of ``request`` (whose body was read) hangs up."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclasses.dataclass
class Service:
    """What the routes share: the engine's batcher, the metrics, and the settings of ``make_app``."""

    batcher: Batcher
    metrics: Metrics
    model_name: str
    api_key: str | None
    max_queue: int
    block: int
    ignored_seen: set[str] = dataclasses.field(default_factory=set)  # unknown request fields already logged

    def ignoring(self, fields: tuple[str, ...]) -> dict[str, str]:
        """The header that lists a request's ignored fields; each field is logged the first time it is seen."""
        for name in fields:
            if name not in self.ignored_seen:
                self.ignored_seen.add(name)
                log.warning("ignoring the request field %r, which this server does not know", name[:100])
        return {"X-Ignored-Fields": ", ".join(fields)} if fields else {}

    @classmethod
    def of(cls, engine: Engine, model_name: str, api_key: str | None, max_queue: int) -> "Service":
        """A batcher for ``engine`` (not started yet) and the metrics that watch it."""
        metrics = Metrics()
        on_step, on_tokens = metrics.batch_size.observe, metrics.generated_tokens.inc
        batcher = Batcher(engine, max_queue, on_step=on_step, on_tokens=on_tokens)
        metrics.queue_depth.set_function(lambda: batcher.queued)
        metrics.running.set_function(lambda: batcher.running)
        return cls(batcher, metrics, model_name, api_key, max_queue, engine.model.config.block_size)


async def complete(service: Service, request: Any) -> Any:
    """POST /v1/completions: the request checked, its sequences queued, and the reply streamed or collected."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    authorize(request.headers.get("authorization"), service.api_key)
    body = await read_body(request)
    # In a thread: tokenizing a long prompt must not hold up the event loop, which streams the other replies.
    req = await asyncio.to_thread(lambda: parse_completion(parse_json(body), service.model_name, service.block))
    queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
    sequences = sequences_of(req, functools.partial(_deliver, asyncio.get_running_loop(), queue))
    if len(sequences) > service.max_queue:
        raise APIError(400, f"{len(sequences)} completions (prompts x n) are more than this server queues "
                       f"({service.max_queue}); split the request", "n")  # fmt: skip
    try:
        service.batcher.submit(sequences)
    except QueueFull:
        raise APIError(429, f"The server is busy ({service.batcher.queued} completions waiting); retry in a moment.",
                       code="rate_limit_exceeded", type="rate_limit_error",
                       headers={"Retry-After": RETRY_AFTER}) from None  # fmt: skip
    except Closed:
        raise APIError(503, "The server is shutting down.", code="shutting_down", type="server_error") from None
    service.metrics.prompt_tokens.inc(sum(len(ids) for ids in req.prompts))
    reply = Reply(req, service.model_name, sequences, queue, service.metrics)
    headers = service.ignoring(req.ignored)
    if req.stream:
        return StreamingResponse(reply.events(), media_type="text/event-stream", headers=headers)
    collect = asyncio.ensure_future(reply.collect())
    hangup = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({collect, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (a shutdown past its timeout)
        hangup.cancel()
        if not collect.done():  # nobody is left to answer: free the slots
            collect.cancel()
            reply.cancel()
    if collect.cancelled():
        return Response(status_code=499)  # nginx's "client closed request": logged, never seen
    return JSONResponse(collect.result(), headers=headers)


PLAYGROUND = Path(__file__).with_name("playground.html")


def add_playground(app: Any) -> None:
    """GET /: the playground, one HTML page with its script inline (no build step, nothing from elsewhere). The page
    is public; what it asks of the API needs the key as any client's request does."""
    from fastapi.responses import HTMLResponse, Response

    page = PLAYGROUND.read_text(encoding="utf-8")

    @app.get("/")
    async def playground() -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' "
                                           "'unsafe-inline'; script-src 'self' 'unsafe-inline'"})  # fmt: skip


def add_model_routes(app: Any, service: Service, started: int) -> None:
    """What a client asks about the model: GET /v1/models (with its context, ``max_model_len``, as vLLM's), and the
    tokenizer: POST /tokenize, POST /detokenize and GET /tokenizer_info (serve/tokenize.py); behind the same key."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request.headers.get("authorization"), service.api_key)
        model = {"id": service.model_name, "object": "model", "created": started, "owned_by": "gpt2-scratch",
                 "max_model_len": service.block}  # fmt: skip
        return JSONResponse({"object": "list", "data": [model]})

    async def checked(request: Request) -> dict[str, Any]:
        authorize(request.headers.get("authorization"), service.api_key)
        return parse_json(await read_body(request))

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        body = await checked(request)
        return JSONResponse(await asyncio.to_thread(tokenize, body, service.model_name, service.block))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return JSONResponse(detokenize(await checked(request), service.model_name))

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request) -> Response:
        authorize(request.headers.get("authorization"), service.api_key)
        return JSONResponse(tokenizer_info(service.block))


def make_app(engine: Engine, model_name: str, api_key: str | None, max_queue: int) -> Any:
    """The FastAPI application serving ``engine`` as ``model_name``; it starts and stops its batcher itself."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    service = Service.of(engine, model_name, api_key, max_queue)
    batcher, metrics = service.batcher, service.metrics
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        except asyncio.CancelledError:  # a forced exit (a second Ctrl-C): the loop ends now, the batcher's thread too
            return
        await asyncio.to_thread(batcher.close, 60.0)  # uvicorn has drained the requests in flight by now

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CountRequests, metrics=metrics, routes=ROUTES)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> Response:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {err.detail}; see POST /v1/completions, GET /v1/models"
        return JSONResponse(APIError(err.status_code, message).body(), err.status_code)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(service, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorize(request.headers.get("authorization"), api_key)
        raise APIError(400, "GPT-2 is a plain language model and has no chat format: send a prompt to "
                       "POST /v1/completions instead.", code="unsupported_endpoint")  # fmt: skip

    add_model_routes(app, service, started)
    add_playground(app)

    @app.get("/health")
    async def health() -> Response:
        body = {"status": "ok" if batcher.alive() else "stopping", "running": batcher.running}
        body |= {"queued": batcher.queued, "max_batch": engine.slots}
        return JSONResponse(body, 200 if batcher.alive() else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, update: Update) -> None:
    """Hand an update from the worker thread to the request's event loop (RuntimeError once the loop is closed)."""
    loop.call_soon_threadsafe(queue.put_nowait, (index, update))


def sequences_of(req: CompletionRequest, deliver: Any) -> list[Sequence]:
    """One sequence per prompt and choice, in OpenAI's choice order (index = prompt * n + choice). Choice j draws
    from seed + j, as ``generate --stream`` numbers the seeds of its samples."""
    sequences: list[Sequence] = []
    for ids, text in zip(req.prompts, req.texts, strict=True):
        for j in range(req.n):
            seed = None if req.seed is None else (req.seed + j) % SEEDS
            sampling = Sampling(req.temperature, req.top_k, req.top_p, seed)
            index = len(sequences)
            sequences.append(Sequence(ids, req.max_tokens, functools.partial(deliver, index), sampling, req.stop,
                                      req.logprobs, req.echo, text))  # fmt: skip
    return sequences


class Reply:
    """The answer to one completion request, built from its sequences' updates: whole, or as server-sent events."""

    def __init__(self, req: CompletionRequest, model: str, sequences: list[Sequence], queue: asyncio.Queue,
                 metrics: Metrics):  # fmt: skip
        self.req, self.model, self.sequences, self.queue, self.metrics = req, model, sequences, queue, metrics
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.generated = 0

    async def updates(self) -> AsyncIterator[tuple[int, Update]]:
        """Each sequence's updates until all of them ended; APIError 500 when one failed."""
        left = len(self.sequences)
        while left:
            index, update = await self.queue.get()
            if update.error is not None:
                raise APIError(500, f"The completion failed: {update.error}", None, "internal_error", "server_error")
            if update.generated and self.first_token is None:
                self.first_token = time.monotonic()
                self.metrics.ttft.observe(self.first_token - self.start)
            self.generated += update.generated
            left -= update.finish_reason is not None
            yield index, update
        self.metrics.latency.observe(time.monotonic() - self.start)

    def usage(self) -> dict[str, int]:
        return usage_body(sum(len(ids) for ids in self.req.prompts), self.generated)

    def cancel(self) -> None:
        """The client is gone: every sequence still running frees its slot at the next token."""
        if not all(seq.done or seq.cancelled for seq in self.sequences):
            self.metrics.cancelled.inc()
        for seq in self.sequences:
            seq.cancel()

    async def collect(self) -> dict[str, Any]:
        n = len(self.sequences)
        texts: list[list[str]] = [[] for _ in range(n)]
        tokens: list[list[Any]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        try:
            async for index, update in self.updates():
                texts[index].append(update.text)
                tokens[index].extend(update.tokens)
                reasons[index] = update.finish_reason or reasons[index]
        finally:
            self.cancel()  # on an error or a hang-up; nothing to cancel after a success
        wants = self.req.logprobs is not None
        choices = [choice_body(i, "".join(texts[i]), reasons[i], tokens[i] if wants else None) for i in range(n)]
        return completion_body(self.id, self.created, self.model, choices, self.usage())

    async def events(self) -> AsyncIterator[str]:
        """``data: {chunk}`` per update that says something, then the usage if asked for, then ``data: [DONE]``.
        A failure mid-stream is an ``error`` event (the ``openai`` client raises it)."""
        wants = self.req.logprobs is not None
        try:
            async for index, update in self.updates():
                if update.text or update.tokens or update.finish_reason:
                    choice = choice_body(index, update.text, update.finish_reason, update.tokens if wants else None)
                    yield _event(completion_body(self.id, self.created, self.model, [choice], None))
            if self.req.include_usage:
                yield _event(completion_body(self.id, self.created, self.model, [], self.usage()))
        except APIError as err:
            yield _event(err.body())
        finally:
            self.cancel()  # a client that hangs up mid-stream lands here (the response task is cancelled)
        yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
