"""The LoRA library: add LoRAs to the LoRA folder from a link, with provenance; list and remove them.

Links are resolved by `lora_sources.py` (hf://, civitai:, https://). Every transfer is resumable (the partial
file is kept in `<folder>/.partial/` and continued with an HTTP Range request, by the same run after a dropped
connection or by the next one, only from the same version of the file), limited in size (checked against the
announced length before the transfer and while bytes arrive), and verified before the file appears under its
name: size and hash, then the LoRA itself against Wan2.1-T2V-1.3B (the loader's key and shape checks, so a
file the model cannot use is never kept). Beside each file, `<name>.source.json` keeps where it came from (the
link, the resolved URL, SHA-256, size, date, trigger words from the file's metadata or CivitAI), which
`entries` shows.

Names are plain file names (no folders, no `..`, no leading dot, `.safetensors`); a name already taken by
another file is refused (the same file again is a no-op).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from wanstream.weights.download import DownloadError, IntegrityError
from wanstream.weights.lora import LoraError, parse_lora
from wanstream.weights.lora_sources import (
    LoraLibraryError,
    LoraSource,
    Remote,
    check_name,
    http_problem,
    name_from,
    parse_source,
    read_metadata_notes,
    resolve,
)
from wanstream.weights.store import sha256_file

__all__ = ["LoraLibrary", "LoraLibraryError", "LoraSource", "Provenance", "check_name", "parse_source"]

MAX_LORA_BYTES = 2 * 1024**3  # a rank-128 LoRA on every linear of the 1.3B DiT is ~0.6 GB
SIDECAR = ".source.json"
PARTIAL_DIR = ".partial"
_CHUNK = 1024 * 1024

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


@dataclass
class Provenance:
    """What `<name>.source.json` records."""

    name: str
    source: str  # the link as given
    url: str  # what was downloaded (no token in it)
    sha256: str
    bytes: int
    added: str  # ISO 8601, UTC
    verified_against: str  # "hub" (the hub's LFS SHA-256), "civitai" (its published SHA-256) or "none"
    trigger_words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)  # the most frequent training tags (kohya metadata)
    base_model: str | None = None  # as the file's metadata or CivitAI states it
    layers: int = 0
    ranks: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def wan_1_3b_targets() -> dict[str, tuple[int, int]]:
    """The linear layers of Wan2.1-T2V-1.3B (name → (out, in)), from the model built on the meta device."""
    from wanstream.models.dit import WanConfig, WanDiT
    from wanstream.models.lora import linear_targets
    from wanstream.weights.loaders import build_on_meta

    return linear_targets(build_on_meta(lambda: WanDiT(WanConfig.t2v_1_3b())))


def read_provenance(path: Path) -> dict[str, Any] | None:
    """What `<file>.source.json` records about a LoRA file (None when it was not added by link)."""
    try:
        data = json.loads(path.with_name(path.name + SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class LoraLibrary:
    """The LoRA folder as a library. `targets`: the model LoRAs must fit (default Wan2.1-T2V-1.3B)."""

    def __init__(
        self,
        root: str | Path,
        *,
        targets: Mapping[str, tuple[int, int]] | None = None,
        max_bytes: int = MAX_LORA_BYTES,
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        self._targets = targets
        self.max_bytes = max_bytes
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()

    @property
    def targets(self) -> Mapping[str, tuple[int, int]]:
        return self._targets if self._targets is not None else wan_1_3b_targets()

    # -- listing and removing -------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every LoRA file in the folder (sub-folders included, hidden ones not): name, bytes, provenance."""
        from wanstream.weights.store import lora_files

        _, files = lora_files(self.root)
        base = self.root.resolve()
        found = []
        for path in files:
            rel = path.relative_to(self.root).as_posix()
            if any(part.startswith(".") for part in PurePosixPath(rel).parts):
                continue
            if not path.resolve().is_relative_to(base):  # links out of the folder are not offered
                continue
            found.append({"name": rel, "bytes": path.stat().st_size, "provenance": self.provenance(path)})
        return found

    def provenance(self, path: Path) -> dict[str, Any] | None:
        return read_provenance(path)

    def remove(self, name: str) -> None:
        """Delete a LoRA (and its provenance) from the folder; the name is confined to the folder."""
        from wanstream.weights.lora import resolve_lora_path

        try:
            path = resolve_lora_path(name, self.root, confine=True)
        except LoraError as exc:
            raise LoraLibraryError(str(exc)) from None
        path.unlink()
        path.with_name(path.name + SIDECAR).unlink(missing_ok=True)

    # -- adding ---------------------------------------------------------------------------------------
    def add(
        self,
        source: str,
        *,
        name: str | None = None,
        on_progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Provenance:
        """Download `source` into the folder, verify it, check it fits the model, record its provenance.

        Returns the provenance (of the file already there, when the same file was added before)."""
        src = parse_source(source)
        if name is not None:
            check_name(name)
        remote = resolve(src)
        name = name or name_from(remote.filename, src)
        final = self.root / name
        with self._claim(name):
            if final.exists():
                existing = self.provenance(final)
                if remote.sha256 and existing and existing.get("sha256") == remote.sha256:
                    return Provenance(**existing)
                origin = f" (from {existing['source']})" if existing and existing.get("source") else ""
                raise LoraLibraryError(
                    f"a LoRA named {name!r} is already in {self.root}{origin}; give another name (--name / "
                    '"name") or remove that one first'
                )
            part, sha256, size = self._transfer(remote, name, on_progress, cancel or threading.Event())
            try:
                weights, metadata = self._check_fits(part, name)
            except LoraLibraryError:
                _unlink_partial(part)
                raise
            trigger, tags, base = read_metadata_notes(metadata)
            record = Provenance(
                name=name,
                source=src.text,
                url=remote.url,
                sha256=sha256,
                bytes=size,
                added=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
                verified_against=remote.verified_against,
                trigger_words=list(dict.fromkeys([*remote.trigger_words, *trigger])),
                tags=tags,
                base_model=remote.base_model or base,
                layers=len(weights.pairs),
                ranks=list(weights.ranks),
            )
            self.root.mkdir(parents=True, exist_ok=True)
            _write_json(final.with_name(name + SIDECAR), record.to_dict())
            os.replace(part, final)
            part.with_name(part.name + ".json").unlink(missing_ok=True)
            return record

    @contextmanager
    def _claim(self, name: str) -> Iterator[None]:
        """One add per name at a time (two would write the same partial file)."""
        with self._busy_lock:
            if name in self._busy:
                raise LoraLibraryError(f"{name!r} is already being added")
            self._busy.add(name)
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy.discard(name)

    # -- the transfer ---------------------------------------------------------------------------------
    def _transfer(
        self, remote: Remote, name: str, on_progress: Progress | None, cancel: threading.Event
    ) -> tuple[Path, str, int]:
        """Fetch into `.partial/<name>.part` (resuming one left by an earlier try); (path, sha256, size)."""
        import httpx

        part = self.root / PARTIAL_DIR / f"{name}.part"
        if remote.size is not None and remote.size > self.max_bytes:
            _unlink_partial(part)
            raise LoraLibraryError(_too_big(remote.size, self.max_bytes))
        meta = part.with_name(part.name + ".json")
        identity = {"url": remote.url, "size": remote.size, "sha256": remote.sha256}
        part.parent.mkdir(parents=True, exist_ok=True)
        kept = _read_json(meta)  # the partial file's identity, plus the validator of its first response
        same = {k: v for k, v in kept.items() if k != "validator"} == identity
        if part.is_file() and (not same or (remote.size is not None and part.stat().st_size > remote.size)):
            part.unlink()
        if not part.is_file() or not same:
            _write_json(meta, identity)
        for attempt in range(3):  # a dropped connection is resumed in the same run
            try:
                self._stream(remote, part, on_progress, cancel)
                break
            except (httpx.TransportError, _Incomplete) as exc:
                if attempt == 2:
                    have = part.stat().st_size if part.is_file() else 0
                    raise DownloadError(
                        f"{name}: the download stopped after {have} bytes ({type(exc).__name__}: {exc}); the "
                        "partial file is kept: add the same link again to resume"
                    ) from exc
            except httpx.HTTPError as exc:
                raise DownloadError(f"{name}: {type(exc).__name__}: {exc}") from exc
        size = part.stat().st_size
        sha256 = sha256_file(part, _CHUNK)
        problem = None
        if remote.size is not None and size != remote.size:
            problem = f"has {size} bytes where {remote.size} were expected"
        elif remote.sha256 is not None and sha256 != remote.sha256.lower():
            problem = f"has SHA-256 {sha256} where {remote.verified_against} publishes {remote.sha256}"
        if problem is not None:
            _unlink_partial(part)
            raise IntegrityError(
                f"{name}: the downloaded file {problem}. It was deleted, nothing was installed."
            )
        return part, sha256, size

    def _stream(
        self, remote: Remote, part: Path, on_progress: Progress | None, cancel: threading.Event
    ) -> None:
        import httpx

        have = part.stat().st_size if part.is_file() else 0
        if remote.size is not None and have == remote.size:
            return  # complete from an earlier run
        meta = part.with_name(part.name + ".json")
        headers = dict(remote.headers)
        if have:
            headers["Range"] = f"bytes={have}-"
            # Only the version the partial file started from (else the server sends it whole: a 200).
            validator = _read_json(meta).get("validator")
            if validator:
                headers["If-Range"] = validator
        timeout = httpx.Timeout(60.0, connect=15.0)
        with (
            httpx.Client(follow_redirects=True, timeout=timeout) as client,
            client.stream("GET", remote.url, headers=headers) as response,
        ):
            if have and response.status_code == 200:  # the server ignored the Range: start over
                have = 0
            elif have and response.status_code == 416 and remote.size is None:
                return  # nothing left to send: the partial file is the whole file
            elif response.status_code >= 500 or response.status_code == 429:  # the server's trouble: retry
                raise _Incomplete(http_problem(response, remote))
            elif response.status_code not in (200, 206):
                raise LoraLibraryError(http_problem(response, remote))
            if not have:  # what this version of the file is called, for a later resume
                validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
                _write_json(meta, {**_read_json(meta), "validator": validator})
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else remote.size
            if total is not None and total > self.max_bytes:
                _unlink_partial(part)
                raise LoraLibraryError(_too_big(total, self.max_bytes))
            done = have
            with part.open("r+b" if have else "wb") as out:
                out.seek(have)
                out.truncate()
                for chunk in response.iter_bytes():  # as it arrives: a cut keeps what came
                    if cancel.is_set():
                        raise LoraLibraryError(
                            "cancelled; the partial file is kept (add the same link to resume)"
                        )
                    done += len(chunk)
                    if done > self.max_bytes:
                        out.close()
                        _unlink_partial(part)
                        raise LoraLibraryError(_too_big(done, self.max_bytes))
                    out.write(chunk)
                    if on_progress is not None:
                        on_progress(done, total)
            if total is not None and done < total:
                raise _Incomplete(f"{done} of {total} bytes")

    # -- the model check ------------------------------------------------------------------------------
    def _check_fits(self, part: Path, name: str) -> tuple[Any, dict[str, str]]:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(part), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            tensors = load_file(str(part), device="cpu")
        except Exception as exc:  # not a safetensors file (an HTML page, a zip, a pickle renamed …)
            raise LoraLibraryError(
                f"{name}: not a readable safetensors file ({type(exc).__name__})"
            ) from None
        try:
            weights = parse_lora(tensors, self.targets, source=name)
        except LoraError as exc:
            raise LoraLibraryError(f"refused, it does not fit Wan2.1-T2V-1.3B: {exc}") from None
        return weights, metadata


class _Incomplete(Exception):
    """The body ended before its announced length."""


def _too_big(size: int, limit: int) -> str:
    return f"the file is {size / 1e6:.0f} MB, more than the {limit / 1e6:.0f} MB a LoRA may have here"


def _unlink_partial(part: Path) -> None:
    part.unlink(missing_ok=True)
    part.with_name(part.name + ".json").unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
