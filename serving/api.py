"""An OpenAI-compatible chat server for what the recipes trained (and the base models they start from).

    python -m serving.api --model tiny:glm-4-9b-chat                        # a tiny model, nothing downloaded
    python -m serving.api --adapter output/glm4-lora                        # base from adapter_config.json
    python -m serving.api --model THUDM/glm-4-9b-chat-hf-folder --adapter output/glm4-lora --port 8000
    SERVING_API_KEY=secret python -m serving.api --model runs/export       # clients send "Bearer secret"

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (messages, stream, max_tokens, temperature,
top_p, stop, seed; tools / tool_choice on GLM-4). Concurrent requests share forward passes (serving/engine.py).
Binds 127.0.0.1 unless --host says otherwise. SIGTERM (or Ctrl-C): no new connections, the requests in flight
finish (up to --drain_timeout seconds), exit 0.
"""
import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

from tuning.errors import UserError, run_main

from .model_args import add_model_arguments, chosen_model
from .origin_guard import OriginGuard, add_origin_flags

if TYPE_CHECKING:  # annotations only: the engine (torch, transformers) loads when a server starts
    from .engine import Engine, Finished

API_KEY_ENV = "SERVING_API_KEY"
log = logging.getLogger("serving")


async def read_json_body(request, limit: int):
    # .protocol and .engine load torch and transformers: imported where used, so --help and refusals answer at once
    from .protocol import ApiError

    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes; at most {limit} are accepted")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes")
    try:
        return json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply (hundreds of [ or {)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts (4,300)
        raise ApiError(400, f"the request body is not valid JSON: {str(exc).splitlines()[0][:200]}") from None


# No tokenizer here turns fewer than this many characters into one token: a prompt with more characters than this
# times the token limit is refused before it is tokenized (tokenizing megabytes would hold a worker for seconds).
MAX_CHARS_PER_TOKEN = 32


def prompt_characters(chat) -> int:
    text = sum(len(m["content"]) for m in chat.messages if isinstance(m.get("content"), str))
    return text + (len(json.dumps(chat.tools, ensure_ascii=False)) if chat.tools else 0)


async def prompt_ids(engine: "Engine", chat, max_prompt_tokens: int | None) -> list[int]:
    """The prompt's ids: its size checked before it is tokenized, tokenized off the event loop (/health and other
    clients are answered meanwhile), then checked against --max_prompt_tokens; a forced tool call opened."""
    from .protocol import ApiError

    context = engine.loaded.context_length
    limit = min(max_prompt_tokens or context, context)
    if prompt_characters(chat) > MAX_CHARS_PER_TOKEN * limit:
        raise ApiError(400, f"the prompt is {prompt_characters(chat)} characters, more than {limit} tokens can "
                            "hold", param="messages", code="context_length_exceeded")
    try:
        ids = await asyncio.to_thread(engine.prompt_ids, chat.messages, chat.tools, chat.forced_tool)
    except UserError as exc:
        raise ApiError(400, str(exc), param=exc.field) from None
    if max_prompt_tokens and max_prompt_tokens < len(ids) < context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {max_prompt_tokens} "
                            "(--max_prompt_tokens)", param="messages", code="context_length_exceeded")
    return ids


def submit(engine: "Engine", ids: list[int], chat, events: asyncio.Queue):
    """Hand the request to the engine; its events arrive on `events` (put there from the engine's thread)."""
    from .engine import EngineBusy, EngineClosed
    from .protocol import ApiError

    loop = asyncio.get_running_loop()

    def deliver(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server stopped)
            pass

    try:
        return engine.submit(ids, chat.params, deliver)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except EngineBusy as exc:
        raise ApiError(429, f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
    except EngineClosed:
        raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"}) from None


async def answer(events: asyncio.Queue, handle, request) -> "Finished | None":
    """The finished answer of a non-streamed request, or None when its client hung up. Tokens keep arriving while
    the client may be gone: the connection is looked at every half second whatever comes, and the slot is freed."""
    from .engine import Finished

    try:
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                event = None
            if isinstance(event, Finished):
                return event
            if time.monotonic() - checked >= 0.5:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return None
    finally:
        handle.cancel()  # frees the slot if the client went away (no-op once finished)


def create_app(engine: "Engine", *, api_key: str | None = None, max_body_bytes: int = 4 << 20,
               default_max_tokens: int = 256, drain_timeout: float = 30.0, max_prompt_tokens: int | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from .chat import AnswerShaper
    from .protocol import ApiError, completion, parse_chat_request, usage

    name = engine.loaded.name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close, drain_timeout)

    app = FastAPI(title="serving", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    def check_key(request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Constant-time: the comparison takes as long whatever prefix of the key a guess gets right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return {"status": "draining" if stats["closed"] else "ok", "model": name, **stats}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json_body(request, max_body_bytes)
        chat = parse_chat_request(body, default_max_tokens)
        if chat.model != name:
            raise ApiError(404, f"the model {chat.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        ids = await prompt_ids(engine, chat, max_prompt_tokens)
        events: asyncio.Queue = asyncio.Queue()
        handle = submit(engine, ids, chat, events)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        shaper = AnswerShaper(chat.tools, chat.forced_tool)
        if chat.stream:
            return StreamingResponse(_stream(events, handle, shaper, chat, request_id, name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        event = await answer(events, handle, request)
        if event is None:
            return JSONResponse({}, status_code=499)  # the client hung up
        _raise_if_failed(event)
        message, reason = shaper.message(event)
        return completion(request_id, name, message, reason, usage(event.prompt_tokens, event.completion_tokens))

    return app


def _raise_if_failed(event: "Finished") -> None:
    from .protocol import ApiError

    if event.finish_reason == "error":
        raise ApiError(500, f"generation failed: {event.error}")
    if event.finish_reason == "cancelled":
        raise ApiError(503, "the server stopped before the answer was finished", headers={"Retry-After": "5"})


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(events, handle, shaper, chat, request_id, name):
    from .engine import Delta
    from .protocol import ApiError, chunk, usage

    try:
        yield _sse(chunk(request_id, name, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                text = shaper.content_delta(event)
                if text:
                    yield _sse(chunk(request_id, name, {"content": text}))
                continue
            try:
                _raise_if_failed(event)
            except ApiError as exc:
                yield _sse(exc.body())
                return
            rest, calls, reason = shaper.finish(event)
            if rest:
                yield _sse(chunk(request_id, name, {"content": rest}))
            if calls:
                yield _sse(chunk(request_id, name, {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}))
            yield _sse(chunk(request_id, name, {}, reason))
            if chat.include_usage:
                yield _sse(chunk(request_id, name, None, use=usage(event.prompt_tokens, event.completion_tokens)))
            yield "data: [DONE]\n\n"
            return
    finally:
        handle.cancel()  # a client that went away frees its place at the next decoding step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--served_model_name", default=None, help="the name clients pass as `model` "
                        "(default: the adapter folder's name, else --model)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server: set a key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--max_batch", type=int, default=16, help="requests decoded together (1: one at a time)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    parser.add_argument("--max_tokens", type=int, default=256, help="default max_tokens of a request")
    parser.add_argument("--max_body_mb", type=float, default=4.0, help="larger request bodies get 413")
    parser.add_argument("--drain_timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests")
    parser.add_argument("--max_prompt_tokens", type=int, default=None,
                        help="longest prompt accepted (default: the model's context; the answer gets the rest)")
    parser.add_argument("--header_timeout", type=float, default=10.0,
                        help="seconds a connection has to send a whole request head (a guard against slowloris)")
    parser.add_argument("--max_connections", type=int, default=512,
                        help="open connections at most; beyond, new ones are closed at once")
    add_origin_flags(parser, "clients")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    for field in ("max_batch", "max_tokens", "port", "max_connections", "header_timeout"):
        if getattr(args, field) < 1:
            raise UserError("must be at least 1", field=field)
    if args.max_queue < 0 or args.max_body_mb <= 0 or args.drain_timeout < 0:
        raise UserError("must not be negative", field="max_queue / max_body_mb / drain_timeout")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.api_key:
        print(f"note: a key given as --api_key is visible to every user of this machine in the process list; set "
              f"{API_KEY_ENV} instead", file=sys.stderr)
    import uvicorn

    from .engine import Engine
    from .loading import load_for_serving

    args.model, args.adapter = chosen_model(args)
    loaded = load_for_serving(args.model, args.adapter, dtype=args.dtype, device=args.device,
                              prompt_format=args.prompt_format, served_name=args.served_model_name)
    engine = Engine(loaded, max_batch=args.max_batch, max_queue=args.max_queue)
    app = OriginGuard(create_app(engine, api_key=api_key, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                                 default_max_tokens=args.max_tokens, drain_timeout=args.drain_timeout,
                                 max_prompt_tokens=args.max_prompt_tokens),
                      bound_host=args.host, allowed_hosts=args.allowed_hosts, cors_origins=args.cors_origins)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {args.host} without an API key", file=sys.stderr)
    print(f"serving {loaded.name!r} ({loaded.family}, prompt format {loaded.prompt_format}, "
          f"{str(loaded.core.dtype).replace('torch.', '')} on {loaded.device}) at http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    _DrainingServer = draining_server_class(engine, args.drain_timeout)
    from .connection_guard import guarded_protocol

    # uvicorn cuts what is still open DRAIN_MARGIN s after the engine has ended it with an error event / 503
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=max(1, int(args.drain_timeout + DRAIN_MARGIN)),
                            http=guarded_protocol(args.header_timeout, args.max_connections))
    _DrainingServer(config).run()
    print(f"server stopped ({engine.stats()['steps']} decoding steps)", flush=True)


DRAIN_MARGIN = 5.0


def draining_server_class(engine: "Engine", drain_timeout: float):
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM / Ctrl-C is a planned stop: uvicorn stops accepting, the engine lets the requests in flight
        finish for up to --drain_timeout s and then ends the rest itself (a stream gets an error event, a waiting
        client a 503 in OpenAI's shape, not a cut connection: uvicorn's own cut comes DRAIN_MARGIN s later), the
        process exits 0."""

        draining = False

        def run(self, *args, **kwargs):
            with stop_signals_handled_by(self.handle_exit):
                return super().run(*args, **kwargs)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if not self.draining:
                self.draining = True
                threading.Thread(target=engine.close, args=(drain_timeout,), daemon=True).start()

    return DrainingServer


@contextmanager
def stop_signals_handled_by(handle_exit):
    """SIGINT/SIGTERM go to `handle_exit` (the server's) while inside, also just before uvicorn installs its own
    handlers and just after it restores them. After a graceful stop uvicorn 0.54 raises the stop signal again for the
    handler that was there before it ran, so that the process dies by it (Server.capture_signals): that handler is
    this one, for which the stop is already under way, so the process goes on to exit 0. Main thread only (signals
    are not ours to set elsewhere); the handlers before are restored afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = [signal.SIGINT, signal.SIGTERM]
    before = {sig: signal.signal(sig, handle_exit) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    run_main(main)
