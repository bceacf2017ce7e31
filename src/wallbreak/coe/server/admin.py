"""The admin API: add, replace, remove, pin, load and unload experts while the server serves.

Off unless the server has an admin key (`--admin-key`, `--admin-key-file`, WALLBREAK_ADMIN_KEY);
then every /admin/ route, and llama.cpp router mode's /models/load and /models/unload, need
'Authorization: Bearer <admin key>'. The API key is not the admin key.

Imports run as jobs, one at a time, in a child process at the lowest CPU priority
(`wallbreak bundle import`, which also teaches a fitted router the new expert): a job's progress is
its output lines, polled (`GET /admin/jobs/{id}`) or streamed as server-sent events. When the child
has committed the bundle, the server applies the change (coe/live.py) and reads the new expert into
host memory, so its first request does not wait on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from wallbreak.coe.bundle.importers import parse_form
from wallbreak.coe.bundle.manifest import check_expert_name
from wallbreak.coe.live import LiveBundle, UnknownExpert
from wallbreak.coe.server.completions import Completions
from wallbreak.coe.server.errors import ApiError
from wallbreak.coe.server.protocol import KeepAlive, error_body
from wallbreak.errors import BundleError, CapacityError, ConfigError, WallbreakError, without_paths

ADMIN_PREFIXES = ("/admin/", "/models/load", "/models/unload")
MAX_EXAMPLES = 256
JOB_LINES = 200  # the output lines a job keeps


class AdminAuth:
    """Plain ASGI: the admin routes need the admin key; with none configured they are off (404)."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(ADMIN_PREFIXES):
            answer = None
            if self.expected is None:
                answer = _err(
                    404,
                    "the admin API is off: start the server with --admin-key KEY or --admin-key-file FILE "
                    "(or WALLBREAK_ADMIN_KEY)",
                )
            elif not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""), self.expected):
                answer = _err(401, "admin routes need the admin key: 'Authorization: Bearer <admin key>'")
            if answer is not None:
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _err(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, max_length=4096, description="a path on the server: HF folder or .gguf")
    dtype: str | None = Field(default=None, description="auto, float32, bfloat16, float16, int8 or int4")
    description: str = Field(default="", max_length=4096)
    examples: list[str] = Field(default_factory=list, max_length=MAX_EXAMPLES)


class NewExpert(ExpertSpec):
    name: str = Field(min_length=1, max_length=64)


class TierBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: Literal["host", "device"] = "device"


class KeepAliveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_alive: KeepAlive = Field(description="seconds, '5m', -1 (always) or null (the policy's)")


class ModelBody(BaseModel):  # llama.cpp router mode's
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)


@dataclass
class Job:
    id: str
    op: str  # add | replace
    name: str
    spec: ExpertSpec
    state: str = "queued"  # queued | running | done | failed
    lines: list[str] = field(default_factory=list)
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    listeners: list[Any] = field(default_factory=list)  # (loop, asyncio.Queue) pairs

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "op": self.op,
            "name": self.name,
            "state": self.state,
            "progress": self.lines[-5:],
            "error": self.error,
            "result": self.result,
            "created": int(self.created),
            "seconds": None if self.finished is None else round(self.finished - self.created, 2),
        }

    def say(self, event: dict[str, Any]) -> None:
        if event.get("line"):
            self.lines = [*self.lines[-JOB_LINES + 1 :], event["line"]]
        for loop, q in list(self.listeners):
            loop.call_soon_threadsafe(q.put_nowait, event)


class Jobs:
    """Imports, run one at a time by one worker thread."""

    def __init__(self, live: LiveBundle, on_done: Any = None) -> None:
        self.live = live
        self.on_done = on_done  # (op, ok) -> None: metrics
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="wb-admin", daemon=True)
        self._thread.start()

    def pending(self, name: str) -> Job | None:
        return next(
            (j for j in self.jobs.values() if j.name == name and j.state in ("queued", "running")), None
        )

    def submit(self, op: str, name: str, spec: ExpertSpec) -> Job:
        job = Job(f"job-{next(self._ids)}", op, name, spec)
        self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def close(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            job.state = "running"
            job.say({"state": "running"})
            try:
                job.result = self._run(job)
                job.state = "done"
            except (WallbreakError, OSError) as e:
                job.state, job.error = "failed", without_paths(str(e))
            except Exception as e:  # a bug: the job fails, the server goes on
                job.state, job.error = "failed", f"internal error ({type(e).__name__})"
            job.finished = time.time()
            job.say({"state": job.state, "error": job.error, "result": job.result})
            if self.on_done is not None:
                self.on_done(job.op, job.state == "done")

    def _run(self, job: Job) -> dict[str, Any]:
        s = job.spec
        cmd = [sys.executable, "-m", "wallbreak.cli", "bundle", "import", "--name", job.name,
               "--out", str(self.live.root), "--dtype", s.dtype or "auto", f"--description={s.description}",
               *(f"--example={e}" for e in s.examples), "--", s.source]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        with contextlib.suppress(OSError):  # the import yields the CPU to decoding: lowest priority
            os.setpriority(os.PRIO_PROCESS, proc.pid, 19)
        assert proc.stdout is not None
        for line in proc.stdout:
            job.say({"line": without_paths(line.rstrip()[:500])})
        if proc.wait() != 0:
            raise ConfigError(f"the import failed: {job.lines[-1] if job.lines else 'no output'}")
        imported = time.perf_counter() - t0
        changes = self.live.sync()
        if job.name in changes.failed:
            raise BundleError(f"the imported expert cannot be served: {changes.failed[job.name]}")
        self.live.load(job.name, "host")  # its first request does not wait on the disk
        return {
            "expert": job.name,
            "version": self.live.need(job.name).key,
            "import_s": round(imported, 2),
            "ready_s": round(time.perf_counter() - t0, 2),
            "routable": job.name in (getattr(self.live.catalog.router, "labels", None) or []),
        }


def _check_spec(spec: ExpertSpec) -> None:
    """What can be checked before a job starts: the source exists and is a model, the dtype is one."""
    try:
        parse_form(spec.dtype)
    except ConfigError as e:
        raise ApiError(400, str(e), "dtype") from None
    src = Path(spec.source)
    if not src.is_absolute():
        raise ApiError(400, "source: give an absolute path on the server", "source")
    model = (src.is_dir() and (src / "config.json").is_file()) or (src.is_file() and src.suffix == ".gguf")
    if not model:
        raise ApiError(
            400,
            f"source {spec.source!r} is not a model: give a Hugging Face folder (with config.json) or a "
            ".gguf file on the server",
            "source",
        )
    for i, text in enumerate(spec.examples):
        if not text.strip():
            raise ApiError(400, f"examples[{i}] is empty", "examples")


async def _body(request: Request, kind: type[BaseModel]) -> Any:
    """The body checked as the API's bodies are (`Completions.validate`); none reads as {}."""
    return Completions.validate(await request.body() or b"{}", kind)


def _wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "") or request.query_params.get("stream") in (
        "1",
        "true",
    )


def install_admin(app: FastAPI, live: LiveBundle, admin_key: str | None) -> Jobs:
    """The admin API on `app` (a server made by `create_app`), over `live`: routes, jobs, the
    per-expert metrics, and the key check (routes off without a key). The caller closes the jobs."""
    metrics = app.state.metrics
    jobs = Jobs(live, on_done=lambda op, ok: metrics.admin_op(op, "ok" if ok else "error"))
    add_admin_routes(app, live, jobs, metrics.admin_op)
    metrics.watch_experts(live)
    app.add_middleware(AdminAuth, key=admin_key)
    app.state.live = live
    return jobs


def add_admin_routes(app: FastAPI, live: LiveBundle, jobs: Jobs, count: Any) -> None:
    """`count(op, result)`: one admin operation done (metrics). The routes stay out of
    /openapi.json: that is the clients' surface, and these are the operator's (docs/live.md)."""
    r = APIRouter(include_in_schema=False)

    async def call(op: str, fn: Any, *args: Any) -> Any:
        try:
            out = await run_in_threadpool(fn, *args)
        except UnknownExpert as e:
            count(op, "error")
            raise ApiError(404, str(e), "name") from None
        except CapacityError as e:
            count(op, "conflict")
            raise ApiError(409, str(e)) from None
        except WallbreakError as e:
            count(op, "error")
            raise ApiError(400, without_paths(str(e))) from None
        count(op, "ok")
        return out

    _change_routes(r, live, jobs, call, count)
    _residency_routes(r, live, call)
    add_llamacpp_aliases(r, live, call)
    app.include_router(r)


def _change_routes(r: APIRouter, live: LiveBundle, jobs: Jobs, call: Any, count: Any) -> None:
    """What the bundle serves: list, add and replace (import jobs), remove, sync; the jobs."""

    @r.get("/admin/experts")
    async def list_experts() -> dict[str, Any]:
        return {"object": "list", "generation": live.generation, "data": _states(live)}

    @r.post("/admin/experts", status_code=202, response_model=None)
    async def add(request: Request) -> Any:
        body: NewExpert = await _body(request, NewExpert)
        try:
            check_expert_name(body.name)
        except ConfigError as e:
            raise ApiError(400, str(e), "name") from None
        if body.name in live.catalog.names or jobs.pending(body.name):
            count("add", "conflict")
            raise ApiError(
                409, f"expert {body.name!r} exists; PUT /admin/experts/{body.name} replaces it", "name"
            )
        _check_spec(body)
        return _started(request, jobs.submit("add", body.name, body))

    @r.put("/admin/experts/{name}", status_code=202, response_model=None)
    async def replace(name: str, request: Request) -> Any:
        body: ExpertSpec = await _body(request, ExpertSpec)
        if name not in live.catalog.names:
            count("replace", "error")
            raise ApiError(404, f"no expert {name!r} to replace; POST /admin/experts adds one", "name")
        _check_spec(body)
        return _started(request, jobs.submit("replace", name, body))

    @r.delete("/admin/experts/{name}")
    async def remove(name: str) -> dict[str, Any]:
        changes = await call("remove", live.remove, name)
        return {"removed": name, "in_flight_finish_on": live.retiring(), "changes": changes.to_json()}

    @r.post("/admin/sync")
    async def sync() -> dict[str, Any]:
        changes = await call("sync", live.sync)
        return {"generation": live.generation, "changes": changes.to_json()}

    @r.get("/admin/jobs/{job_id}", response_model=None)
    async def job(job_id: str, request: Request) -> Any:
        j = jobs.jobs.get(job_id)
        if j is None:
            raise ApiError(404, f"no job {job_id!r}")
        return _events(j) if _wants_stream(request) else j.public()


def _residency_routes(r: APIRouter, live: LiveBundle, call: Any) -> None:
    """Where an expert's weights are: pin, unpin, load, unload, keep-alive; each answers its state."""

    async def state(op: str, fn: Any, name: str, *args: Any) -> dict[str, Any]:
        await call(op, fn, name, *args)
        return {"name": name, "state": live.describe(name)}

    @r.post("/admin/experts/{name}/pin")
    async def pin(name: str, request: Request) -> dict[str, Any]:
        return await state("pin", live.pin, name, (await _body(request, TierBody)).tier)

    @r.post("/admin/experts/{name}/unpin")
    async def unpin(name: str) -> dict[str, Any]:
        return await state("unpin", live.unpin, name)

    @r.post("/admin/experts/{name}/load")
    async def load(name: str, request: Request) -> dict[str, Any]:
        return await state("load", live.load, name, (await _body(request, TierBody)).tier)

    @r.post("/admin/experts/{name}/unload")
    async def unload(name: str) -> dict[str, Any]:
        return await state("unload", functools.partial(_unload, live), name)

    @r.post("/admin/experts/{name}/keep-alive")
    async def keep_alive(name: str, request: Request) -> dict[str, Any]:
        return await state(
            "keep_alive", live.keep_alive, name, (await _body(request, KeepAliveBody)).keep_alive
        )


def _unload(live: LiveBundle, name: str) -> None:
    """Unload, or a conflict (409): the expert is pinned, or in use."""
    try:
        done = live.unload(name)
    except ConfigError as e:  # pinned
        raise CapacityError(str(e)) from None
    if not done:
        raise CapacityError(f"expert {name!r} is in use; it can be unloaded when its requests finish")


def _states(live: LiveBundle) -> list[dict[str, Any]]:
    out = []
    for n in live.catalog.names:
        try:
            out.append({"id": n, **live.describe(n)})
        except UnknownExpert:
            continue  # removed while we listed
    return out


def _started(request: Request, job: Job) -> Any:
    if _wants_stream(request):
        return _events(job)
    return JSONResponse(
        {"job": job.id, "state": job.state, "status_url": f"/admin/jobs/{job.id}"},
        status_code=202,
        headers={"Location": f"/admin/jobs/{job.id}"},
    )


def _events(job: Job) -> StreamingResponse:
    """A job's progress as server-sent events: its lines so far, then each new one, then the end."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    entry = (loop, q)
    job.listeners.append(entry)

    async def stream() -> AsyncIterator[str]:
        try:
            yield f"data: {json.dumps({'job': job.id, 'state': job.state})}\n\n"
            for line in list(job.lines):
                yield f"data: {json.dumps({'line': line})}\n\n"
            while job.state in ("queued", "running"):
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=15)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                yield f"data: {json.dumps(ev)}\n\n"
            yield f"data: {json.dumps(job.public())}\n\n"
        finally:
            job.listeners.remove(entry)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def add_llamacpp_aliases(r: APIRouter, live: LiveBundle, call: Any) -> None:
    """llama.cpp router mode's model management, so tools written for it work: GET /models (each
    model with status.value loaded|loading|unloaded), POST /models/load and /models/unload
    {"model": NAME} -> {"success": true}. Loading means host memory, as llama.cpp's means resident."""

    @r.get("/models")
    async def models() -> dict[str, Any]:
        data = []
        for st in _states(live):
            value = "loading" if st["loading"] else "unloaded" if st["tier"] == "disk" else "loaded"
            data.append(
                {"id": st["id"], "object": "model", "owned_by": "wallbreak", "status": {"value": value}}
            )
        return {"object": "list", "data": data}

    @r.post("/models/load")
    async def load(request: Request) -> dict[str, Any]:
        body: ModelBody = await _body(request, ModelBody)
        await call("load", live.load, body.model, "host")
        return {"success": True}

    @r.post("/models/unload")
    async def unload(request: Request) -> dict[str, Any]:
        body: ModelBody = await _body(request, ModelBody)
        await call("unload", _unload, live, body.model)
        return {"success": True}
