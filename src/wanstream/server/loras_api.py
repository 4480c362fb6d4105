"""The LoRA library over REST: add a LoRA from a link (a background download with progress), remove one.

    POST   /api/v1/loras               {"source": "hf://…" | "civitai:ID" | "https://…", "name"?: "x.safetensors"}
                                       → 202 the job (poll it); 422 bad link or name; 409 no LoRA folder
    GET    /api/v1/loras/jobs          every recent job
    GET    /api/v1/loras/jobs/{id}     {id, source, state: running|done|failed|cancelled, bytes, total, error, lora}
    DELETE /api/v1/loras/jobs/{id}     cancel a running job (its partial file is kept for a later try)
    DELETE /api/v1/loras/{name}        remove a LoRA and its provenance from the folder

`GET /api/v1/loras` (in api.py) lists the folder with each file's provenance. The download and the model
check run in a worker thread; the job record is the only state shared with the event loop.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from wanstream.server.request_body import read_json

router = APIRouter(prefix="/api/v1/loras", tags=["media"])

MAX_BODY_BYTES = 8 * 1024
MAX_RUNNING = 2  # downloads at once
MAX_KEPT = 32  # finished jobs remembered


class AddLora(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        description="hf://owner/repo/file.safetensors, civitai:ID or https://…",
    )
    name: str | None = Field(None, max_length=128, description="The file name to keep it under.")


class _Job:
    def __init__(self, job_id: str, source: str, name: str | None) -> None:
        self.id = job_id
        self.source = source
        self.name = name
        self.state = "running"
        self.bytes = 0
        self.total: int | None = None
        self.error: str | None = None
        self.lora: dict[str, Any] | None = None
        self.cancel = threading.Event()
        self.started = time.time()

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "name": self.lora["name"] if self.lora else self.name,
            "state": self.state,
            "bytes": self.bytes,
            "total": self.total,
            "error": self.error,
            "lora": self.lora,
        }


class LoraJobs:
    """The server's LoRA downloads (one per app)."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # held only to read or update the dict, never during work

    def views(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.view() for j in self.jobs.values()]

    def running(self) -> int:
        with self._lock:
            return sum(j.state == "running" for j in self.jobs.values())

    def start(self, library: Any, body: AddLora) -> _Job:
        job = _Job(f"lora-{next(self._ids)}", body.source, body.name)
        with self._lock:
            finished = [j for j in self.jobs.values() if j.state != "running"]
            for old in finished[: max(0, len(self.jobs) + 1 - MAX_KEPT)]:
                del self.jobs[old.id]
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(library, job), name=job.id, daemon=True).start()
        return job

    def _run(self, library: Any, job: _Job) -> None:
        from wanstream.weights.download import DownloadError
        from wanstream.weights.lora_library import LoraLibraryError

        def progress(done: int, total: int | None) -> None:
            job.bytes, job.total = done, total

        try:
            record = library.add(job.source, name=job.name, on_progress=progress, cancel=job.cancel)
        except (LoraLibraryError, DownloadError) as exc:
            job.error = str(exc)
            job.state = "cancelled" if job.cancel.is_set() else "failed"
        except Exception as exc:  # never lose a job's outcome to an unexpected error
            job.error = f"{type(exc).__name__}: {exc}"
            job.state = "failed"
        else:
            job.lora = record.to_dict()
            job.bytes = job.total = record.bytes
            job.state = "done"


def _library(request: Request) -> Any:
    from wanstream.weights.lora_library import LoraLibrary

    root = request.app.state.config.lora_dir
    if root is None:
        raise HTTPException(409, "no LoRA folder is configured on this server (start it with --lora-dir DIR)")
    return LoraLibrary(root)


def _jobs(request: Request) -> LoraJobs:
    return request.app.state.lora_jobs


@router.post("", status_code=202)
async def add_lora(request: Request) -> dict[str, Any]:
    """Start adding a LoRA from a link; poll `GET /api/v1/loras/jobs/{id}` for progress and the result."""
    from wanstream.weights.lora_library import LoraLibraryError, check_name, parse_source

    body = await read_json(request, AddLora, MAX_BODY_BYTES)
    library = _library(request)
    try:
        parse_source(body.source)
        if body.name is not None:
            check_name(body.name)
    except LoraLibraryError as exc:
        raise HTTPException(422, str(exc)) from None
    jobs = _jobs(request)
    if jobs.running() >= MAX_RUNNING:
        raise HTTPException(429, f"{MAX_RUNNING} LoRA downloads are running; try again when one is done")
    return jobs.start(library, body).view()


@router.get("/jobs")
async def list_jobs(request: Request) -> list[dict[str, Any]]:
    return _jobs(request).views()


@router.get("/jobs/{job_id}")
async def job_status(request: Request, job_id: str) -> dict[str, Any]:
    job = _jobs(request).jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no LoRA job {job_id!r}")
    return job.view()


@router.delete("/jobs/{job_id}", status_code=204)
async def cancel_job(request: Request, job_id: str) -> Response:
    job = _jobs(request).jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no LoRA job {job_id!r}")
    job.cancel.set()
    return Response(status_code=204)


@router.delete("/{name:path}", status_code=204)
async def remove_lora(request: Request, name: str) -> Response:
    """Delete a LoRA (and its provenance) from the folder. Streams using it keep the weights they loaded."""
    from wanstream.weights.lora_library import LoraLibraryError

    library = _library(request)
    try:
        library.remove(name)
    except LoraLibraryError as exc:
        raise HTTPException(404 if "no LoRA" in str(exc) else 422, str(exc)) from None
    return Response(status_code=204)
