"""The gateway's HTTP side: `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`, served by uvicorn, answered from the network's signed results.

Each request becomes one job published to `rst.jobs.<model>` (`Nats-Msg-Id`: the job id) and
waits, as `worker.client.submit` does, for the signed result or the node's final error. No
answer is passed on before the result's signature and its `input_sha256` (over the bytes
published) verify, and its model is the one the verified snapshot approves (else 502); the
snapshot is watched and verified once per value (`worker.gateway.snapshots`), never fetched
per request. With `stream: true` the answer is server-sent events in OpenAI's chunk format,
fed from the node's signed `stream` envelopes on `rst.stream.<job_id>` (following the highest
attempt), and completed from the result; a node that does not stream gives one chunk with
the whole text. A client that goes away, mid-stream or before its plain answer, gets its
job cancelled on `rst.cancel.<job_id>` and its slot freed.

Bounds: the body size, the time to send it (408 past it), the requests served at once (429
past it) and each request's deadline (the job's `deadline` too; 504 past it), all from
`Settings.gateway_*`.

Trust: every request needs `Authorization: Bearer <key>` with a key of the file
`RESULTITY_GATEWAY_API_KEYS_FILE` (compared in constant time; 401 otherwise). Results, stream
messages and error events count only from nodes the registry admits (followed while the
gateway runs), and reach the waiting request through one `Router` by job id: a stranger's
message is dropped before its signature is checked. `/v1/models` lists the models of the
watched snapshot: the highest verified one of this gateway's network.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal

import anyio
import uvicorn
from nats.aio.client import Client
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from schemas.event import ErrorCode
from schemas.result import ResultBody
from schemas.snapshot import ModelSpec, Snapshot
from schemas.stream import StreamBody
from worker.client import (
    Outcome,
    Router,
    cancel,
    connect,
    drop,
    new_job_id,
    submit,
)
from worker.core.errors import JobFailed, NodeError, SignatureError
from worker.core.registry import AdmittedNodes
from worker.core.settings import Settings
from worker.gateway import shapes
from worker.gateway.shapes import ApiError, ChatRequest, CompletionRequest
from worker.gateway.snapshots import WatchedSnapshot

log = logging.getLogger(__name__)

Kind = Literal["chat", "text"]


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def read_api_keys(settings: Settings) -> list[bytes]:
    """The API keys the gateway accepts: one a line of `gateway_api_keys_file`."""
    path = settings.gateway_api_keys_file
    if path is None:
        raise NodeError(
            "the gateway needs API keys: set RESULTITY_GATEWAY_API_KEYS_FILE to a file of "
            "keys, one a line ('resultity-node dev' makes one)"
        )
    try:
        keys = [line.strip().encode() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise NodeError(f"cannot read the gateway's API keys file {path}: {exc}") from exc
    if not keys:
        raise NodeError(f"the gateway's API keys file {path} holds no key")
    return keys


class Gateway:
    """The ASGI app over one NATS connection; `app()` builds the Starlette application."""

    def __init__(
        self,
        settings: Settings,
        nc: Client,
        snapshots: WatchedSnapshot,
        router: Router,
        api_keys: list[bytes],
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.snapshots = snapshots
        self.router = router
        self.busy = 0
        self._api_keys = api_keys

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self._authorized(self.models), methods=["GET"]),
                Route("/v1/chat/completions", self._authorized(self.chat), methods=["POST"]),
                Route("/v1/completions", self._authorized(self.completions), methods=["POST"]),
            ]
        )

    def _authorized(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if not self._key_valid(request.headers.get("authorization", "")):
                return _error(
                    ApiError(
                        401,
                        "missing or invalid API key: send 'Authorization: Bearer <key>'",
                        code="invalid_api_key",
                    )
                )
            return await endpoint(request)

        return guarded

    def _key_valid(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        presented = given.strip().encode()
        # Every key is compared, each in constant time: no early exit tells which matched.
        matched = False
        for key in self._api_keys:
            matched |= hmac.compare_digest(presented, key)
        return scheme.lower() == "bearer" and matched

    async def models(self, request: Request) -> Response:
        snapshot = await self._snapshot()
        data = [] if snapshot is None else snapshot.models
        created = 0 if snapshot is None else int(snapshot.issued_at)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": m.id, "object": "model", "created": created, "owned_by": "resultity"}
                    for m in data
                ],
            }
        )

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "text")

    # -- one request ---------------------------------------------------------------------

    async def _serve(self, request: Request, kind: Kind) -> Response:
        if self.busy >= self.settings.gateway_max_concurrent:
            return _error(ApiError(429, "too many requests in flight", kind="rate_limit_error"))
        self.busy += 1
        streaming = False
        try:
            body = await self._body(request)
            job_id = new_job_id()
            deadline = time.time() + self.settings.gateway_timeout_s
            if kind == "chat":
                chat = shapes.parse(ChatRequest, body)
                spec = await self._model(chat.model)
                job, stream = shapes.chat_job(chat, job_id, deadline), chat
            else:
                text = shapes.parse(CompletionRequest, body)
                spec = await self._model(text.model)
                job, stream = shapes.completion_job(text, job_id, deadline), text
            log.info("gateway_job job_id=%s model=%s kind=%s", job_id, spec.id, kind)
            if stream.stream:
                usage = bool(stream.stream_options and stream.stream_options.include_usage)
                slot = Slot(self)
                streaming = True
                return StreamingResponse(
                    self._stream(kind, job, spec, usage, slot),
                    media_type="text/event-stream",
                    headers={f"{shapes.HEADER_PREFIX}Job-Id": job_id},
                    # Frees the slot also when the client left before the stream started.
                    background=BackgroundTask(slot.release),
                )
            outcome = await self._run_attended(request, job, spec)
            created = int(time.time())
            answer = (shapes.chat_completion if kind == "chat" else shapes.text_completion)(
                outcome.result, outcome.envelope, created
            )
            return JSONResponse(
                answer, headers=shapes.provenance_headers(outcome.result, outcome.envelope)
            )
        except ApiError as exc:
            return _error(exc)
        finally:
            if not streaming:
                self.busy -= 1

    async def _body(self, request: Request) -> Any:
        limit = self.settings.gateway_max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is over {limit} bytes")
        data = bytearray()
        # One deadline for the whole body: a client dripping it in holds a slot no longer.
        within = self.settings.gateway_body_timeout_s
        try:
            async with asyncio.timeout(within):
                async for piece in request.stream():
                    data += piece
                    if len(data) > limit:
                        raise ApiError(413, f"request body is over {limit} bytes")
        except ClientDisconnect as exc:
            raise ApiError(400, "the client went away while sending") from exc
        except TimeoutError as exc:
            raise ApiError(408, f"the request body did not arrive within {within} s") from exc
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the request body is not JSON: {exc}") from exc

    async def _cancel(self, job_id: str) -> None:
        """Ask the node to abort `job_id`; a failure to ask is logged, never raised (this runs
        on the way out of a request, where the answer is already decided)."""
        try:
            await cancel(self.nc, self.settings, job_id)
        except Exception as exc:
            log.warning("gateway_cancel_failed job_id=%s error=%r", job_id, exc)

    async def _snapshot(self) -> Snapshot | None:
        """The watched snapshot: verified when it arrived, no I/O here."""
        return self.snapshots.current

    async def _model(self, model_id: str) -> ModelSpec:
        snapshot = await self._snapshot()
        for spec in snapshot.models if snapshot is not None else []:
            if spec.id == model_id:
                return spec
        raise ApiError(
            404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
        )

    async def _run(
        self,
        job: dict[str, Any],
        spec: ModelSpec,
        on_stream: Callable[[StreamBody], None] | None = None,
    ) -> Outcome:
        """The job's verified outcome, or the `ApiError` that answers instead."""
        job_id = job["job_id"]
        try:
            outcome = await submit(
                self.nc,
                self.settings,
                job,
                wait_s=self.settings.gateway_timeout_s,
                on_stream=on_stream,
                router=self.router,
            )
        except TimeoutError as exc:
            await self._cancel(job_id)
            raise ApiError(
                504, f"no result for {job_id} before the deadline", kind="timeout", code="timeout"
            ) from exc
        except JobFailed as exc:
            if exc.node_code is ErrorCode.DEADLINE_EXCEEDED:
                raise ApiError(504, str(exc), kind="timeout", code=exc.node_code.value) from exc
            raise ApiError(502, str(exc), kind="node_error", code=exc.node_code.value) from exc
        except SignatureError as exc:
            raise ApiError(
                502, f"the result does not verify: {exc}", kind="node_error", code="signature"
            ) from exc
        self._check(outcome.result, job_id, spec)
        log.info("gateway_result job_id=%s node_id=%s", job_id, outcome.result.node_id)
        return outcome

    async def _run_attended(
        self, request: Request, job: dict[str, Any], spec: ModelSpec
    ) -> Outcome:
        """`_run` while the client waits for a plain answer: a client that goes away has its
        job cancelled on the network, and its slot is freed at once."""
        running = asyncio.ensure_future(self._run(job, spec))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({running, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when this request is cancelled (the server stops): nothing is left behind.
            abandoned = not running.done()
            await drop(gone, running)
            if abandoned:
                log.info("gateway_client_gone job_id=%s: cancelling", job["job_id"])
                with anyio.CancelScope(shield=True):
                    await self._cancel(job["job_id"])
        if running.cancelled():
            raise ApiError(499, "the client went away", code="client_gone")
        return running.result()

    @staticmethod
    def _check(result: ResultBody, job_id: str, spec: ModelSpec) -> None:
        # `submit` verified the signature and input_sha256; the model must be the approved one.
        if result.job_id != job_id or result.model.sha256 != spec.sha256:
            raise ApiError(
                502,
                f"the result for {job_id} names another job or model",
                kind="node_error",
                code="provenance",
            )

    # -- streaming -----------------------------------------------------------------------

    async def _stream(
        self, kind: Kind, job: dict[str, Any], spec: ModelSpec, include_usage: bool, slot: "Slot"
    ) -> AsyncIterator[bytes]:
        job_id, created = job["job_id"], int(time.time())
        parts = StreamParts(job_id, self.settings.network)
        # Verified stream messages of this job, from the router (admitted nodes only).
        bodies: asyncio.Queue[StreamBody] = asyncio.Queue()
        running = asyncio.ensure_future(self._run(job, spec, bodies.put_nowait))
        message: asyncio.Future[Any] | None = None
        finished = False
        try:
            yield _sse(shapes.chunk(kind, job_id, spec.id, created, "", first=True))
            while not running.done():
                message = asyncio.ensure_future(bodies.get())
                await asyncio.wait({running, message}, return_when=asyncio.FIRST_COMPLETED)
                if not message.done():
                    break
                piece = parts.add(message.result())
                if piece:
                    yield _sse(shapes.chunk(kind, job_id, spec.id, created, piece))
            try:
                outcome = running.result()
            except ApiError as exc:
                finished = True
                yield _sse(exc.body())
                return
            rest = parts.rest(outcome.result.output.text)
            if rest is None:
                log.error("gateway_stream_diverged job_id=%s", job_id)
                finished = True
                error = ApiError(502, "the stream diverged from the signed result", code="stream")
                yield _sse(error.body())
                return
            if rest:
                yield _sse(shapes.chunk(kind, job_id, spec.id, created, rest))
            last = shapes.chunk(
                kind,
                job_id,
                spec.id,
                created,
                None,
                finish_reason=outcome.result.output.finish_reason,
            )
            last["resultity"] = shapes.provenance(outcome.result, outcome.envelope)
            finished = True
            yield _sse(last)
            if include_usage:
                yield _sse(shapes.usage_chunk(kind, outcome.result, created))
            yield b"data: [DONE]\n\n"
        finally:
            slot.release()
            with anyio.CancelScope(shield=True):
                if not finished:
                    log.info("gateway_client_gone job_id=%s: cancelling", job_id)
                    await self._cancel(job_id)
                await drop(message, running)
            if running.done() and not running.cancelled():
                running.exception()  # retrieved, so asyncio does not log it again


async def _disconnected(request: Request) -> None:
    """Return once the client of `request`, whose body was read, has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Slot:
    """One request's place among `gateway_max_concurrent`, released exactly once."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gateway.busy -= 1


class StreamParts:
    """The verified partial output of one job: text per attempt, and what was sent."""

    def __init__(self, job_id: str, network: str) -> None:
        self.job_id = job_id
        self.network = network
        self.texts: dict[int, list[str]] = {}
        self.sent = ""

    def add(self, body: StreamBody) -> str:
        """Take one verified stream body; return the new text to send (maybe empty). Bodies
        of another job or network are dropped."""
        if body.job_id != self.job_id or body.network != self.network:
            return ""
        attempt, text = body.attempt, body.text
        self.texts.setdefault(attempt, []).append(text)
        current = "".join(self.texts[max(self.texts)])
        if len(current) > len(self.sent) and current.startswith(self.sent):
            piece, self.sent = current[len(self.sent) :], current
            return piece
        return ""

    def rest(self, final: str) -> str | None:
        """What the signed text adds to what was sent; None if it does not extend it."""
        if not final.startswith(self.sent):
            return None
        return final[len(self.sent) :]


# -- serving ---------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the caller owns the process's signals), and
    with `listening`: set once it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.listening.set()


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is an OSError (uvicorn would
    exit the process)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, host: str | None = None, port: int | None = None
) -> AsyncIterator[str]:
    """Serve the gateway while the context is open; yields its base URL (`http://h:p`) once
    it accepts connections and knows the snapshot the config bucket held at start."""
    host = host or settings.gateway_host
    port = settings.gateway_port if port is None else port
    api_keys = read_api_keys(settings)
    async with contextlib.AsyncExitStack() as stack:
        sock = _bind(host, port)
        stack.callback(sock.close)
        nc = await connect(settings)
        stack.push_async_callback(nc.close)
        snapshots = await stack.enter_async_context(WatchedSnapshot(nc, settings))
        await snapshots.wait_synced()
        admitted = None
        if settings.admission_required:
            admitted = AdmittedNodes(settings)
            following = asyncio.create_task(admitted.follow(nc), name="registry")
            stack.push_async_callback(_stop_following, following)
            await asyncio.wait_for(admitted.loaded.wait(), 30)
        router = await Router(nc, settings, admitted).start()
        stack.push_async_callback(router.aclose)
        config = uvicorn.Config(
            Gateway(settings, nc, snapshots, router, api_keys).app(),
            host=host,
            port=port,
            # uvicorn's own logging set-up (dictConfig) would close every handler the
            # process has, `dev.log`'s among them: its loggers go through ours instead.
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = _Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            listening = asyncio.ensure_future(server.listening.wait())
            await asyncio.wait({listening, serving}, return_when=asyncio.FIRST_COMPLETED)
            if not listening.done():
                await drop(listening)
                serving.result()
                raise OSError(f"the gateway could not serve on {host}:{port}")
            url = f"http://{host}:{sock.getsockname()[1]}"
            log.info("gateway_listening url=%s", url)
            yield url
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving


async def _stop_following(task: "asyncio.Task[None] | None") -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def serve_until(
    settings: Settings, stop: Callable[[], Awaitable[Any]], on_ready: Callable[[str], Any]
) -> None:
    """Serve until `stop()` returns (the command's signal handling); `on_ready(url)` once
    listening."""
    async with running(settings) as url:
        on_ready(url)
        await stop()
