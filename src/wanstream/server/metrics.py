"""`GET /metrics` in the Prometheus text format (0.0.4), and the process resource snapshot.

Per-stream gauges carry a `session` label (a handful of sessions at most); counters are totals over
every session the process has run. The glass-to-glass figure is an estimate: the measured server
latency (input frame received → generated frame handed to the encoder) plus the network round trip
(RTCP) plus one input and one output frame interval for capture/encode and decode/display.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from typing import Any

import torch

from wanstream.models.fastpath import FALLBACKS
from wanstream.server.model import ModelManager
from wanstream.server.sessions import Session, SessionManager, dropped_counts
from wanstream.server.worker import WorkerStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._declared: set[str] = set()

    def add(self, name: str, kind: str, help_text: str, value: float | None, **labels: str) -> None:
        if name not in self._declared:
            self._declared.add(name)
            self.lines.append(f"# HELP {name} {help_text}")
            self.lines.append(f"# TYPE {name} {kind}")
        if value is None:
            return
        label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{label}}} {_number(value)}" if label else f"{name} {_number(value)}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(manager: SessionManager, model: ModelManager) -> str:
    """The Prometheus text exposition of the whole server: model, slots, each stream, frames, process, GPU."""
    m = _Text()
    _model_and_slots(m, manager, model)
    received, made, sent = (
        manager.totals.frames_received,
        manager.totals.frames_made,
        manager.totals.frames_sent,
    )
    dropped = dict(manager.totals.dropped)
    for sid, session in manager.sessions.items():
        worker = session.worker
        if worker is None:
            continue
        s = worker.stats()
        out = session.output
        received += s.frames_received
        made += s.frames_made
        sent += out.sent if out is not None else 0
        for reason, n in dropped_counts(s, out).items():
            dropped[reason] = dropped.get(reason, 0) + n
        _stream(m, sid, session, s)
    _sinks(m, manager)
    _frame_totals(m, received, made, sent, dropped)
    _process(m)
    _gpu(m)
    return m.render()


def _model_and_slots(m: _Text, manager: SessionManager, model: ModelManager) -> None:
    status = model.status()
    m.add("wanstream_model_loaded", "gauge", "1 when the model is loaded.", float(status.state == "loaded"))
    m.add("wanstream_model_load_progress", "gauge", "Model load progress (0-1).", status.progress)
    m.add("wanstream_sessions_active", "gauge", "Streams running now.", len(manager.sessions))
    m.add(
        "wanstream_replays_active",
        "gauge",
        "Takes replaying on the server now (each holds a stream slot).",
        len(manager.held_slots),
    )
    m.add(
        "wanstream_sessions_max",
        "gauge",
        "Concurrent streams allowed (--max-sessions).",
        manager.config.max_sessions,
    )
    m.add(
        "wanstream_sessions_rejected_total", "counter", "Streams refused because all slots were taken.",
        manager.totals.rejected_busy, reason="busy",
    )  # fmt: skip
    for outcome, count in sorted(manager.totals.sessions.items()):
        m.add(
            "wanstream_sessions_ended_total",
            "counter",
            "Streams ended, by how they ended.",
            count,
            outcome=outcome,
        )


def _stream(m: _Text, sid: str, session: Session, s: WorkerStats) -> None:
    """One stream's rates, latencies and queues, labelled by its session id."""
    out = session.output
    m.add("wanstream_input_fps", "gauge", "Input frames received per second.", s.input_fps, session=sid)
    m.add(
        "wanstream_output_fps",
        "gauge",
        "Generated frames per second leaving the engine.",
        s.output_fps,
        session=sid,
    )
    if out is not None:
        m.add(
            "wanstream_sent_fps",
            "gauge",
            "Frames per second sent to the client.",
            out.send_rate.rate(),
            session=sid,
        )
    m.add(
        "wanstream_pipeline_fps",
        "gauge",
        "Engine throughput: frames per second of compute time.",
        s.pipeline_fps,
        session=sid,
    )
    for q, v in (("0.5", s.chunk_latency_p50), ("0.9", s.chunk_latency_p90)):
        m.add(
            "wanstream_chunk_latency_seconds",
            "summary",
            "Engine time per chunk.",
            v,
            session=sid,
            quantile=q,
        )
    server_p50, server_p90 = (out.latency.quantile(0.5), out.latency.quantile(0.9)) if out else (None, None)
    if out is None:
        server_p50, server_p90 = s.engine_latency_p50, s.engine_latency_p90
    for q, v in (("0.5", server_p50), ("0.9", server_p90)):
        m.add(
            "wanstream_server_latency_seconds", "summary",
            "Input frame received -> its generated frame sent (or made, headless).", v, session=sid, quantile=q,
        )  # fmt: skip
    rtt = session.rtt
    frame_time = (1 / s.input_fps if s.input_fps else 0.0) + (1 / s.output_fps if s.output_fps else 0.0)
    for q, v in (("0.5", server_p50), ("0.9", server_p90)):
        estimate = None if v is None else v + (rtt or 0.0) + frame_time
        m.add(
            "wanstream_glass_to_glass_estimate_seconds", "summary",
            "Server latency + network RTT + one input and one output frame interval.", estimate,
            session=sid, quantile=q,
        )  # fmt: skip
    m.add("wanstream_network_rtt_seconds", "gauge", "Round trip to the client (RTCP).", rtt, session=sid)
    m.add(
        "wanstream_input_queue_frames",
        "gauge",
        "Frames waiting for the engine.",
        s.input_queue,
        session=sid,
    )
    m.add(
        "wanstream_output_queue_frames", "gauge", "Generated frames waiting to be sent.",
        out.depth() if out is not None else 0, session=sid,
    )  # fmt: skip
    m.add("wanstream_stream_epoch", "gauge", "Restarts (reset / prompt cut) so far.", s.epoch, session=sid)
    m.add("wanstream_paused", "gauge", "1 while paused.", float(s.paused), session=sid)


def _frame_totals(m: _Text, received: int, made: int, sent: int, dropped: dict[str, int]) -> None:
    m.add("wanstream_frames_received_total", "counter", "Input frames received.", received)
    m.add("wanstream_frames_generated_total", "counter", "Frames generated by the engine.", made)
    m.add("wanstream_frames_sent_total", "counter", "Generated frames sent over WebRTC.", sent)
    for reason in ("sampled", "input_overflow", "discarded", "output_overflow", "stale"):
        m.add(
            "wanstream_frames_dropped_total", "counter",
            "Frames dropped: sampled (model slower than the source), input_overflow, discarded (pause), "
            "output_overflow, stale (flushed by a reset or prompt cut).",
            dropped.get(reason, 0), reason=reason,
        )  # fmt: skip


def _process(m: _Text) -> None:
    res = resources()
    m.add(
        "wanstream_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the server process.",
        res["rss_bytes"],
    )
    m.add(
        "wanstream_process_threads", "gauge", "Threads in the server process.",
        res["threads"] + res["executor_threads"],
    )  # fmt: skip
    m.add("wanstream_process_open_fds", "gauge", "Open file descriptors.", res["open_fds"])
    fallbacks = FALLBACKS.snapshot()["counts"]
    for kind in sorted({"compile", "cuda_graph", *fallbacks}):
        m.add(
            "wanstream_optimisation_fallbacks_total", "counter",
            "Optimisations that failed and were replaced by the slower, correct path (compile, cuda_graph).",
            fallbacks.get(kind, 0), optimisation=kind,
        )  # fmt: skip


def _gpu(m: _Text) -> None:
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        m.add(
            "wanstream_gpu_memory_allocated_bytes",
            "gauge",
            "GPU memory held by tensors.",
            torch.cuda.memory_allocated(),
        )
        m.add(
            "wanstream_gpu_memory_reserved_bytes",
            "gauge",
            "GPU memory reserved by PyTorch.",
            torch.cuda.memory_reserved(),
        )
        m.add("wanstream_gpu_memory_total_bytes", "gauge", "GPU memory in total.", total)
        m.add("wanstream_gpu_memory_free_bytes", "gauge", "GPU memory free.", free)


def _sinks(m: _Text, manager: SessionManager) -> None:
    """Server-side outputs (NDI, MPEG-TS, virtual camera, ...): frames written and dropped, by sink id;
    the counters include sessions that have ended."""
    written, dropped = dict(manager.totals.sink_written), dict(manager.totals.sink_dropped)
    for sid, session in manager.sessions.items():
        for sink in list(session.sinks.values()):
            written[sink.id] = written.get(sink.id, 0) + sink.written
            dropped[sink.id] = dropped.get(sink.id, 0) + sink.dropped
            m.add(
                "wanstream_sink_queue_frames", "gauge", "Frames waiting in a sink's own queue.",
                sink.depth(), session=sid, sink=sink.id,
            )  # fmt: skip
            m.add(
                "wanstream_sink_up", "gauge", "1 while a sink is running (0: starting, stopped or failed).",
                float(sink.state == "running"), session=sid, sink=sink.id,
            )  # fmt: skip
    for sink_id in sorted(written):
        m.add(
            "wanstream_sink_frames_total",
            "counter",
            "Frames a sink has written.",
            written[sink_id],
            sink=sink_id,
        )
    for sink_id in sorted(dropped):
        m.add(
            "wanstream_sink_dropped_frames_total", "counter",
            "Frames a sink dropped because it was slower than the stream (only its own frames).",
            dropped[sink_id], sink=sink_id,
        )  # fmt: skip


def resources() -> dict[str, Any]:
    """What a leak would show: threads, asyncio tasks, memory, file handles, GPU memory. Read after a full
    garbage collection: an ended session's Python objects (WebRTC, frames) sit in reference cycles until the
    cyclic collector's rare full pass, which swung the resident memory between readings by up to 80 MiB
    (measured: 80 demo sessions on loopback, 391-471 MiB without the collection, 383-405 MiB with it) — not
    a leak, but it looked like one to the leak tests. A session's device memory is freed at its close, not here."""
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
    except OSError:
        rss = None
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = None
    names = sorted(t.name for t in threading.enumerate())
    pool = [n for n in names if n.startswith("asyncio_")]  # the loop's default executor: bounded, reused
    return {
        "threads": len(names) - len(pool),
        "executor_threads": len(pool),
        "executor_limit": min(32, (os.cpu_count() or 1) + 4),  # ThreadPoolExecutor's documented default
        "wanstream_threads": [n for n in names if n.startswith("wanstream-")],
        "tasks": tasks,
        "rss_bytes": rss,
        "open_fds": fds,
        "gpu_allocated_bytes": torch.cuda.memory_allocated() if torch.cuda.is_available() else None,
    }


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
