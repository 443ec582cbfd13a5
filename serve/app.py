"""`genesis serve`: watch a run and try its models in the browser.

    GET  /                  the page (HTML, JS and CSS served from this package: no CDN, works offline)
    GET  /api/status        step, loss, lr, grad norm, tokens/s, MFU, ETA, last checkpoint (the page polls it)
    GET  /api/curves?since= training and per-source validation series after a step (the page appends)
    GET  /api/tree          trunk → milestones → SFT/DPO branches with eval figures, registry versions
    GET  /api/models        the models a visitor may try, by id, with how many requests each has in line
    GET  /api/stats         generations finished, cancelled, failed, refused (429) since the server started
    POST /api/generate      server-sent events: `start`, then `token` pieces as produced, then `done` or `error`

Errors are JSON `{"error": "one line"}` with 400 (bad request), 403 (a `Host` that is not this server's, see
`guard.py`), 404 (unknown model), 415 (a body that is not JSON), 429 (line full), 503 (model failed to load).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from genesis.errors import GenesisError
from serve.guard import HostPolicy, RequestGuard
from serve.models import Busy, ModelLine, ModelLoadFailed, ModelPool, Runtime, ServeLimits
from serve.run_view import RunView, UnknownModel

STATIC = Path(__file__).parent / "static"
MAX_INT64 = 2**63 - 1
MAX_TOP_K = 1 << 20  # above any vocab a Genesis model has (uint16 shards) or an imported one is likely to
log = logging.getLogger("genesis.serve")


class GenerateRequest(BaseModel, extra="forbid"):
    model: str
    prompt: str
    chat: bool = True
    system: str | None = Field(default=None, description="system prompt for chat; default the model's or the principles'")
    # Every number is bounded here, so nothing the sampler or torch cannot take reaches the generation thread
    # (an unbounded seed used to overflow torch's manual_seed mid-stream).
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_INT64,
                                       description="default 128, or the server's limit if lower")
    temperature: float = Field(default=0.8, ge=0.0, le=5.0, allow_inf_nan=False)
    top_k: int | None = Field(default=50, ge=1, le=MAX_TOP_K, description="at least the vocab = no top-k cut")
    top_p: float | None = Field(default=0.95, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_INT64, description="what torch.Generator.manual_seed takes")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(run_dir: Path, tracking_uri: str | None = None, limits: ServeLimits | None = None,
               device: str | None = None, hosts: HostPolicy | None = None) -> FastAPI:
    """`hosts`: the names the server answers to (default: loopback names, any port)."""
    limits = limits or ServeLimits()
    view = RunView(run_dir, tracking_uri)
    pool = ModelPool(limits, device=device, tracking_uri=tracking_uri)
    app = FastAPI(title="Genesis", docs_url=None, redoc_url=None)
    app.add_middleware(RequestGuard, policy=hosts or HostPolicy())

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        return error(400, f"request field {'.'.join(map(str, first['loc']))}: {first['msg']}")

    stats: Counter = Counter()
    app.state.view, app.state.pool, app.state.limits, app.state.stats = view, pool, limits, stats
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    # NOTE: plain `def` endpoints run in the thread pool: they read files, and must not block the event loop
    # that streams tokens to other visitors.
    @app.get("/api/status")
    def status():
        return view.status()

    @app.get("/api/curves")
    def curves(since: int = Query(default=-1, ge=-1, le=MAX_INT64)):
        return view.curves(since)

    @app.get("/api/tree")
    def tree():
        return view.tree()

    @app.get("/api/models")
    def models():
        loaded = set(pool.loaded_ids())
        return {"models": [entry.public() | {"loaded": entry.id in loaded, "in_line": pool.line(entry.id).holders}
                           for entry in view.models()],
                "limits": limits.model_dump()}

    @app.get("/api/stats")
    def serve_stats():
        return dict(stats) | {"loaded_models": pool.loaded_ids()}

    @app.post("/api/generate")
    async def generate(request: Request):
        try:
            body = GenerateRequest.model_validate(await request.json())
        except ValidationError as err:
            first = err.errors()[0]
            return error(400, f"request field {'.'.join(map(str, first['loc']))}: {first['msg']}")
        except ValueError:
            return error(400, "request body: not JSON; send {\"model\": ID, \"prompt\": TEXT, ...}")
        if len(body.prompt) > limits.max_prompt_chars:
            return error(400, f"prompt: {len(body.prompt)} characters is over the limit of {limits.max_prompt_chars}; "
                              f"shorten it")
        if not body.prompt.strip():
            return error(400, "prompt: empty; type something to continue")
        if body.max_new_tokens is None:
            body.max_new_tokens = min(128, limits.max_new_tokens)
        if body.max_new_tokens > limits.max_new_tokens:
            return error(400, f"max_new_tokens: {body.max_new_tokens} is over the limit of {limits.max_new_tokens}")
        try:
            entry = await run_in_threadpool(view.resolve, body.model)
        except UnknownModel as err:
            return error(404, str(err))
        line = pool.line(entry.id)
        stats["requests"] += 1
        if not line.try_enter():
            stats["refused_429"] += 1
            return error(429, f"{entry.id}: {line.capacity - 1} requests already waiting; try again shortly")
        # From here the place in line is released exactly once: by the worker, or below if it never starts.
        try:
            runtime = await run_in_threadpool(pool.get, entry)
            from genesis_model.prompt import prepare_prompt

            prompt = prepare_prompt(runtime.tokenizer, body.prompt, body.chat, runtime.source, system=body.system)
            if len(prompt.ids) >= runtime.context:
                hint = "; shorten the prompt" + (" or the system prompt, or turn chat off" if body.chat else "")
                raise GenesisError(f"prompt: {len(prompt.ids)} tokens does not fit the context of {runtime.context}{hint}")
        except Busy as err:
            line.leave()
            stats["refused_429"] += 1
            return error(429, str(err))
        except ModelLoadFailed as err:
            line.leave()
            stats["load_failed"] += 1
            return error(503, str(err))
        except GenesisError as err:
            line.leave()
            return error(400, str(err))
        except BaseException:
            line.leave()
            raise
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        worker = GenerationWorker(runtime, prompt, body, line, events, asyncio.get_running_loop(), cancel, stats)
        threading.Thread(target=worker.run, name=f"generate {entry.id}", daemon=True).start()
        return StreamingResponse(sse(events, cancel), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return app


async def sse(events: asyncio.Queue, cancel: threading.Event):
    try:
        while True:
            item = await events.get()
            if item is None:
                return
            kind, data = item
            yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
    finally:
        # Runs when the stream ends and when the client goes away (the response task is cancelled).
        cancel.set()


class GenerationWorker:
    """Waits its turn on the model, streams pieces of text into the event queue, stops when cancelled."""

    def __init__(self, runtime: Runtime, prompt, request: GenerateRequest, line: ModelLine,
                 events: asyncio.Queue, loop: asyncio.AbstractEventLoop, cancel: threading.Event, stats: Counter):
        self.runtime, self.prompt, self.request, self.line = runtime, prompt, request, line
        self.events, self.loop, self.cancel, self.stats = events, loop, cancel, stats

    def put(self, kind: str | None, data: dict | None = None) -> None:
        item = None if kind is None else (kind, data)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the server's loop is closed (shutting down); nobody is listening
            self.cancel.set()

    def run(self) -> None:
        from genesis_model.generate import SamplingConfig, stream_text

        queued_at = time.perf_counter()
        try:
            while not self.line.generation_lock.acquire(timeout=0.05):
                if self.cancel.is_set():
                    self.stats["cancelled_waiting"] += 1
                    return
            try:
                started = time.perf_counter()
                self.put("start", {"model": self.runtime.entry.id, "queue_wait_s": round(started - queued_at, 3),
                                   "prompt_tokens": len(self.prompt.ids), "system_prompt": self.prompt.system_prompt})
                sampling = SamplingConfig(max_new_tokens=self.request.max_new_tokens,
                                          temperature=self.request.temperature, top_k=self.request.top_k,
                                          top_p=self.request.top_p, seed=self.request.seed)
                tokenizer = self.runtime.tokenizer
                tokens = self.runtime.generator.stream(self.prompt.ids, sampling, stop_ids=self.prompt.stop_ids)
                counted: list[int] = []

                def counting(stream):
                    for token in stream:
                        counted.append(token)
                        yield token

                first_token_s = None
                stopped = "length"
                decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
                for piece in stream_text(counting(tokens), decode):
                    if self.cancel.is_set():
                        stopped = "cancelled"
                        break
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - queued_at
                    self.put("token", {"text": piece})
                if counted and counted[-1] in self.prompt.stop_ids:
                    stopped = "stop_token"
                seconds = time.perf_counter() - started
                self.stats["cancelled" if stopped == "cancelled" else "answered"] += 1
                self.put("done", {"tokens": len(counted), "seconds": round(seconds, 3), "stopped": stopped,
                                  "tokens_per_s": round(len(counted) / seconds, 2) if seconds > 0 else None,
                                  "first_token_s": round(first_token_s, 3) if first_token_s else None})
            finally:
                self.line.generation_lock.release()
        except GenesisError as err:
            self.stats["failed"] += 1
            self.put("error", {"error": str(err)})
        except Exception as err:  # noqa: BLE001 - report to the page; the server keeps serving
            self.stats["failed"] += 1
            log.exception("generation failed")
            self.put("error", {"error": f"generation failed: {type(err).__name__}: {str(err)[:200]}"})
        finally:
            self.line.leave()
            self.put(None)
