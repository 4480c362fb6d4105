"""`wanstream download`: fetch a pipeline's files from the Hugging Face Hub, verified and atomic.

Through `huggingface_hub` (so HF_TOKEN / `hf auth login`, HF_ENDPOINT and HF_HUB_OFFLINE apply):
one `model_info` call per repo gives the commit, file sizes and hashes (LFS SHA-256, or the git
blob id of small files); every file is then resolved at that commit and streamed by
`huggingface_hub.file_download.http_get` into `<models dir>/.wanstream/partial/…`.

* Resumable: a dropped connection is resumed with an HTTP Range request in the same run, and the
  partial file survives an interrupted run (Ctrl-C, crash) so the next run continues it.
* Verified: size and hash are checked (hashed while streaming) against the hub and the registry pin.
* Atomic: only a verified file is renamed to its final path; a bad one is deleted.
* Idempotent: when every file is present and verified, nothing is asked of the network.

Only this module downloads; everything else reports missing files with the command to run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from wanstream.weights.registry import Artifact, Selection, human_bytes
from wanstream.weights.store import FileRecord, Store, models_dir_flag

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

_HASH_CHUNK = 8 * 1024 * 1024
_DISK_MARGIN = 64 * 1024 * 1024


class DownloadError(RuntimeError):
    """A download that could not be completed; the message says what to do."""


class IntegrityError(DownloadError):
    """A downloaded (or pinned) file does not match the expected size or hash."""


class OfflineError(DownloadError):
    """Files are missing while HF_HUB_OFFLINE forbids downloading them."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a fixed commit, as the hub describes it."""

    artifact: Artifact
    repo_path: str
    revision: str  # commit sha
    size: int
    sha256: str | None  # LFS files
    git_oid: str | None  # small files

    @property
    def relpath(self) -> str:
        return self.artifact.local_relpath(self.repo_path)


@dataclass
class DownloadReport:
    models_dir: Path
    downloaded: list[str] = field(default_factory=list)  # fetched in this run
    adopted: list[str] = field(default_factory=list)  # were present, hashed and recorded
    present: list[str] = field(default_factory=list)  # already verified, untouched
    unverified: list[str] = field(default_factory=list)  # present, not checkable (offline)
    bytes_downloaded: int = 0
    planned: list[RemoteFile] = field(default_factory=list)  # what a dry run would fetch


def hub_endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) read now."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def download(
    selection: Selection | None = None,
    *,
    models_dir: str | Path | None = None,
    console: Console | None = None,
    dry_run: bool = False,
    verify: bool = False,
) -> DownloadReport:
    """Make every file of `selection` present and verified under `models_dir`.

    `verify=True` re-hashes present files and compares them with the hub even when their records
    say they are fine (repairs corrupted or replaced files). `dry_run=True` lists what would be
    downloaded and stops.
    """
    from rich.console import Console

    selection = selection or Selection()
    console = console or Console()
    store = Store(models_dir)
    command = selection.command(models_dir_flag(store.root))
    report = DownloadReport(store.root)
    statuses = store.statuses(selection)

    if not verify and all(s.state == "verified" for s in statuses):
        report.present = [p.relative_to(store.root).as_posix() for s in statuses for p in s.files]
        total = sum(s.bytes_present for s in statuses)
        console.print(
            f"Everything is present in {store.root} ({len(report.present)} files, "
            f"{human_bytes(total)}); nothing to download."
        )
        return report

    if hub_offline():
        missing = [s for s in statuses if not s.present]
        if missing:
            names = "\n".join(f"  - {s.artifact.local_relpath()} ({s.artifact.repo_id})" for s in missing)
            raise OfflineError(
                f"HF_HUB_OFFLINE is set, so nothing can be downloaded, but these files are missing "
                f"in {store.root}:\n{names}\nUnset HF_HUB_OFFLINE and run:\n  {command}"
            )
        if verify:
            raise OfflineError(
                f"HF_HUB_OFFLINE is set: files cannot be verified against the hub. Unset "
                f"HF_HUB_OFFLINE and run:\n  {command} --verify"
            )
        report.unverified = [s.artifact.local_relpath() for s in statuses if s.state == "present"]
        console.print(
            f"Offline (HF_HUB_OFFLINE): every file is present in {store.root}"
            + (f"; {len(report.unverified)} not verified against the hub yet." if report.unverified else ".")
        )
        return report

    with _exclusive(store):
        remote = list_remote_files(selection.artifacts())
        todo = _plan(store, remote, report, console, verify=verify)
        if not todo:
            _record_folders(store, remote)
            console.print(f"Everything is present in {store.root}; nothing to download.")
            return report
        report.planned = todo
        _print_plan(console, store, todo)
        if dry_run:
            return report
        _check_disk_space(store, todo)
        progress = _progress(console)
        with progress:
            for rf in todo:
                report.bytes_downloaded += _fetch(store, rf, progress, command)
                report.downloaded.append(rf.relpath)
                console.print(f"[green]✓[/green] {rf.relpath}  {human_bytes(rf.size)}  verified")
        _record_folders(store, remote)
    console.print(
        f"Downloaded {len(report.downloaded)} files ({human_bytes(report.bytes_downloaded)}) into {store.root}."
    )
    return report


# ------------------------------------------------------------------------------------------------
# Hub metadata
# ------------------------------------------------------------------------------------------------
def list_remote_files(artifacts: list[Artifact]) -> list[RemoteFile]:
    """Resolve artifacts to files at the repos' current commits, with sizes and hashes."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_endpoint())
    infos: dict[tuple[str, str], Any] = {}
    files: list[RemoteFile] = []
    for a in artifacts:
        key = (a.repo_id, a.revision)
        if key not in infos:
            infos[key] = hub_call(
                a, lambda a=a: api.model_info(a.repo_id, revision=a.revision, files_metadata=True)
            )
        info = infos[key]
        siblings = [s for s in (info.siblings or []) if a.matches(s.rfilename)]
        if not siblings:
            raise DownloadError(
                f"{a.repo_id} has no {a.path} at revision {a.revision} ({info.sha}): the registry "
                f"entry {a.key!r} is out of date. Please report it; the file page was {a.url}"
            )
        for s in sorted(siblings, key=lambda s: s.rfilename):
            sha256 = s.lfs.sha256 if s.lfs else None
            size = s.lfs.size if s.lfs else s.size
            if size is None:
                raise DownloadError(f"{a.repo_id}/{s.rfilename}: the hub did not report a file size")
            if a.sha256 and sha256 != a.sha256:
                raise IntegrityError(
                    f"{a.repo_id}/{s.rfilename}: the hub's file has SHA-256 {sha256}, but wanstream pins "
                    f"{a.sha256}. The upstream file changed; it was not downloaded. Please report this."
                )
            files.append(RemoteFile(a, s.rfilename, info.sha, size, sha256, None if s.lfs else s.blob_id))
    return files


def hub_call(artifact: Artifact, call: Any) -> Any:
    """Run a hub request, turning its errors into `DownloadError`s that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = artifact.repo_id
    endpoint = hub_endpoint()
    auth = (
        f"If the repo is gated or private, accept its terms at {artifact.url} and set HF_TOKEN "
        "(or run `hf auth login`)."
    )
    try:
        return call()
    except GatedRepoError as exc:
        raise DownloadError(
            f"{repo}: access denied (HTTP {_status(exc)}), the repo is gated. {auth}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise DownloadError(
            f"{repo}: repository not found or not accessible (HTTP {_status(exc)}) at {endpoint}. {auth}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{repo}: revision {artifact.revision!r} not found at {endpoint}") from exc
    except HfHubHTTPError as exc:
        status = _status(exc)
        hint = f" {auth}" if status in (401, 403) else ""
        raise DownloadError(f"{repo}: the hub answered HTTP {status} ({_first_line(exc)}).{hint}") from exc
    except (OSError, ValueError) as exc:
        raise DownloadError(f"{repo}: {_first_line(exc)}") from exc
    except Exception as exc:  # connection errors (the HTTP client's own exception types)
        raise DownloadError(
            f"cannot reach the hub at {endpoint} ({type(exc).__name__}: {_first_line(exc)}). Check the "
            "network and HF_ENDPOINT; with the files already present, HF_HUB_OFFLINE=1 skips the hub."
        ) from exc


def _status(exc: Exception) -> int | str:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", "?")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------
# Planning and verification
# ------------------------------------------------------------------------------------------------
def _plan(
    store: Store, remote: list[RemoteFile], report: DownloadReport, console: Console, *, verify: bool
) -> list[RemoteFile]:
    todo = []
    for rf in remote:
        path = store.path(rf.relpath)
        if path.is_file():
            record = store.read_record(rf.relpath)
            if not verify and store.is_verified(rf.relpath) and _same_content(record, rf):
                report.present.append(rf.relpath)
                continue
            size = path.stat().st_size
            if size == rf.size:
                digest = _Digest(rf)
                with console.status(f"verifying {rf.relpath} ({human_bytes(size)})"):
                    digest.update_from(path)
                problem = digest.problem(rf, size)
                if problem is None:
                    _write_record(store, rf, path)
                    report.adopted.append(rf.relpath)
                    continue
                console.print(f"[yellow]{rf.relpath}: present but {problem}; it will be replaced[/yellow]")
            else:
                console.print(
                    f"[yellow]{rf.relpath}: present but {size} bytes where the hub has {rf.size}; "
                    "it will be replaced[/yellow]"
                )
        todo.append(rf)
    return todo


def _same_content(record: FileRecord | None, rf: RemoteFile) -> bool:
    if record is None or record.size != rf.size:
        return False
    if rf.sha256 is not None:
        return record.sha256 == rf.sha256
    return rf.git_oid is None or record.git_oid == rf.git_oid


class _Digest:
    """The hashes the hub publishes for a file, computed as bytes stream past."""

    def __init__(self, rf: RemoteFile) -> None:
        self.sha256 = hashlib.sha256()
        # A git blob id is sha1("blob <size>\0" + content); the hub reports it for non-LFS files.
        self.git = hashlib.sha1(f"blob {rf.size}\0".encode()) if rf.git_oid else None

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)

    def update_from(self, path: Path, limit: int | None = None) -> None:
        remaining = path.stat().st_size if limit is None else limit
        with path.open("rb") as f:
            while remaining > 0:
                chunk = f.read(min(_HASH_CHUNK, remaining))
                if not chunk:
                    break
                self.update(chunk)
                remaining -= len(chunk)

    def problem(self, rf: RemoteFile, size: int) -> str | None:
        """None when the content matches `rf`, else what is wrong."""
        if size != rf.size:
            return f"has {size} bytes where {rf.size} were expected"
        got = self.sha256.hexdigest()
        if rf.sha256 is not None and got != rf.sha256:
            return f"has SHA-256 {got} where the hub says {rf.sha256}"
        pin = rf.artifact.sha256
        if pin is not None and got != pin:
            return f"has SHA-256 {got} where wanstream pins {pin}"
        if self.git is not None and self.git.hexdigest() != rf.git_oid:
            return f"has git blob id {self.git.hexdigest()} where the hub says {rf.git_oid}"
        return None


class _HashingWriter:
    """The file object `http_get` writes to: hashes on the way and notices rewinds."""

    def __init__(self, raw: Any, digest: _Digest) -> None:
        self.raw = raw
        self.digest = digest
        self.rewound = False  # the stream restarted mid-file: hash the file afterwards instead

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.rewound = True
        return self.raw.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        self.rewound = True
        return self.raw.truncate(size)

    def flush(self) -> None:
        self.raw.flush()


def _write_record(store: Store, rf: RemoteFile, path: Path) -> None:
    store.write_record(
        rf.relpath,
        FileRecord(
            repo_id=rf.artifact.repo_id,
            repo_path=rf.repo_path,
            revision=rf.revision,
            size=rf.size,
            sha256=rf.sha256 or (rf.artifact.sha256 if rf.git_oid is None else None),
            git_oid=rf.git_oid,
            mtime_ns=path.stat().st_mtime_ns,
        ),
    )


def _record_folders(store: Store, remote: list[RemoteFile]) -> None:
    folders: dict[str, tuple[Artifact, list[str]]] = {}
    for rf in remote:
        if rf.artifact.is_folder:
            folders.setdefault(rf.artifact.key, (rf.artifact, []))[1].append(rf.relpath)
    for artifact, members in folders.values():
        if all(store.is_verified(m) for m in members):
            store.write_folder_record(artifact, members)


# ------------------------------------------------------------------------------------------------
# Transfer
# ------------------------------------------------------------------------------------------------
def _fetch(store: Store, rf: RemoteFile, progress: Progress, command: str) -> int:
    """Download one file to its partial path, verify it, move it into place. Returns bytes fetched."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = store.partial_path(rf.relpath)
    part_meta = part.with_name(part.name + ".json")
    identity = {"repo_id": rf.artifact.repo_id, "repo_path": rf.repo_path, "size": rf.size}
    identity |= {"sha256": rf.sha256, "git_oid": rf.git_oid}
    resume = 0
    if part.is_file():
        try:
            same = json.loads(part_meta.read_text()) == identity
        except (OSError, ValueError):
            same = False
        resume = part.stat().st_size if same and part.stat().st_size <= rf.size else 0
        if resume == 0:
            part.unlink()
    part.parent.mkdir(parents=True, exist_ok=True)
    part_meta.write_text(json.dumps(identity))

    digest = _Digest(rf)
    if resume:
        digest.update_from(part, resume)
    endpoint = hub_endpoint()
    url = hf_hub_url(rf.artifact.repo_id, rf.repo_path, revision=rf.revision, endpoint=endpoint)
    meta = hub_call(rf.artifact, lambda: get_hf_file_metadata(url, endpoint=endpoint))
    if meta.size is not None and meta.size != rf.size:
        raise DownloadError(
            f"{rf.relpath}: the hub lists {rf.size} bytes but serves {meta.size}; try again later"
        )
    headers = build_hf_headers()
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # never send the token to a CDN

    task = progress.add_task(rf.relpath, total=rf.size, completed=resume)
    try:
        with part.open("ab") as raw:
            writer = _HashingWriter(raw, digest)
            try:
                http_get(
                    meta.location,
                    writer,  # type: ignore[arg-type]
                    resume_size=resume,
                    headers=headers,
                    expected_size=rf.size,
                    displayed_filename=rf.relpath,
                    **_progress_kwargs(http_get, progress, task),
                )
            except Exception as exc:
                raw.flush()
                done = raw.tell()
                raise DownloadError(
                    f"{rf.relpath}: download stopped after {human_bytes(done)} of {human_bytes(rf.size)} "
                    f"({type(exc).__name__}: {_first_line(exc)}). The partial file is kept; run\n"
                    f"  {command}\nagain to resume."
                ) from exc
            raw.flush()
            os.fsync(raw.fileno())
    finally:
        progress.update(task, visible=False)

    size = part.stat().st_size
    if writer.rewound:  # the server restarted the body: hash what is on disk
        digest = _Digest(rf)
        digest.update_from(part)
    problem = digest.problem(rf, size)
    if problem is not None:
        part.unlink(missing_ok=True)
        part_meta.unlink(missing_ok=True)
        raise IntegrityError(
            f"{rf.relpath}: the downloaded file {problem}. It was deleted, nothing was installed. "
            f"Run the command again; if this repeats, check HF_ENDPOINT or any proxy in between."
        )
    final = store.path(rf.relpath)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)
    part_meta.unlink(missing_ok=True)
    _prune_empty_dirs(part.parent, stop=store.state_dir)
    _write_record(store, rf, final)
    return size - resume


def _prune_empty_dirs(folder: Path, *, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty
            return
        folder = folder.parent


def _progress_kwargs(http_get: Any, progress: Progress, task: TaskID) -> dict[str, Any]:
    """How this huggingface_hub's `http_get` takes a progress bar (`tqdm_class` is the newer way)."""
    if "tqdm_class" in inspect.signature(http_get).parameters:
        return {"tqdm_class": partial(_TaskBar, progress, task)}
    return {"_tqdm_bar": _TaskBar(progress, task)}


class _TaskBar:
    """The slice of tqdm's interface `http_get` drives, mapped onto a rich progress task."""

    def __init__(self, progress: Progress, task: TaskID, **_: Any) -> None:
        self.progress = progress
        self.task = task

    def update(self, n: int | float = 1) -> None:
        self.progress.advance(self.task, n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _TaskBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(console: Console) -> Progress:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _print_plan(console: Console, store: Store, todo: list[RemoteFile]) -> None:
    from rich.table import Table

    table = Table(title=f"To download into {store.root}", title_justify="left")
    table.add_column("file")
    table.add_column("from")
    table.add_column("size", justify="right")
    total = 0
    for rf in todo:
        part = store.partial_path(rf.relpath)
        have = part.stat().st_size if part.is_file() else 0
        note = f" ({human_bytes(have)} already)" if have else ""
        table.add_row(rf.relpath, rf.artifact.repo_id, human_bytes(rf.size) + note)
        total += rf.size - have
    console.print(table)
    console.print(f"{len(todo)} files, {human_bytes(total)} to fetch.")


def _check_disk_space(store: Store, todo: list[RemoteFile]) -> None:
    need = 0
    for rf in todo:
        part = store.partial_path(rf.relpath)
        need += rf.size - (part.stat().st_size if part.is_file() else 0)
    probe = store.root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + _DISK_MARGIN > free:
        raise DownloadError(
            f"not enough disk space in {store.root}: {human_bytes(need)} to download, "
            f"{human_bytes(free)} free. Free some space or choose another --models-dir."
        )


@contextmanager
def _exclusive(store: Store) -> Iterator[None]:
    """One `wanstream download` per models dir at a time (two would write the same partial files)."""
    try:
        store.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only place, a file in the way, a parent that cannot hold folders
        raise DownloadError(
            f"cannot write to the models folder {store.root} ({exc.strerror or exc}); "
            "choose another --models-dir (or WANSTREAM_MODELS_DIR)"
        ) from None
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; partial files are still never installed unverified
        yield
        return
    with store.lock_path().open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(
                f"another `wanstream download` is writing to {store.root}; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
