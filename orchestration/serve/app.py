"""`instructray serve RUN_DIR`: an OpenAI-compatible Ray Serve endpoint for a policy.

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with
`stream: true`; both report the model's raw logprobs when asked: `logprobs` and
`echo` for completions, `logprobs`/`top_logprobs` for chat), GET /v1/models,
GET /health (open, for load balancers; the others need `Authorization: Bearer
<key>` when a key is configured in serve.api_key or the env INSTRUCTRAY_API_KEY).
Binds serve.host (127.0.0.1 by default). The HF engine runs on the CPU; `vllm_app` is the GPU path.

Two deployments: this HTTP front (tokenizer only) and the decoder replicas (`decoder.py`, the
weights). A request whose decoder replica dies before the first token reaches the client is
sent again to another replica, up to REPLICA_LOST_RETRIES times.
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` type
# on the route methods (Serve's class-based view does not resolve string annotations).
import hmac
import logging
import time
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from orchestration.rundir import COMPLETE
from orchestration.serve import protocol as P
from orchestration.serve.auth import serving_key
from orchestration.serve.decoder import Decoder
from orchestration.serve.engine import Row
from orchestration.serve.logprob_format import chat_logprobs, completion_logprobs
from orchestration.serve.prompts import PromptCodec
from rlhf.config import Config, ServeConfig

log = logging.getLogger(__name__)
REPLICA_LOST_RETRIES = 3  # a decoder replica that died holding a request: try the others

api = FastAPI(title="instructray", docs_url=None, redoc_url=None)


@api.exception_handler(P.APIError)
async def _api_error(_: Request, e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(HTTPException)  # unknown route, wrong method
async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse(P.error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)


@api.exception_handler(Exception)
async def _server_error(_: Request, e: Exception) -> JSONResponse:
    # Also reached by a stream's cancellation (its headers are sent), so checked here.
    if isinstance(e, TaskCancelledError):  # the client left and Serve cancelled the request
        log.info("request cancelled: the client disconnected")
        return JSONResponse(P.error_body("client closed the request", "cancelled"), status_code=499)
    log.exception("request failed")
    return JSONResponse(P.error_body(f"internal error: {type(e).__name__}", "server_error"), 500)


# Helpers come before the deployment class: Serve pickles the class when it is
# decorated, and names defined later in the module would be missing in the replica.
def _usage(prompts: list[list[int]], tokens: list[int]) -> P.Usage:
    # OpenAI counts each prompt once, however many choices it gets.
    p, c = sum(len(ids) for ids in prompts), sum(tokens)
    return P.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _retry_or_raise(lost: RayActorError, attempt: int) -> None:
    """Say that a request goes to another decoder replica, or re-raise once the retries are spent."""
    if attempt == REPLICA_LOST_RETRIES:
        raise lost
    log.warning("a decoder replica was lost with a request (%s); sending it again (%d of %d)",
                type(lost).__name__, attempt + 1, REPLICA_LOST_RETRIES)


@contextmanager
def _cancel_unless_finished(response):
    """Cancel the decoder call if the caller stops before its end (a client that left).

    Serve cancels our task when the client disconnects, but not reliably the calls that task
    made: a decoder call left running decodes its rows to their token limit, and the batch
    behind it waits (tests/e2e/test_serve_disconnect.py).
    """
    finished = False
    try:
        yield
        finished = True
    except RayActorError:
        finished = True  # the replica died with the call: nothing left to cancel
        raise
    finally:
        if not finished:
            response.cancel()


class _EventStream(StreamingResponse):
    """Closes its events when the response ends early. A client that leaves while an event is
    being sent cancels the response there, and the event generators, left suspended, would be
    closed (and their decoder call cancelled) only whenever the garbage collector got to them."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        async with aclosing(events):
            try:
                async for event in events:
                    yield event
            except Exception as e:  # headers are sent: report in-band, as OpenAI does
                log.exception("stream failed")
                yield P.sse(P.error_body(f"internal error: {type(e).__name__}", "server_error"))
        yield P.SSE_DONE
    return _EventStream(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@serve.deployment(name="instructray")  # admission limits: build_app, from ServeConfig
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, decoder: DeploymentHandle, checkpoint: str, model_name: str, serve_cfg: dict,
                 api_key: str | None) -> None:
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.model_name, self.api_key = model_name, api_key
        self.created = int(time.time())
        self.engine = PromptCodec(checkpoint)
        self.decoder, self.whole = decoder.options(stream=True), decoder

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return P.ModelList(data=[P.ModelCard(id=self.model_name, created=self.created)]).model_dump()

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = await self._parse(request, P.CompletionRequest)
        prompts = self._prompt_ids(req.prompt)
        rows = self._rows(req, prompts, req.max_tokens, req.logprobs, bool(req.echo))
        rid, created = P.new_id("cmpl"), P.now()
        if req.stream:
            return _sse(self._stream_completion(req, rows, prompts, rid, created))
        texts, reasons, entries, usage = await self._collect(rows, prompts)
        choices = [P.CompletionChoice(index=i, text=t, finish_reason=r,
                                      logprobs=self._completion_logprobs(row, e))
                   for i, (row, t, r, e) in enumerate(zip(rows, texts, reasons, entries))]
        return P.CompletionResponse(id=rid, created=created, model=self.model_name,
                                    choices=choices, usage=usage).model_dump()

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._authorize(request)
        req = await self._parse(request, P.ChatRequest)
        # "developer" is OpenAI's newer name for the system role.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        prompts = [self.engine.encode(self.engine.render_chat(messages))]
        rows = self._rows(req, prompts, req.token_budget(), req.alternatives())
        rid, created = P.new_id("chatcmpl"), P.now()
        if req.stream:
            return _sse(self._stream_chat(req, rows, prompts, rid, created))
        texts, reasons, entries, usage = await self._collect(rows, prompts)
        choices = [P.ChatChoice(index=i, message=P.AssistantMessage(content=t), finish_reason=r,
                                logprobs=self._chat_logprobs(row, e))
                   for i, (row, t, r, e) in enumerate(zip(rows, texts, reasons, entries))]
        return P.ChatResponse(id=rid, created=created, model=self.model_name,
                              choices=choices, usage=usage).model_dump()

    # ---- request handling -------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise P.APIError(401, "missing or incorrect API key (Authorization: Bearer <key>)",
                             code="invalid_api_key")

    async def _parse(self, request: Request, model: type[BaseModel]):
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise P.APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise P.APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        try:
            req = model.model_validate_json(bytes(body))
        except ValidationError as e:
            raise P.from_validation_error(e) from None
        if req.model != self.model_name:
            raise P.APIError(404, f"model {req.model!r} does not exist; this server has "
                             f"{self.model_name!r}", param="model", code="model_not_found")
        return req

    def _prompt_ids(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.engine.encode(prompt)]
        if not prompt:
            raise P.APIError(400, "prompt: must not be an empty list", param="prompt")
        if isinstance(prompt[0], str):
            return [self.engine.encode(p) for p in prompt]
        if isinstance(prompt[0], int):
            return [self.engine.check_ids(prompt)]
        return [self.engine.check_ids(p) for p in prompt]

    def _rows(self, req, prompts: list[list[int]], max_tokens: int | None,
              logprobs: int | None = None, echo: bool = False) -> list[Row]:
        n = req.n or 1
        if len(prompts) * n > P.MAX_ROWS:
            raise P.APIError(400, f"prompts x n = {len(prompts) * n} exceeds {P.MAX_ROWS}", param="n")
        stop = req.stop_list()
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        rows = []
        for i, ids in enumerate(prompts):
            budget = self.engine.budget(len(ids), max_tokens, self.cfg.max_tokens_limit)
            for j in range(n):
                # Choice k of a seeded request always gets seed + k: reproducible per choice.
                seed = None if req.seed is None else req.seed + i * n + j
                rows.append(Row(ids, budget, temperature, top_p, stop, seed, logprobs, echo))
        return rows

    def _completion_logprobs(self, row: Row, entries) -> P.CompletionLogprobs | None:
        return None if row.logprobs is None else completion_logprobs(entries, self.engine.token_text)

    def _chat_logprobs(self, row: Row, entries) -> P.ChatLogprobs | None:
        return None if row.logprobs is None else chat_logprobs(entries, self.engine.token_text)

    async def _deltas(self, rows: list[Row]) -> AsyncIterator[list]:
        """The rows' deltas step by step; a lost decoder replica is retried while nothing was sent."""
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            sent, response = False, self.decoder.generate.remote(rows)
            try:
                with _cancel_unless_finished(response):
                    async for deltas in response:
                        sent = True
                        yield deltas
                return
            except RayActorError as e:
                if sent:  # the client has part of this answer: a new one cannot follow it
                    raise
                _retry_or_raise(e, attempt)

    async def _collect(self, rows: list[Row], prompts: list[list[int]]):
        """A whole answer, in one reply from the decoder (one message per request, not per token);
        nothing is sent before it is complete, so a lost replica is always retried."""
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            response = self.whole.complete.remote(rows)
            try:
                with _cancel_unless_finished(response):
                    texts, reasons, entries, tokens = await response
                return texts, reasons, entries, _usage(prompts, tokens)
            except RayActorError as e:
                _retry_or_raise(e, attempt)

    async def _stream_completion(self, req, rows, prompts, rid, created) -> AsyncIterator[str]:
        tokens = [0] * len(rows)
        async with aclosing(self._deltas(rows)) as steps:  # closed with us: its decoder call cancelled
            async for deltas in steps:
                for i, d in enumerate(deltas):
                    if d is not None and (d.text or d.finish_reason or d.logprobs):
                        tokens[i] = d.tokens
                        choice = P.CompletionChoice(index=i, text=d.text, finish_reason=d.finish_reason,
                                                    logprobs=self._completion_logprobs(rows[i], d.logprobs))
                        yield P.sse(P.CompletionResponse(id=rid, created=created, model=self.model_name,
                                                         choices=[choice]))
        if req.stream_options and req.stream_options.include_usage:
            yield P.sse(P.CompletionResponse(id=rid, created=created, model=self.model_name,
                                             choices=[], usage=_usage(prompts, tokens)))

    async def _stream_chat(self, req, rows, prompts, rid, created) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            return P.sse(P.ChatChunk(id=rid, created=created, model=self.model_name,
                                     choices=choices, usage=usage))
        for i in range(len(rows)):
            yield chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(role="assistant", content=""))])
        tokens = [0] * len(rows)
        async with aclosing(self._deltas(rows)) as steps:
            async for deltas in steps:
                for i, d in enumerate(deltas):
                    if d is not None and (d.text or d.finish_reason or d.logprobs):
                        tokens[i] = d.tokens
                        delta = P.ChatDelta(content=d.text or None)
                        yield chunk([P.ChatChunkChoice(index=i, delta=delta, finish_reason=d.finish_reason,
                                                       logprobs=self._chat_logprobs(rows[i], d.logprobs))])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], _usage(prompts, tokens))


# ---- building and running -----------------------------------------------------------

def resolve_checkpoint(target: str | Path) -> Path:
    """A run dir -> its final policy (ppo/final, else sft/final); an HF dir -> itself."""
    path = Path(target)
    for stage in ("ppo", "sft"):
        final = path / stage / "final"
        if (final / COMPLETE).exists():
            return final
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"{target}: neither a run directory with a finished ppo/ or sft/ "
                            "stage nor an HF checkpoint directory (config.json)")


def model_name_for(checkpoint: Path) -> str:
    """`<run>/<stage>` for a run's final model (e.g. tiny/ppo), else the folder's name."""
    checkpoint = checkpoint.resolve()
    if checkpoint.name == "final":
        return f"{checkpoint.parent.parent.name}/{checkpoint.parent.name}"
    return checkpoint.name


def admission(serve_cfg: ServeConfig) -> dict:
    """Serve's deployment options that bound the work in flight and shed the excess."""
    return dict(max_ongoing_requests=serve_cfg.max_ongoing_requests,
                max_queued_requests=serve_cfg.max_queued_requests,
                backpressure_config=BackpressureConfig(status_code=503, retry_after_s=serve_cfg.retry_after_s))


def build_app(checkpoint: str | Path, serve_cfg: ServeConfig, model_name: str | None = None,
              num_cpus: float = 1.0, dtype: str = "float32"):
    """The Serve application (HF engine); `serve.run` it. The key is resolved here, driver-side."""
    checkpoint = Path(checkpoint).resolve()
    api_key = serving_key(serve_cfg)
    decoder = Decoder.options(
        num_replicas=serve_cfg.num_replicas, ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=serve_cfg.max_ongoing_requests,
    ).bind(str(checkpoint), serve_cfg.max_batch_size, serve_cfg.batch_wait_timeout_s, max(1, int(num_cpus)), dtype)
    # One front per decoder replica, admitting what one replica takes; it holds no weights and
    # reserves no CPU. What it admits beyond a busy replica waits at its handle, bounded by that.
    return OpenAIServer.options(
        num_replicas=serve_cfg.num_replicas, ray_actor_options={"num_cpus": 0}, **admission(serve_cfg),
    ).bind(decoder, str(checkpoint), model_name or model_name_for(checkpoint), serve_cfg.model_dump(), api_key)


def main(cfg: Config, target: str) -> None:
    """Serve `target` on cfg.serve.host:port until Ctrl-C."""
    from orchestration.cluster import connect
    from orchestration.serve import vllm_app

    checkpoint = resolve_checkpoint(target)
    name = model_name_for(checkpoint)
    connect(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    if vllm_app.should_use(cfg):
        app, engine = vllm_app.build_vllm_app(checkpoint, cfg, name), "vLLM (ray.serve.llm)"
    else:
        app, engine = build_app(checkpoint, cfg.serve, name, dtype=cfg.model.dtype), "HF on CPU"
    serve.run(app, name="instructray", route_prefix="/", blocking=False)
    print(f"serving {checkpoint} as model {name!r} with {engine} at "
          f"http://{cfg.serve.host}:{cfg.serve.port}/v1  (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
