"""On the GPU: does the optimised path (compile + CUDA graphs) keep a live take bit for bit? (issue 24)

    python3 tools/gpu/replay_check.py live   DIR   # a live take with changes → DIR/take.wslog, replayed here too
    python3 tools/gpu/replay_check.py replay DIR   # in a NEW process (warm compile cache): replay DIR/take.wslog

Full-size random networks (no text encoder: prompts are random embeddings), 480x832, stream batch, Wan VAE,
`Components.optimize()` as `serve` runs them. The take: 2 steps, a prompt transition, a seed change, steps
2 → 3 → 1, a noise change, a reset. Every output frame's sha256 is noted as the server does. Each replay
reports how many frames are identical, the first that differs, the largest per-frame difference, and the
journal's cost on the live chunks (push time with the log vs without). `--reproducible` runs as
`serve --reproducible-takes` does: cuDNN's conv algorithms and Inductor's kernel configurations chosen without
timing them (the same in every process). To find which layer of the optimised path breaks bit
equality, if one does: `--eager` (nothing compiled, no CUDA graphs) and `--no-graphs` (compiled, no CUDA
graphs); `--trace` (every counted call's input and output digested, live and replayed: the first call that
differs; with it, the replay in a new process also compares the Triton kernels both processes ran — source,
deterministic mode, launch configurations — and the generated modules); `--dit-eager` (the DiT's block halves
eager, the rest optimised). One JSON line per mode (also DIR/<mode>.json). Without a GPU: `--cpu-smoke` (tiny networks, eager),
`--cpu-smoke --cpu-compile` (tiny networks compiled as on a GPU; set TORCHINDUCTOR_CACHE_DIR to an empty folder
for a cold cache). `--vae-inline`: the Wan VAE compiled in line, nothing compiling beside the stream.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from wanstream.engine.denoise.local import Denoiser
from wanstream.engine.journal import SessionJournal
from wanstream.engine.prompts import Transition
from wanstream.engine.random_weights import random_components
from wanstream.engine.session import StreamSession
from wanstream.engine.settings import StreamSettings
from wanstream.models import numerics
from wanstream.models.fastpath import FALLBACKS
from wanstream.pipeline import RANDOM_LABEL
from wanstream.takes import load_log, replay, save_log
from wanstream.takes.frames import DiskFrames

H, W = 480, 832


SMOKE = "--cpu-smoke" in sys.argv  # tiny networks on the CPU: checks this script, measures nothing
# With --cpu-smoke: compile the tiny networks as `optimize` does on a GPU (Inductor's C++ code; minutes on 2
# cores): the compiled path's threads — in-line and background compiles beside the stream — without a GPU.
CPU_COMPILE = SMOKE and "--cpu-compile" in sys.argv
if SMOKE:
    H, W = 32, 48
DEVICE = "cpu" if SMOKE else "cuda"
EAGER = "--eager" in sys.argv
# --vae-inline: the Wan VAE compiles in line at its first steady call instead of on its background thread (no
# compile or warm-up runs beside the stream): does what ran beside the live stream make it differ?
VAE_INLINE = "--vae-inline" in sys.argv
# --dit-eager: the DiT's block halves eager (q/k/v still fused), the rest as `optimize` leaves it (the Wan VAE
# and the cache bookkeeping compiled, CUDA graphs): is the compiled DiT what a new process runs otherwise?
DIT_EAGER = "--dit-eager" in sys.argv
NO_GRAPHS = EAGER or "--no-graphs" in sys.argv
if NO_GRAPHS:  # every session this process makes (the live one and the replay's) runs its steps un-graphed
    _use_graphs = Denoiser.use_cuda_graphs
    Denoiser.use_cuda_graphs = lambda self, enabled=True: _use_graphs(self, False)  # type: ignore[method-assign]


# `--trace`: where does a replay first differ from its live take? Every call of the stream's own (counted) work —
# the Wan VAE's stream_encode / stream_decode and each compiled site (DiT halves, cache bookkeeping) — is noted
# with an exact integer digest of every tensor among its arguments (in tuples, lists, dicts and plain objects'
# attributes: a VAE stream state's caches; not modules' weights) and of its result (a DiT first half returns
# q, k, v), live and in the replay; which code ran it ("compiled" if any compiled code did, else "eager"); how
# many dynamo compiles ended while it ran (on any thread) and on which thread it ran; and the process-wide math
# switches in force (cuDNN, TF32, SDPA backends, default dtype, deterministic algorithms — another thread could
# flip them for a moment). The first entry whose digests differ names the stage, and which of its inputs and
# outputs differ. Digests sync the device (timing changes; numerics do not). A traced take is replayed twice in
# its process: if the two replays agree and the live take does not, what ran beside the live stream changed
# it; if they disagree, the path is not repeatable even with nothing compiling beside it.
TRACE = "--trace" in sys.argv


class _Entry(NamedTuple):
    where: str
    inputs: tuple[int, ...]  # a digest per tensor argument, in argument order
    outputs: tuple[int, ...]  # a digest per tensor of the result
    path: str  # "compiled" | "eager"
    math: tuple
    compiles: int  # dynamo compiles that ended during the call, on any thread
    thread: str
    # Per tensor argument: shape, strides, storage offset and the pointer's alignment — equal values in another
    # layout reach other compiled code (dynamo guards on strides; Inductor assumes 16-byte alignment or not).
    layouts: tuple[str, ...] = ()


_trace: list[_Entry] = []
_ran = threading.local()  # .compiled: set by the compiled paths below during a traced call (this thread's)
_compiles_ended = [0]  # dynamo compiles ended so far in this process (a compile-end callback counts them)


def _ran_compiled() -> bool:
    return getattr(_ran, "compiled", False)


def _digest(t: object) -> int:
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return -1
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return -2
    bits = t.detach().contiguous().view(-1)
    if bits.dtype == torch.bool:
        bits = bits.to(torch.uint8)
    size = bits.element_size()
    if size in (2, 4, 8):
        bits = bits.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).to(torch.int64)
    else:
        bits = bits.to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) * 2654435761 + 1
    return int((bits * weights).sum().item())


def _layout(t: torch.Tensor) -> str:
    align = next(a for a in (16, 8, 4, 2, 1) if t.data_ptr() % a == 0) if t.numel() else 0
    return f"{tuple(t.shape)}/{t.stride()}/{t.storage_offset()}/{align}"


def _tensors(obj: object, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor in `obj`: itself, in tuples, lists and dicts, and in plain objects' attributes (a VAE
    stream state's caches), not in modules (their weights do not change during a take)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 3 or isinstance(obj, (torch.nn.Module, str, bytes, int, float, bool)) or obj is None:
        return []
    if isinstance(obj, Mapping):
        items = list(obj.values())
    elif isinstance(obj, Sequence):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _tensors(item, depth + 1)]


_MATH_FIELDS = (
    "cudnn.enabled",
    "cudnn.benchmark",
    "cudnn.deterministic",
    "cudnn.allow_tf32",
    "matmul.allow_tf32",
    "matmul.allow_bf16_reduced_precision_reduction",
    "float32_matmul_precision",
    "sdp.flash",
    "sdp.mem_efficient",
    "sdp.cudnn",
    "sdp.math",
    "default_dtype",
    "deterministic_algorithms",
)


def _math_state() -> tuple:
    """Process-wide switches that change which kernel (and so which rounding) an op gets (`_MATH_FIELDS`)."""
    cuda = torch.backends.cuda
    return (
        torch.backends.cudnn.enabled,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.allow_tf32,
        cuda.matmul.allow_tf32,
        cuda.matmul.allow_bf16_reduced_precision_reduction,
        torch.get_float32_matmul_precision(),
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
        cuda.math_sdp_enabled(),
        str(torch.get_default_dtype()),
        torch.are_deterministic_algorithms_enabled(),
    )


def _traced(name: str | None, fn):
    def wrapper(*args, **kwargs):
        outer, _ran.compiled = _ran_compiled(), False
        compiles_before = _compiles_ended[0]
        # Digested before the call: it may update its arguments in place (a stream state's caches).
        tensors_in = _tensors((args, kwargs)) if numerics.counting() else []
        inputs = tuple(map(_digest, tensors_in))
        layouts = tuple(map(_layout, tensors_in))
        try:
            out = fn(*args, **kwargs)
            if numerics.counting():
                where = name or getattr(args[0], "where", "?")
                path = "compiled" if _ran_compiled() else "eager"
                _trace.append(
                    _Entry(
                        where,
                        inputs,
                        tuple(map(_digest, _tensors(out))),
                        path,
                        _math_state(),
                        _compiles_ended[0] - compiles_before,
                        threading.current_thread().name,
                        layouts,
                    )
                )
            return out
        finally:
            _ran.compiled = outer or _ran_compiled()

    return wrapper


def _marks_compiled(fn):
    def wrapper(*args, **kwargs):
        _ran.compiled = True
        return fn(*args, **kwargs)

    return wrapper


def _marks_compiled_half(run_for):
    def wrapper(self, half, x, warm, eager):
        chosen = run_for(self, half, x, warm, eager)
        if chosen is self.halves[0 if half == "encoder" else 1]:
            _ran.compiled = True
        return chosen

    return wrapper


if TRACE:
    from wanstream.models import fastpath, vae
    from wanstream.models.vae import WanVAE

    WanVAE.stream_encode = _traced("Wan VAE stream_encode", WanVAE.stream_encode)  # type: ignore[method-assign]
    WanVAE.stream_decode = _traced("Wan VAE stream_decode", WanVAE.stream_decode)  # type: ignore[method-assign]
    fastpath.CompiledOrEager.__call__ = _traced(None, fastpath.CompiledOrEager.__call__)  # type: ignore[method-assign]
    fastpath.CompiledOrEager._compiled = _marks_compiled(fastpath.CompiledOrEager._compiled)  # type: ignore[method-assign]
    vae._CompiledHalves.run_for = _marks_compiled_half(vae._CompiledHalves.run_for)  # type: ignore[method-assign]
    try:  # dynamo's compile-end callbacks (torch >= 2.6); without them the count stays 0
        from torch._dynamo.callback import on_compile_end

        @on_compile_end
        def _count_compile(*_args: object) -> None:
            _compiles_ended[0] += 1
    except ImportError:
        pass


def _differs(a: _Entry, b: _Entry) -> bool:
    return (a.where, a.inputs, a.outputs) != (b.where, b.inputs, b.outputs)


def _show(e: _Entry) -> list:
    return [e.where, e.path, len(e.inputs), len(e.outputs), e.compiles, e.thread]


def _first_divergence(live: list[_Entry], replayed: list[_Entry]) -> dict:
    """The first traced call whose digests differ: which of its input and output tensors differ (by position),
    which code ran it and how many compiles ended during it on each side ([site, path, tensors in, tensors
    out, compiles, thread]), the calls before it, and the math switches seen on each side."""
    states = {  # each distinct set of switches seen, by name
        side: [dict(zip(_MATH_FIELDS, state)) for state in dict.fromkeys(entry.math for entry in trace)]
        for side, trace in (("live", live), ("replay", replayed))
    }

    def positions(x: tuple, y: tuple) -> list[int] | str:
        if len(x) != len(y):
            return f"{len(x)} vs {len(y)} tensors"
        return [i for i, (p, q) in enumerate(zip(x, y)) if p != q]

    for i, (a, b) in enumerate(zip(live, replayed)):
        if _differs(a, b):
            return {
                "index": i,
                "of": [len(live), len(replayed)],
                "live": _show(a),
                "replay": _show(b),
                "inputs_differing": positions(a.inputs, b.inputs),
                "input_layouts_differing": [
                    [j, x, y] for j, (x, y) in enumerate(zip(a.layouts, b.layouts)) if x != y
                ][:8],
                "outputs_differing": positions(a.outputs, b.outputs),
                "input_same": a.where == b.where and a.inputs == b.inputs,
                "state_same": a.math == b.math,
                "before": [_show(x) for x in live[max(0, i - 3) : i]],
                "compiles_before_live": sum(x.compiles for x in live[:i]),
                "compiles_before_replay": sum(x.compiles for x in replayed[:i]),
                "paths": _paths(live, replayed),
                "math_states": states,
                "next_differing": [
                    [j, live[j].where, live[j].inputs == replayed[j].inputs, live[j].path, replayed[j].path]
                    for j in range(i + 1, min(len(live), len(replayed)))
                    if _differs(live[j], replayed[j])
                ][:8],
            }
    return {
        "index": None,
        "of": [len(live), len(replayed)],
        "paths": _paths(live, replayed),
        "math_states": states,
    }


def _paths(live: list, replayed: list) -> dict:
    """How many traced calls ran compiled / eager code, live and replayed, and the first places (up to 8) where
    they ran different code."""

    def count(trace: list[_Entry], path: str) -> int:
        return sum(1 for entry in trace if entry.path == path)

    return {
        "live": {p: count(live, p) for p in ("compiled", "eager")},
        "replay": {p: count(replayed, p) for p in ("compiled", "eager")},
        "differ_at": [i for i, (a, b) in enumerate(zip(live, replayed)) if a.path != b.path][:8],
    }


# A generated module's "# AOT ID" line is a per-process counter (the CPU check found two processes' modules
# differing in it alone): compared without it, equal code is equal.
_AOT_ID = re.compile(r"(?m)^# AOT ID:.*\n?")


def _module_code(path: Path) -> str:
    return _AOT_ID.sub("", path.read_text(errors="replace"))


def _kernels(save_to: Path | None = None) -> dict:
    """What Inductor ran in this process (with `--trace`): every Triton kernel object alive, by name and a hash
    of its source — how many objects, whether generated in deterministic mode, how many launch configurations
    one had to choose from, and every configuration they launched with — and a hash of every generated module
    loaded (a module's file is named by a hash of its code). `save_to`: the modules' code is also written
    there, for a replay in a new process to show how its code differs (`_kernels_compared`). Two processes that
    agree here run the same code with the same launch configurations (issue 24)."""
    import gc
    import hashlib

    def sha(text: str | bytes) -> str:
        return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]

    try:
        from torch._inductor.codecache import PyCodeCache
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    modules: dict[str, str] = {}
    loaded = list(getattr(PyCodeCache, "modules", [])) + list(
        getattr(PyCodeCache, "modules_no_attr", {}).values()
    )
    if save_to is not None:
        save_to.mkdir(parents=True, exist_ok=True)
    for module in loaded:
        file = getattr(module, "__file__", None)
        if file and Path(file).exists():
            modules[sha(_module_code(Path(file)))] = Path(file).name  # by its code without the AOT ID
            if save_to is not None:
                (save_to / Path(file).name).write_bytes(Path(file).read_bytes())
    kernels: dict[str, dict] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, CachingAutotuner):
                continue
        except ReferenceError:  # a weak proxy whose object is gone
            continue
        meta = getattr(obj, "inductor_meta", {}) or {}
        src = getattr(getattr(obj, "fn", None), "src", "") or ""
        name = meta.get("kernel_name") or getattr(getattr(obj, "fn", None), "__name__", "?")
        row = kernels.setdefault(
            f"{name}/{sha(src)}",
            {"objects": 0, "unlaunched": 0, "deterministic": [], "configs": 0, "launched": []},
        )
        launched = sorted(str(launcher.config) for launcher in getattr(obj, "launchers", []))
        row["objects"] += 1
        row["unlaunched"] += not launched
        row["deterministic"] = sorted({*row["deterministic"], str(meta.get("deterministic"))})
        row["configs"] = max(
            row["configs"], len(getattr(obj, "compile_results", None) or getattr(obj, "configs", None) or [])
        )
        row["launched"] = sorted({*row["launched"], *launched})
    return {"torch": torch.__version__, "modules": modules, "kernels": kernels}


def _module_diffs(live_dir: Path, here_dir: Path, only_live: set[str], only_here: set[str]) -> list[str]:
    """How the generated modules only one process loaded differ: each of this process's paired with the live
    one that calls the most of the same kernels (names), as a unified diff (at most 3 pairs, 60 lines each)."""
    import difflib

    def kernel_names(path: Path) -> set[str]:
        return set(re.findall(r"\b(triton_\w+|extern_kernels\.\w+)", path.read_text(errors="replace")))

    live_names = {name: kernel_names(live_dir / name) for name in only_live if (live_dir / name).exists()}
    diffs = []
    for name in sorted(only_here)[:20]:
        if not (here_dir / name).exists() or not live_names:
            continue
        mine = kernel_names(here_dir / name)
        best = max(
            live_names, key=lambda other: len(mine & live_names[other]) / (len(mine | live_names[other]) or 1)
        )
        if not mine & live_names[best]:
            continue
        lines = difflib.unified_diff(
            _module_code(live_dir / best).splitlines(),
            _module_code(here_dir / name).splitlines(),
            f"live/{best}",
            f"here/{name}",
            n=1,
            lineterm="",
        )
        diffs.append("\n".join(line[:200] for line in list(lines)[:60]))
        if len(diffs) == 3:
            break
    return diffs


def _kernels_compared(
    live: dict, here: dict, live_dir: Path | None = None, here_dir: Path | None = None
) -> dict:
    """Where this process's kernels (`_kernels`) differ from the live take's process's; with both processes'
    saved modules, how the code of those only one loaded differs."""
    if "error" in live or "error" in here:
        return {"error": live.get("error") or here.get("error")}
    both = live["kernels"].keys() & here["kernels"].keys()
    # modules: {hash of the code without its AOT ID: file name}; the diffs read the files by name
    only_live = {live["modules"][h] for h in live["modules"].keys() - here["modules"].keys()}
    only_here = {here["modules"][h] for h in here["modules"].keys() - live["modules"].keys()}
    return {
        "kernels": [len(live["kernels"]), len(here["kernels"])],
        "kernels_only_live": sorted(live["kernels"].keys() - here["kernels"].keys())[:20],
        "kernels_only_here": sorted(here["kernels"].keys() - live["kernels"].keys())[:20],
        "launched_otherwise": {
            k: [live["kernels"][k]["launched"], here["kernels"][k]["launched"]]
            for k in sorted(both)
            if live["kernels"][k]["launched"] != here["kernels"][k]["launched"]
            and live["kernels"][k]["launched"]
            and here["kernels"][k]["launched"]
        },
        "with_choices": sum(1 for k in here["kernels"].values() if k["configs"] > 1),
        "deterministic": {
            flag: sum(1 for k in here["kernels"].values() if flag in k["deterministic"])
            for flag in ("True", "False", "None")
        },
        "modules": [len(live["modules"]), len(here["modules"])],
        "modules_only_live": len(only_live),
        "modules_only_here": len(only_here),
        "module_diffs": (
            _module_diffs(live_dir, here_dir, only_live, only_here) if live_dir and here_dir else []
        ),
    }


def components(timed: bool):
    c = random_components(
        torch.device(DEVICE), torch.float32 if SMOKE else torch.bfloat16, tiny=SMOKE, text_encoder=None
    )
    c.random_weights = True
    if not SMOKE:  # the tiny networks keep their own label
        c.label = RANDOM_LABEL
    if CPU_COMPILE:  # `optimize` leaves the CPU alone; these are the calls it makes on a GPU
        c.dit.optimize(compile=True)
        c.wan_vae.optimize(channels_last=True, compile=True)
        c.optimized = True
    elif not EAGER:
        c.optimize(reproducible=not timed)
        if DIT_EAGER and "_halves" in vars(c.dit):  # the class's plain halves (`optimize` set compiled ones)
            del c.dit._halves
    if VAE_INLINE and c.wan_vae._compiled is not None:
        c.wan_vae._compiled.background = False
    torch.backends.cudnn.benchmark = timed  # also on the eager path
    return c


def embedding(c, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cfg = c.dit.config
    return (torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen) * 0.5).to(DEVICE, c.dtype)


def frames(first: int, n: int) -> torch.Tensor:
    """A moving, camera-like pattern (deterministic): smooth gradients and a drifting disc, uint8."""
    t = torch.arange(first, first + n, dtype=torch.float32)[:, None, None]
    y = torch.linspace(0, 1, H)[None, :, None]
    x = torch.linspace(0, 1, W)[None, None, :]
    disc = ((x - 0.5 - 0.3 * torch.sin(t / 9)) ** 2 + (y - 0.5) ** 2 < 0.04).float()
    r = 0.5 + 0.5 * torch.sin(6 * x + t / 7)
    g = 0.5 + 0.5 * torch.cos(5 * y - t / 11)
    b = disc
    return (torch.stack([r.expand(n, H, W), g.expand(n, H, W), b.expand(n, H, W)], -1) * 255).to(torch.uint8)


@torch.inference_mode()  # as the server's engine thread runs its sessions (call 34: not so before it)
def live(folder: Path, bench: bool) -> dict:
    c = components(bench)
    settings = StreamSettings(height=H, width=W)
    # As the server keeps it: frames written to disk by writer threads, off the engine thread.
    store = DiskFrames(folder / "store")
    journal = SessionJournal(settings=settings.model_dump(mode="json"), output="uint8", frames=store)
    session = StreamSession(c, settings, log=journal)
    session.set_prompt_embeddings(embedding(c, 1), label="first")
    made: list[np.ndarray] = []
    pushes: list[float] = []
    fed = 0

    def keep(out: torch.Tensor, send: bool = True) -> None:
        images = out.cpu().numpy()
        for image in images:
            if send:
                journal.note_output(len(made), image)
            made.append(image)

    def push(chunks: int) -> None:
        nonlocal fed
        for _ in range(chunks):
            n = session.frames_needed
            batch = frames(fed, n)
            fed += n
            t0 = time.perf_counter()
            out = session.push(batch)
            keep(out)
            pushes.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    push(8)
    session.set_prompt_embeddings(embedding(c, 2), label="second", transition=Transition(steps=3))
    push(5)
    keep(session.update({"seed": 7}))
    push(4)
    keep(session.update({"steps": (800, 600, 400)}))
    push(6)
    keep(session.update({"noise_scale": 0.6}))
    push(3)
    keep(session.update({"steps": (700,)}))
    push(6)
    keep(session.reset(), send=False)
    push(4)
    took = time.perf_counter() - t_start
    path = save_log(journal, folder / "take.wslog", c)
    live_trace = list(_trace)
    np.save(folder / "live_frames.npy", np.stack(made))
    # The same chunks without a journal: what keeping the log costs per chunk (steady state, warm).
    plain = StreamSession(c, StreamSettings(height=H, width=W, steps=(700,)))  # as the take ends
    plain.set_prompt_embeddings(embedding(c, 1))
    plain_times, logged_times = [], []
    for s, times in ((plain, plain_times), (session, logged_times)):
        for i in range(12):
            batch = frames(10_000 + 4 * i, s.frames_needed)
            t0 = time.perf_counter()
            s.push(batch).cpu()
            times.append(time.perf_counter() - t0)
    _trace.clear()
    replayed: dict[int, np.ndarray] = {}
    same = _replay_here(path, c, made, keep=replayed)
    if TRACE:
        same["trace"] = _first_divergence(live_trace, _trace)
        first_trace = list(_trace)
        # For a replay in a new process (`replay DIR --trace`): both traces and the first replay's frames.
        _save_trace(folder / "trace_live.json", live_trace)
        _save_trace(folder / "trace_replay.json", first_trace)
        keys = sorted(replayed)
        np.savez(
            folder / "replay_frames.npz", index=np.array(keys), frames=np.stack([replayed[i] for i in keys])
        )
        _trace.clear()
        # Nothing compiles beside this one (the first replay left every shape compiled): does it equal the first?
        again = _replay_here(path, c, replayed)
        again["trace"] = _first_divergence(first_trace, _trace)
        same["again_vs_first_replay"] = again
        (folder / "kernels_live.json").write_text(json.dumps(_kernels(folder / "modules_live")))
    return {
        "mode": "live",
        "cudnn_benchmark": bench,
        "path": _path(),
        "frames": len(made),
        "digests": len(journal.digests),
        "take_s": round(took, 2),
        "log_mib": round(path.stat().st_size / 2**20, 1),
        "ops": len(journal.ops),
        "push_p50_ms_logged": round(1000 * float(np.median(logged_times[4:])), 2),
        "push_p50_ms_plain": round(1000 * float(np.median(plain_times[4:])), 2),
        # Where the live stream ran eager code for compiled sites: [first output frame, frames, eager calls].
        "eager_ops": [
            [op.first_output, op.outputs, sum(map(len, op.eager.values()))] for op in journal.ops if op.eager
        ],
        "replay_same_process": same,
        "fallbacks": FALLBACKS.snapshot(),
    }


def _replay_here(
    path: Path,
    c,
    live_frames: Sequence[np.ndarray] | Mapping[int, np.ndarray] | np.ndarray,
    keep: dict[int, np.ndarray] | None = None,
) -> dict:
    """Replay the take at `path` here and compare it with `live_frames`; `keep` receives the replayed frames."""
    got: dict[int, np.ndarray] = {} if keep is None else keep
    t0 = time.perf_counter()
    with load_log(path) as log:
        report = replay(log, c, on_frames=lambda i, f: got.update(enumerate(f, i)))
    return {**report.to_json(), "seconds": round(time.perf_counter() - t0, 2), **_compare(got, live_frames)}


def _compare(
    got: Mapping[int, np.ndarray], reference: Sequence[np.ndarray] | Mapping[int, np.ndarray]
) -> dict:
    """The largest per-frame difference of `got` from `reference` (by output index), and which frames differ."""
    diffs = [int(np.abs(got[i].astype(np.int16) - reference[i].astype(np.int16)).max()) for i in sorted(got)]
    differing = [i for i, d in enumerate(diffs) if d]
    return {
        "max_abs_diff": max(diffs) if diffs else None,
        "frames_differing": len(differing),
        "differing_ranges": _ranges(differing),
    }


def _save_trace(path: Path, trace: list[_Entry]) -> None:
    path.write_text(json.dumps([list(entry) for entry in trace]))


def _load_trace(path: Path) -> list[_Entry]:
    entries = []
    for row in json.loads(path.read_text()):  # a trace saved before layouts were noted has 7 fields
        w, i, o, p, m, c, t, *rest = row
        entries.append(_Entry(w, tuple(i), tuple(o), p, tuple(m), c, t, tuple(rest[0]) if rest else ()))
    return entries


def _replay_new_process(folder: Path, bench: bool) -> dict:
    """Replay DIR/take.wslog in this new process; with `--trace`, also against the live take's process's
    first replay (its frames and trace): does a replay repeat across processes?"""
    c = components(bench)
    result = {"mode": "replay_new_process", "cudnn_benchmark": bench, "path": _path()}
    got: dict[int, np.ndarray] = {}
    result.update(_replay_here(folder / "take.wslog", c, np.load(folder / "live_frames.npy"), keep=got))
    if TRACE and (folder / "trace_live.json").exists():
        result["trace"] = _first_divergence(_load_trace(folder / "trace_live.json"), _trace)
        first = np.load(folder / "replay_frames.npz")
        earlier = dict(zip(first["index"].tolist(), first["frames"]))
        result["vs_first_replay"] = {
            **_compare(got, earlier),
            "trace": _first_divergence(_load_trace(folder / "trace_replay.json"), _trace),
        }
        if (folder / "kernels_live.json").exists():
            result["kernels"] = _kernels_compared(
                json.loads((folder / "kernels_live.json").read_text()),
                _kernels(folder / "modules_here"),
                folder / "modules_live",
                folder / "modules_here",
            )
    result["fallbacks"] = FALLBACKS.snapshot()
    return result


def _path() -> str:
    path = "eager" if EAGER else "compiled, no CUDA graphs" if NO_GRAPHS else "compiled + CUDA graphs"
    return f"{path}, DiT halves eager" if DIT_EAGER and not EAGER else path


def _ranges(indices: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def main() -> int:
    mode, folder = sys.argv[1], Path(sys.argv[2])
    bench = "--reproducible" not in sys.argv
    folder.mkdir(parents=True, exist_ok=True)
    if mode == "live":
        result = live(folder, bench)
    else:
        result = _replay_new_process(folder, bench)
    name = (
        f"{mode}{'' if bench else '_reproducible'}{'_eager' if EAGER else '_no_graphs' if NO_GRAPHS else ''}"
        f"{'_dit_eager' if DIT_EAGER else ''}"
    )
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1))
    if "--json" in sys.argv:  # also where the GPU matrix's summary looks for it
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
