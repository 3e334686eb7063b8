"""The serving engine: one model, one worker thread, many concurrent requests sharing forward passes.

Continuous batching: waiting requests join the running batch at the next decoding step (those arriving together
prefilled together, their cache padded in: serving/kv_batch.py); a request leaves as soon as it ends (stop id, stop
string, max_tokens, cancel).
Every request gets its own events: text deltas that never split a character, then one `Finished`.

Plain Python API (the HTTP server, the web demo and the recipes' CLIs all use it):

    engine = Engine(load_for_serving("tiny:glm-4-9b-chat"))
    for event in engine.generate(messages=[{"role": "user", "content": "你好"}], params=SamplingParams()):
        print(event.text if isinstance(event, Delta) else event.finish_reason)
    engine.close()

`engine.submit(prompt_ids, params, on_event=callback)` calls `callback(event)` from the worker thread instead
(asyncio: loop.call_soon_threadsafe), and returns the Request (`request.cancel()` frees its slot at the next step).
"""
import contextlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .kv_batch import KVBatch, prefill_groups
from .prompts import build_prompt_ids
from .sampling import SamplingParams, sample_next
from .textstream import TextStream

log = logging.getLogger("serving")


class EngineBusy(Exception):
    """The waiting queue is full; retry later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class Delta:
    text: str
    raw_text: str = ""           # the whole answer so far, decoded before post-processing


@dataclass
class Finished:
    finish_reason: str           # stop | length | cancelled | error
    text: str                    # the whole answer (post-processed, cut at a stop string)
    raw_text: str                # decoded before post-processing (GLM-4 tool calls are parsed from it)
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)   # generated ids (the stop id included, as generate)


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    on_event: object
    output_ids: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    next_token: int | None = None
    done: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, loaded, *, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.loaded = loaded
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: list[Request] = []
        self._active: list[Request] = []
        self._joining: list[Request] = []   # taken from the queue, being prefilled
        self._batch = KVBatch(loaded)
        self._cond = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self.steps = 0                     # decoding steps run (batch sizes are in step_rows)
        self.step_rows = 0
        self.prefills = 0                  # prefill forwards run (the prompts they carried are in prefill_rows)
        self.prefill_rows = 0
        self._thread = threading.Thread(target=self._run, name="serving-engine", daemon=True)
        self._thread.start()

    # ---- client side ----------------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None,
                   forced_tool: str | None = None) -> list[int]:
        return build_prompt_ids(self.loaded.prompt_format, self.loaded.tokenizer, messages, tools, forced_tool)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event) -> Request:
        if not prompt_ids:
            raise ValueError("empty prompt")
        room = self.loaded.context_length - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the model's context is "
                             f"{self.loaded.context_length}")
        params = params.capped(room)
        request = Request(next(self._ids), list(prompt_ids), params,
                          TextStream(self.loaded.tokenizer, self.loaded.prompt_format, params.stop), on_event,
                          generator=params.make_generator())
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - self._running()):
                raise EngineBusy(f"all {self.max_batch} slots are busy and {len(self._waiting)} requests wait "
                                 f"(queue limit {self.max_queue})")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def generate(self, messages: list[dict] | None = None, params: SamplingParams | None = None, *,
                 prompt_ids: list[int] | None = None, tools: list[dict] | None = None):
        """Yield Delta events, then one Finished (a plain generator; closing it cancels the request)."""
        events: queue.Queue = queue.Queue()
        ids = prompt_ids if prompt_ids is not None else self.prompt_ids(messages, tools)
        request = self.submit(ids, params or SamplingParams(), events.put)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            request.cancel()

    def _running(self) -> int:
        return len(self._active) + len(self._joining)

    def stats(self) -> dict:
        with self._cond:
            return {"active": self._running(), "waiting": len(self._waiting), "closed": self._closed,
                    "steps": self.steps, "step_rows": self.step_rows, "prefills": self.prefills,
                    "prefill_rows": self.prefill_rows}

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> bool:
        """Take no new requests, let the running ones finish for up to `timeout` s, cancel the rest, stop.
        True when everything finished in time."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._waiting and not self._running():
                    break
            time.sleep(0.02)
        else:
            with self._cond:
                for request in self._waiting + self._joining + self._active:
                    request.cancel()
        with self._cond:
            clean = not self._waiting and not self._running()
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        return clean

    # ---- worker side ----------------------------------------------------------------------------------------
    _stopping = False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._active:
                    return
                room = self.max_batch - len(self._active)
                joining, self._waiting = self._waiting[:room], self._waiting[room:]
                self._joining = list(joining)
            try:
                self._join(joining)
                self._drop_finished()
                if self._active:
                    self._step()
                    self._drop_finished()
            except Exception as exc:  # one bad step must not take the server down
                log.exception("generation failed")
                for request in joining + self._active:
                    self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
                with self._cond:
                    self._joining = []
                self._drop_finished()
                self._batch = KVBatch(self.loaded)

    def _join(self, joining: list[Request]) -> None:
        """Prefill the joining requests (together where the model allows), add them to the batch, send first tokens."""
        live = []
        for request in joining:
            if request.cancelled.is_set():
                self._finish(request, "cancelled")
                with self._cond:
                    self._joining.remove(request)
            else:
                live.append(request)
        if self._batch.prefills_together and len(live) > 1:
            groups = [[live[i] for i in group] for group in prefill_groups([len(r.prompt_ids) for r in live])]
        else:
            groups = [[request] for request in live]
        for group in groups:
            if len(group) == 1:
                logits, layers, state = self._batch.prefill(group[0].prompt_ids)
                logits, states = logits[None], [state]
            else:
                logits, layers, states = self._batch.prefill_together([r.prompt_ids for r in group])
            self.prefills += 1
            self.prefill_rows += len(group)
            with self._cond:
                self._active.extend(group)
                for request in group:
                    self._joining.remove(request)
            self._batch.add(layers, states)
            for row, request in enumerate(group):
                self._accept(request, logits[row])

    def _step(self) -> None:
        logits = self._batch.step([r.next_token for r in self._active])
        self.steps += 1
        self.step_rows += len(self._active)
        for row, request in enumerate(self._active):
            self._accept(request, logits[row])

    def _accept(self, request: Request, logits: torch.Tensor) -> None:
        """Sample the next token of `request` and tell its client. What fails here is this request's own (its
        settings, its client's callback): it ends this request only, the batch goes on."""
        try:
            self._next_token(request, logits)
        except Exception as exc:
            log.exception("request failed")
            with contextlib.suppress(Exception):  # a broken callback cannot be told; the request is done either way
                self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
            request.done = True

    def _next_token(self, request: Request, logits: torch.Tensor) -> None:
        token = sample_next(logits, request.params, request.prompt_ids + request.output_ids, request.generator)
        request.output_ids.append(token)
        if token in self.loaded.stop_ids:
            self._finish(request, "stop")
            return
        delta = request.stream.push(token)
        if delta:
            request.on_event(Delta(delta, request.stream.raw))
        if request.stream.stopped:
            self._finish(request, "stop")
        elif len(request.output_ids) >= request.params.max_tokens:
            self._finish(request, "length")
        else:
            request.next_token = token

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.done:
            return
        request.done = True
        rest = request.stream.finish() if reason in ("stop", "length") else ""
        if rest:
            request.on_event(Delta(rest, request.stream.raw))
        request.on_event(Finished(reason, request.stream.text, request.stream.raw, len(request.prompt_ids),
                                  len(request.output_ids), error, list(request.output_ids)))

    def _drop_finished(self) -> None:
        for request in self._active:
            if request.cancelled.is_set():
                self._finish(request, "cancelled")
        keep = [i for i, r in enumerate(self._active) if not r.done]
        with self._cond:
            self._active = [self._active[i] for i in keep]
        self._batch.keep(keep)
