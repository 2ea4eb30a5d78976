"""`lite serve`: an OpenAI-compatible HTTP server (Starlette app, run by uvicorn) for one model.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/completions. Bodies and responses follow OpenAI's shapes; `stream: true` answers with
server-sent events (`data: {json}` chunks, then `data: [DONE]`).

Concurrency: requests are parsed and tokenized concurrently, but generations are queued (a FIFO
asyncio lock) and run one at a time on a single worker thread, never on the event loop. The
worker hands each `Piece` to the loop through an asyncio queue. The lock is released by the
worker when its generation has really ended, so the next request never finds the model busy.
A client that disconnects (mid-stream, or while a non-streaming answer is computed, or while
queued) sets its generation's cancel event, and the worker stops at the next token.

Only lite's public API is used: `Model.stream / chat_prompt / tokenize / tokenizer / n_ctx`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import Generation, LiteError, Piece

log = logging.getLogger("lite.server")

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_COMPLETION_MAX_TOKENS = 16    # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16


# --- errors -----------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered with OpenAI's error body: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_response(err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status)


def _internal(e: BaseException) -> ApiError:
    if isinstance(e, LiteError):
        return ApiError(str(e), status=500, kind="server_error", code="generation_failed")
    log.error("generation failed", exc_info=e)
    return ApiError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error")


# --- request validation -----------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Fields:
    """Typed access to a JSON object's optional fields; wrong types raise a 400 naming the field."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body

    def number(self, name: str, default: float | None, lo: float, hi: float, lo_open: bool = False) -> float | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not _is_number(v):
            raise ApiError(f"'{name}' must be a number, got {_describe(v)}", param=name, code="invalid_type")
        if v < lo or v > hi or (lo_open and v == lo):
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise ApiError(f"'{name}' must be in {interval}, got {v}", param=name, code="invalid_value")
        return float(v)

    def integer(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v):
            raise ApiError(f"'{name}' must be an integer, got {_describe(v)}", param=name, code="invalid_type")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ApiError(f"'{name}' must be {bounds}, got {v}", param=name, code="invalid_value")
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ApiError(f"'{name}' must be a boolean, got {_describe(v)}", param=name, code="invalid_type")
        return v

    def obj(self, name: str) -> "_Fields":
        v = self.body.get(name)
        if v is None:
            return _Fields({})
        if not isinstance(v, Mapping):
            raise ApiError(f"'{name}' must be an object, got {_describe(v)}", param=name, code="invalid_type")
        return _Fields(v)


def _describe(v: Any) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(v), type(v).__name__)


@dataclass
class _Request:
    """What both endpoints share once validated."""
    stream: bool
    include_usage: bool
    max_tokens: int | None
    stop: list[str]
    sampling: dict[str, Any]
    logprobs: bool


def _common(f: _Fields) -> _Request:
    n = f.integer("n", 1)
    if n != 1:
        raise ApiError(f"'n' = {n} is not supported: this server returns exactly one choice", param="n",
                       code="unsupported_value")
    stream = f.boolean("stream", False)
    include_usage = f.obj("stream_options").boolean("include_usage", False)
    max_tokens = f.integer("max_completion_tokens", None, lo=0)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", None, lo=0)
    stop_v = f.body.get("stop")
    if stop_v is None:
        stop: list[str] = []
    elif isinstance(stop_v, str):
        stop = [stop_v]
    elif isinstance(stop_v, list) and all(isinstance(s, str) for s in stop_v):
        if len(stop_v) > MAX_STOP_STRINGS:
            raise ApiError(f"'stop' has {len(stop_v)} strings; at most {MAX_STOP_STRINGS} are allowed",
                           param="stop", code="invalid_value")
        stop = list(stop_v)
    else:
        raise ApiError("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    stop = [s for s in stop if s]
    sampling: dict[str, Any] = {
        "temperature": f.number("temperature", 1.0, 0.0, 2.0),
        "top_p": f.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        "frequency_penalty": f.number("frequency_penalty", 0.0, -2.0, 2.0),
        "presence_penalty": f.number("presence_penalty", 0.0, -2.0, 2.0),
        # Not in OpenAI's API, but accepted by llama.cpp's and vLLM's servers.
        "top_k": f.integer("top_k", 0, lo=0),
        "min_p": f.number("min_p", 0.0, 0.0, 1.0),
        "repetition_penalty": f.number("repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
    }
    seed = f.integer("seed", None)
    if seed is not None:
        sampling["seed"] = seed % 2**64       # OpenAI allows negative seeds; the sampler wants >= 0
    return _Request(stream=stream, include_usage=include_usage, max_tokens=max_tokens, stop=stop,
                    sampling=sampling, logprobs=False)


def _message_text(i: int, m: Mapping[str, Any]) -> str:
    content = m.get("content")
    param = f"messages[{i}].content"
    if content is None:
        if m.get("role") == "assistant":
            return ""
        raise ApiError(f"'{param}' is required", param=param, code="missing_field")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"'{param}[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                               f"this model reads text only", param=f"{param}[{j}]", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(f"'{param}' must be a string or an array of text parts, got {_describe(content)}",
                   param=param, code="invalid_type")


def parse_chat(body: Mapping[str, Any]) -> tuple[list[dict[str, str]], _Request]:
    f = _Fields(body)
    messages = body.get("messages")
    if messages is None:
        raise ApiError("'messages' is required", param="messages", code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty array of {role, content} objects", param="messages",
                       code="invalid_type" if not isinstance(messages, list) else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ApiError(f"'messages[{i}]' must be an object, got {_describe(m)}", param=f"messages[{i}]",
                           code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise ApiError(f"'messages[{i}].role' must be a string", param=f"messages[{i}].role",
                           code="invalid_type")
        if role not in CHAT_ROLES:
            raise ApiError(f"'messages[{i}].role' = {role!r} is not supported; use one of "
                           f"{', '.join(sorted(CHAT_ROLES))}", param=f"messages[{i}].role", code="invalid_value")
        out.append({"role": CHAT_ROLES[role], "content": _message_text(i, m)})
    req = _common(f)
    req.logprobs = f.boolean("logprobs", False)
    f.integer("top_logprobs", None, lo=0, hi=20)     # accepted; alternatives are not reported
    return out, req


def parse_completion(body: Mapping[str, Any]) -> tuple[str | list[int], str | None, _Request]:
    f = _Fields(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError("'prompt' is required", param="prompt", code="missing_field")
    # A batch of one is accepted in either of its list forms.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(_is_int(t) for t in prompt):
            raise ApiError("'prompt' must be a string, or a non-empty array of token ids (one prompt only)",
                           param="prompt", code="invalid_value")
    elif not isinstance(prompt, str):
        raise ApiError(f"'prompt' must be a string or an array of token ids, got {_describe(prompt)}",
                       param="prompt", code="invalid_type")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise ApiError("'suffix' must be a string", param="suffix", code="invalid_type")
    if suffix is not None and not isinstance(prompt, str):
        raise ApiError("'suffix' needs a string prompt", param="suffix", code="invalid_value")
    if f.boolean("echo", False):
        raise ApiError("'echo' is not supported", param="echo", code="unsupported_value")
    best_of = f.integer("best_of", 1)
    if best_of != 1:
        raise ApiError("'best_of' other than 1 is not supported", param="best_of", code="unsupported_value")
    req = _common(f)
    req.logprobs = f.integer("logprobs", None, lo=0, hi=20) is not None
    return prompt, suffix, req


async def _json_body(request: Request) -> Mapping[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {_describe(body)}", code="invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError("'model' must be a string", param="model", code="invalid_type")
    return body


# --- the generation worker ----------------------------------------------------------------------

class Engine:
    """Runs one model's generations one at a time on a worker thread, in arrival order."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lite-generate")
        self.active: set[threading.Event] = set()
        self.finished: deque[Generation] = deque(maxlen=32)   # recent results, newest last
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _queue_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def run(self, prompt: list[int], max_tokens: int, stop: Sequence[str], sampling: Mapping[str, Any],
                  cancel: threading.Event) -> AsyncIterator[Piece | Generation]:
        """Yield the generation's `Piece`s, then its `Generation`. Waits for earlier requests first."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Piece | Generation | BaseException] = asyncio.Queue()
        lock = self._queue_lock()
        await lock.acquire()
        if cancel.is_set():                   # the client left while queued
            lock.release()
            yield Generation(prompt_tokens=len(prompt), finish_reason="cancelled")
            return
        # From here the worker owns the lock and releases it when the model is free again.
        try:
            self.active.add(cancel)
            self.executor.submit(self._work, loop, lock, queue, prompt, max_tokens, list(stop), dict(sampling),
                                 cancel)
        except BaseException:
            self.active.discard(cancel)
            lock.release()
            raise
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Generation):
                return

    def _work(self, loop: asyncio.AbstractEventLoop, lock: asyncio.Lock, queue: asyncio.Queue, prompt: list[int],
              max_tokens: int, stop: list[str], sampling: dict[str, Any], cancel: threading.Event) -> None:
        def post(item: Any) -> None:
            with contextlib.suppress(RuntimeError):       # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)
        try:
            s = self.model.stream(prompt, max_tokens, stop=stop, cancel=cancel, **sampling)
            for piece in s:
                post(piece)
            assert s.result is not None
            self.finished.append(s.result)
            post(s.result)
        except BaseException as e:    # noqa: BLE001 — handed to the request that asked
            post(e)
        finally:
            self.active.discard(cancel)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lock.release)

    def shutdown(self) -> None:
        for ev in list(self.active):
            ev.set()
        self.executor.shutdown(wait=False, cancel_futures=True)


# --- responses ----------------------------------------------------------------------------------

def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finish_reason(g: Generation) -> str:
    return "length" if g.finish_reason == "length" else "stop"


def _usage(g: Generation) -> dict[str, Any]:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": g.cached_tokens}}


class _LogprobFormat:
    """Chosen tokens' log-probabilities in the chat shape ({"content": [...]}) or the legacy
    completions shape ({"tokens", "token_logprobs", "top_logprobs", "text_offset"})."""

    def __init__(self, model: Any, chat: bool) -> None:
        self.model, self.chat, self.offset = model, chat, 0

    def _bytes(self, token_id: int) -> bytes:
        try:
            return self.model.tokenizer.token_to_bytes(token_id)
        except LiteError:          # a model file without a tokenizer
            return b""

    def __call__(self, ids: Sequence[int], logprobs: Sequence[float]) -> dict[str, Any]:
        data = [self._bytes(t) for t in ids]
        texts = [b.decode("utf-8", errors="replace") for b in data]
        if self.chat:
            return {"content": [{"token": t, "logprob": float(lp), "bytes": list(b), "top_logprobs": []}
                                for t, lp, b in zip(texts, logprobs, data)]}
        offsets = []
        for t in texts:
            offsets.append(self.offset)
            self.offset += len(t)
        return {"tokens": texts, "token_logprobs": [float(lp) for lp in logprobs], "top_logprobs": None,
                "text_offset": offsets}


class _SSEResponse(StreamingResponse):
    """A StreamingResponse of server-sent events, plus a callback that runs however the response
    ends (finished, client gone, server stopping): it cancels the generation."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _until_disconnect(request: Request, cancel: threading.Event, work: Callable[[], Awaitable[Any]]) -> Any:
    """Await `work()`; if the client disconnects first, set `cancel`, stop waiting and return None."""
    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    job = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not job.done():
            cancel.set()
            job.cancel()
        watcher.cancel()
    return job.result() if job.done() and not job.cancelled() else None


# --- the app ------------------------------------------------------------------------------------

def create_app(model: Any, model_id: str, api_key: str | None = None) -> Starlette:
    """The Starlette app serving `model` (a `lite.Model`) under the name `model_id`. One app per
    Model: generations are serialised by the app. With `api_key`, requests to /v1 must send
    `Authorization: Bearer <api_key>`."""
    engine = Engine(model)
    created = int(time.time())
    if model.has_tokenizer:
        model.tokenizer        # build it now, not inside the first request

    def check_auth(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError("invalid or missing API key (send 'Authorization: Bearer <key>')", status=401,
                           code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "lite"}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        check_auth(request)
        if request.path_params["model"] != model_id:
            raise ApiError(f"the model {request.path_params['model']!r} does not exist; this server has "
                           f"{model_id!r}", param="model", code="model_not_found", status=404)
        return JSONResponse(model_card())

    async def tokenize(param: str, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        try:
            ids = await anyio.to_thread.run_sync(fn, *args)
        except LiteError as e:
            raise ApiError(str(e), param=param) from None
        if len(ids) >= model.n_ctx:
            raise ApiError(f"the prompt has {len(ids)} tokens but the model's context holds {model.n_ctx} "
                           f"(prompt plus completion); shorten the prompt or restart the server with a "
                           f"larger --n-ctx", param=param, code="context_length_exceeded")
        return ids

    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        messages, req = parse_chat(await _json_body(request))
        ids = await tokenize("messages", model.chat_prompt, messages)
        return await respond(request, ids, req, chat=True)

    async def completions(request: Request) -> Response:
        check_auth(request)
        prompt, suffix, req = parse_completion(await _json_body(request))
        if suffix is not None:
            def fim_ids(prefix: str, suffix: str) -> list[int]:
                return model.tokenize(model.tokenizer.fim_prompt(prefix, suffix), add_bos=False)
            ids = await tokenize("prompt", fim_ids, prompt, suffix)
        elif isinstance(prompt, str):
            ids = await tokenize("prompt", model.tokenize, prompt)
        else:
            if any(not 0 <= t < model.config.vocab_size for t in prompt):
                raise ApiError(f"token ids in 'prompt' must be in 0..{model.config.vocab_size - 1}",
                               param="prompt", code="invalid_value")
            ids = await tokenize("prompt", list, prompt)
        return await respond(request, ids, req, chat=False)

    async def respond(request: Request, ids: list[int], req: _Request, chat: bool) -> Response:
        room = model.n_ctx - len(ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else (
            room if chat else DEFAULT_COMPLETION_MAX_TOKENS)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        cancel = threading.Event()
        lp_format = _LogprobFormat(model, chat) if req.logprobs else None

        def events() -> AsyncIterator[Piece | Generation]:
            return engine.run(ids, max_tokens, req.stop, req.sampling, cancel)

        if req.stream:
            return _SSEResponse(stream(events(), rid, now, chat, req, lp_format), on_close=cancel.set)

        async def collect() -> Generation:
            result = None
            async for item in events():
                if isinstance(item, Generation):
                    result = item
            assert result is not None
            return result

        try:
            g = await _until_disconnect(request, cancel, collect)
        except Exception as e:  # noqa: BLE001
            return _error_response(_internal(e))
        if g is None:                         # the client has gone; nobody reads this
            return Response(status_code=204)
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(g), "logprobs": None}
        if lp_format is not None:
            choice["logprobs"] = lp_format(g.token_ids, g.logprobs)
        if chat:
            choice["message"] = {"role": "assistant", "content": g.text}
        else:
            choice["text"] = g.text
        return JSONResponse({"id": rid, "object": obj, "created": now, "model": model_id,
                             "system_fingerprint": f"lite-{model.backend.name}",
                             "choices": [choice], "usage": _usage(g)})

    async def stream(events: AsyncIterator[Piece | Generation], rid: str, now: int, chat: bool, req: _Request,
                     lp_format: _LogprobFormat | None) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
            c: dict[str, Any] = {"id": rid, "object": obj, "created": now, "model": model_id,
                                 "system_fingerprint": f"lite-{model.backend.name}",
                                 "choices": [] if choice is None else [{"index": 0, **choice}]}
            if req.include_usage:
                c["usage"] = None
            c.update(extra)
            return _sse(c)

        def content(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
            if chat:
                return {"delta": {"content": text} if text or finish is None else {}, "logprobs": logprobs,
                        "finish_reason": finish}
            return {"text": text, "logprobs": logprobs, "finish_reason": finish}

        if chat:
            yield chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        result: Generation | None = None
        try:
            async for item in events:
                if isinstance(item, Generation):
                    result = item
                    break
                with_lp = lp_format is not None and item.token_id is not None and item.logprob is not None
                if item.text or with_lp:
                    lp = lp_format([item.token_id], [item.logprob]) if with_lp else None  # type: ignore[misc,list-item]
                    yield chunk(content(item.text, logprobs=lp))
        except Exception as e:  # noqa: BLE001 — headers are sent: report in-band, as OpenAI does
            yield _sse(_internal(e).body())
            yield "data: [DONE]\n\n"
            return
        assert result is not None
        yield chunk(content("", finish=_finish_reason(result)))
        if req.include_usage:
            yield chunk(None, usage=_usage(result))
        yield "data: [DONE]\n\n"

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(ApiError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                                        code=code))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.shutdown()

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={ApiError: api_error, HTTPException: http_error}, lifespan=lifespan)
    app.state.engine = engine
    app.state.model_id = model_id
    return app


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8080, backend: str | None = None,
          n_ctx: int | None = None, ram_budget: str | None = None, model_id: str | None = None,
          api_key: str | None = None, log_level: str = "info", vram_budget: str | None = None) -> None:
    """Load `model_path` and serve it until interrupted (Ctrl-C)."""
    from pathlib import Path

    import uvicorn

    from . import load

    model = load(model_path, backend=backend, n_ctx=n_ctx, ram_budget=ram_budget, vram_budget=vram_budget)
    try:
        name = model_id or Path(model_path).stem
        app = create_app(model, name, api_key=api_key)
        shown = f"[{host}]" if ":" in host else host
        print(f"lite: serving {name!r} ({model.backend.name} backend, context {model.n_ctx}) at "
              f"http://{shown}:{port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        model.close()
