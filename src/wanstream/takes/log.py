"""The session log file (`.wslog`): one zip that holds everything a replay needs. Format version 1:

    log.json        the header, the calls and the output digests (below)
    frames/NNNNNN.mkv   the frames of call arguments, RGB uint8: FFV1 (lossless)
    frames/NNNNNN.npy   any other tensor argument (float frames, masks, prompt embeddings)

log.json: {"format": "wanstream-session-log", "version": 1, "created": ISO time, "model": the identity
(`identity.model_identity`), "session": {"settings": the settings at creation, "output": "uint8" |
"float", "grad_mode": the autograd mode it was made in}, "take": {"first_output": the output frame the
take starts at}, "frames_out", "unreplayable", "truncated" (null or why), "ops": [{"index", "target":
"session" | "vace", "name": the method, "args": by parameter name, a tensor as {"$frames": key}, "outputs":
frames returned, "first_output", "time": seconds, "eager", "graphs", "grad_mode": the call's autograd mode}],
"digests": {"algorithm": "sha256", "frames": {output frame index: hex digest of its bytes as sent}}}.
docs/replay.md describes it for people.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import torch

from wanstream.engine.components import Components
from wanstream.engine.journal import FRAMES, FrameStore, JournalOp, SessionJournal, check_grad_mode
from wanstream.takes.frames import blob_name, decode_blob, encode_blob
from wanstream.takes.identity import lora_names, model_identity

LOG_FORMAT = "wanstream-session-log"
LOG_VERSION = 1
SUFFIX = ".wslog"


class LogError(ValueError):
    """A file that is not a session log this version can read; the message says why and what to do."""


@dataclass
class TakeLog:
    header: dict[str, Any]
    ops: list[JournalOp]
    digests: dict[int, str]
    path: Path | None = None
    _read: Callable[[int], torch.Tensor] | None = field(default=None, repr=False)  # key → frames
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)  # the open file (`load_log`)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.header["session"]["settings"])

    @property
    def output(self) -> str:
        return str(self.header["session"]["output"])

    @property
    def grad_mode(self) -> str:
        """The autograd mode the live session was created in ("inference" in logs that do not say)."""
        return _session_grad_mode(self.header)

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.header["model"])

    @property
    def first_output(self) -> int:
        return int(self.header.get("take", {}).get("first_output", 0))

    @property
    def fps(self) -> float:
        """Frames per second the take ran at: its output frames over the time between the first and last call
        that made frames (16, Wan's native rate, when it cannot tell)."""
        timed = [(op.time, op.outputs) for op in self.ops if op.outputs]
        if len(timed) < 2 or timed[-1][0] <= timed[0][0]:
            return 16.0
        frames = sum(n for _, n in timed[1:])
        return min(1000.0, round(frames / (timed[-1][0] - timed[0][0]), 2))

    def frames(self, key: int) -> torch.Tensor:
        if self._read is None:
            raise LogError(f"the log has no frames {key} (it is closed)")
        return self._read(key)

    def close(self) -> None:
        self._read = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> TakeLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_log(
    journal: SessionJournal,
    path: str | os.PathLike[str],
    components: Components,
    *,
    first_output: int = 0,
) -> Path:
    """Write `journal` as a session log file (atomically). `first_output`: the output frame the take
    starts at (a replay runs the calls before it too — the stream's state depends on them — and writes
    from there)."""
    path = Path(path)
    header = log_header(journal, components, first_output=first_output)
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as file:
            write_log(file, header, journal.frames)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def log_header(journal: SessionJournal, components: Components, *, first_output: int = 0) -> dict[str, Any]:
    """log.json for `journal` as it stands now: a snapshot (the stream may go on recording; the log written
    from it ends here). Reads the model files' digests (seconds the first time: call it off an event loop)."""
    return _header(journal, components, first_output)[0]


def write_log(file: IO[bytes], header: dict[str, Any], frames: FrameStore) -> None:
    """Write the session log that `header` (`log_header`) describes into `file`, its frames read from the
    journal's store `frames`: the one writer of the format, for a file (`save_log`) and for a download written
    as it is sent (the server). `file` may be unseekable: zipfile then writes each entry's sizes after its
    data (a data descriptor), and `load_log` reads the result the same."""
    with zipfile.ZipFile(file, "w") as z:
        z.writestr("log.json", json.dumps(header, indent=1), compress_type=zipfile.ZIP_DEFLATED)
        for key in sorted(_frame_keys(header["ops"])):
            if hasattr(frames, "path"):  # on disk already (the server's store): copied, never decoded
                path = frames.path(key)
                z.write(path, f"frames/{path.name}", compress_type=zipfile.ZIP_STORED)
            else:
                tensor = frames.get(key)
                z.writestr(
                    f"frames/{blob_name(key, tensor)}", encode_blob(tensor), compress_type=zipfile.ZIP_STORED
                )


def journal_log(journal: SessionJournal, components: Components, *, first_output: int = 0) -> TakeLog:
    """The log of a session as it stands, without writing a file: what `save_log` would write, its frames read
    from the journal's own store (the server's replay of a take reads them where they already are)."""
    header, ops = _header(journal, components, first_output)
    return TakeLog(header, ops, _digests(header), _read=journal.frames.get)


def _header(
    journal: SessionJournal, components: Components, first_output: int
) -> tuple[dict[str, Any], list[JournalOp]]:
    """log.json for `journal` now, and the calls it lists (a snapshot: the stream may go on recording)."""
    ops = list(journal.ops)
    with journal._lock:
        digests = dict(journal.digests)
    header = {
        "format": LOG_FORMAT,
        "version": LOG_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model_identity(components, lora_names(journal.settings, ops)),
        "session": {"settings": journal.settings, "output": journal.output, "grad_mode": journal.grad_mode},
        "take": {"first_output": first_output},
        "frames_out": journal.frames_out,
        "unreplayable": journal.unreplayable,
        "truncated": journal.truncated,
        "ops": [op.to_json() for op in ops],
        "digests": {"algorithm": "sha256", "frames": {str(k): v for k, v in sorted(digests.items())}},
    }
    return header, ops


def _session_grad_mode(header: dict[str, Any]) -> str:
    """The session's autograd mode in `header` (checked): "inference" in logs written before it was noted."""
    return check_grad_mode(header["session"].get("grad_mode", "inference"))


def _digests(header: dict[str, Any]) -> dict[int, str]:
    return {int(k): str(v) for k, v in header["digests"]["frames"].items()}


def load_log(path: str | os.PathLike[str]) -> TakeLog:
    """Open a session log (close it, or use it as a context manager). LogError when it cannot be read."""
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise LogError(
            f"{path}: not a session log ({exc}); save one from the studio or GET .../log"
        ) from None
    try:
        header = json.loads(z.read("log.json"))
        if not isinstance(header, dict) or header.get("format") != LOG_FORMAT:
            raise LogError(f"{path}: not a session log (log.json has no format '{LOG_FORMAT}')")
        version = header.get("version")
        if version != LOG_VERSION:
            raise LogError(
                f"{path}: session log version {version}; this wanstream reads version {LOG_VERSION} "
                "(use the wanstream version that wrote it)"
            )
        ops = [JournalOp.from_json(row) for row in header["ops"]]
        _session_grad_mode(header)
        digests = _digests(header)
        names = {}
        for name in z.namelist():
            if name.startswith("frames/") and name != "frames/":
                stem = Path(name).stem
                names[int(stem)] = Path(name).name
    except LogError:
        z.close()
        raise
    except (KeyError, ValueError, TypeError) as exc:
        z.close()
        raise LogError(f"{path}: a damaged session log ({type(exc).__name__}: {exc})") from None
    missing = sorted(_frame_keys(header["ops"]) - names.keys())
    if missing:
        z.close()
        raise LogError(f"{path}: a damaged session log (frames {missing[:5]} are missing)")

    def read(key: int) -> torch.Tensor:
        return decode_blob(names[key], z.read(f"frames/{names[key]}"))

    return TakeLog(header, ops, digests, path, read, z)


def _frame_keys(rows: list[dict[str, Any]]) -> set[int]:
    return {key for row in rows for key in _keys(row["args"])}


def _keys(value: Any) -> Iterator[int]:
    if isinstance(value, dict):
        if FRAMES in value:
            yield int(value[FRAMES])
        else:
            for v in value.values():
                yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)
