"""The LoRA library: add LoRAs to the LoRA folder from a link, with provenance; list and remove them.

Sources (`parse_source`):

* `hf://owner/repo/path/to/file.safetensors[@revision]` — through `huggingface_hub` (HF_TOKEN, HF_ENDPOINT,
  HF_HUB_OFFLINE apply): the hub's size and LFS SHA-256 are what the file is verified against; the token is
  never sent to the CDN the hub redirects to.
* `civitai:MODEL_VERSION_ID` (or a civitai.com model-version link) — CivitAI's public API: the version's
  metadata (`/api/v1/model-versions/{id}`: file name, size, SHA-256, trained words) and its download
  (`/api/download/models/{id}`); `CIVITAI_TOKEN` is sent when set (some files need an account).
* `https://…` — any direct link; no hash is published, so the SHA-256 is computed and recorded.

Every transfer is resumable (the partial file is kept in `<folder>/.partial/` and continued with an HTTP
Range request, by the same run after a dropped connection or by the next one), limited in size (checked
against the announced length before the transfer and while bytes arrive), and verified before the file
appears under its name: size and hash, then the LoRA itself against Wan2.1-T2V-1.3B (the loader's key and
shape checks, so a file the model cannot use is never kept). Beside each file, `<name>.source.json` keeps
where it came from (the link, the resolved URL, SHA-256, size, date, trigger words from the file's metadata
or CivitAI), which `list` shows.

Names are plain file names (no folders, no `..`, no leading dot, a LoRA suffix); a name already taken by
another file is refused (the same file again is a no-op).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from wanstream.weights.download import DownloadError, IntegrityError, hub_call, hub_endpoint, hub_offline
from wanstream.weights.lora import LoraError, parse_lora

MAX_LORA_BYTES = 2 * 1024**3  # a rank-128 LoRA on every linear of the 1.3B DiT is ~0.6 GB
SIDECAR = ".source.json"
PARTIAL_DIR = ".partial"
ENV_CIVITAI_TOKEN = "CIVITAI_TOKEN"
ENV_CIVITAI_ENDPOINT = "WANSTREAM_CIVITAI_ENDPOINT"  # tests and mirrors; default https://civitai.com
DOWNLOAD_SUFFIX = ".safetensors"  # from the network: safetensors only (a pickle is code, whoever made it)
_CHUNK = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()\[\]-]{0,127}$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_TRIGGER_KEYS = (
    "modelspec.trigger_phrase",
    "trigger_phrase",
    "trigger_words",
    "trigger_word",
    "ss_trigger_words",
)

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


class LoraLibraryError(ValueError):
    """A LoRA that cannot be added or removed; the message says why. Nothing was installed."""


@dataclass(frozen=True)
class LoraSource:
    kind: str  # "hf", "civitai", "https"
    text: str  # as the user gave it
    url: str = ""  # https: the link
    repo_id: str = ""  # hf
    repo_path: str = ""  # hf
    revision: str = "main"  # hf
    version_id: str = ""  # civitai


def parse_source(text: str) -> LoraSource:
    """`hf://owner/repo/file.safetensors[@rev]`, `civitai:ID` (or a civitai.com link), or `https://…`."""
    text = (text or "").strip()
    if not text or len(text) > 2048:
        raise LoraLibraryError("give a LoRA link: hf://owner/repo/file.safetensors, civitai:ID or https://…")
    if text.startswith("hf://"):
        rest, _, revision = text[5:].partition("@")
        parts = [p for p in rest.split("/") if p]
        if len(parts) < 3 or any(p in (".", "..") for p in parts):
            raise LoraLibraryError(f"{text!r}: expected hf://owner/repo/path/to/file.safetensors")
        repo_id, repo_path = "/".join(parts[:2]), "/".join(parts[2:])
        return LoraSource("hf", text, repo_id=repo_id, repo_path=repo_path, revision=revision or "main")
    civitai = re.fullmatch(r"civitai:(\d{1,12})", text)
    if civitai is None:
        civitai = re.search(
            r"civitai\.com/(?:api/download/models/|models/\d+\S*[?&]modelVersionId=)(\d{1,12})", text
        )
    if civitai is not None:
        return LoraSource("civitai", text, version_id=civitai.group(1))
    url = urlparse(text)
    if url.scheme == "https" or (url.scheme == "http" and url.hostname in _LOOPBACK):
        if not url.hostname:
            raise LoraLibraryError(f"{text!r}: not a link")
        return LoraSource("https", text, url=text)
    raise LoraLibraryError(
        f"{text!r}: not a LoRA link; use hf://owner/repo/file.safetensors, civitai:MODEL_VERSION_ID or an "
        "https:// link (plain http only to this machine)"
    )


def check_name(name: str) -> str:
    """A LoRA file name that is safe to create in the folder, else `LoraLibraryError`."""
    if (
        not isinstance(name, str)
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name in (".", "..")
        or not _NAME.match(name)
    ):
        raise LoraLibraryError(
            f"invalid LoRA name {name!r}: a plain file name (letters, digits, spaces, . _ - + ( ) [ ]; not "
            "starting with a dot; no folders)"
        )
    if not name.lower().endswith(DOWNLOAD_SUFFIX):
        raise LoraLibraryError(f"invalid LoRA name {name!r}: it must end in {DOWNLOAD_SUFFIX}")
    if name.lower().endswith(SIDECAR):
        raise LoraLibraryError(f"invalid LoRA name {name!r}")
    return name


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


@dataclass(frozen=True)
class _Remote:
    """A file to fetch: where, with which headers, and what it must be."""

    url: str
    headers: dict[str, str]
    filename: str  # proposed by the source
    size: int | None
    sha256: str | None
    verified_against: str
    trigger_words: tuple[str, ...] = ()
    base_model: str | None = None
    civitai: bool = False  # errors then say how to give a CivitAI token


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
        remote = self._resolve(src)
        name = name or _name_from(remote.filename, src)
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
            trigger, tags, base = _from_metadata(metadata)
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

    # -- resolving a source ---------------------------------------------------------------------------
    def _resolve(self, src: LoraSource) -> _Remote:
        if src.kind == "hf":
            return _resolve_hf(src)
        if src.kind == "civitai":
            return _resolve_civitai(src)
        return _Remote(src.url, {}, _filename_from_url(src.url), None, None, "none")

    # -- the transfer ---------------------------------------------------------------------------------
    def _transfer(
        self, remote: _Remote, name: str, on_progress: Progress | None, cancel: threading.Event
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
        sha256 = _sha256(part)
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
        self, remote: _Remote, part: Path, on_progress: Progress | None, cancel: threading.Event
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
                raise _Incomplete(_http_problem(response, remote))
            elif response.status_code not in (200, 206):
                raise LoraLibraryError(_http_problem(response, remote))
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


# ---------------------------------------------------------------------------------------------------------
# Sources


def _resolve_hf(src: LoraSource) -> _Remote:
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from wanstream.weights.registry import Artifact

    if hub_offline():
        raise LoraLibraryError("HF_HUB_OFFLINE is set: nothing can be downloaded from the hub")
    # The download module's error wording (gated repo, not found, no network) takes an artifact.
    artifact = Artifact(
        key="lora",
        role="lora",
        repo_id=src.repo_id,
        path=src.repo_path,
        approx_bytes=0,
        description="LoRA",
        revision=src.revision,
    )
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint)
    info = hub_call(artifact, lambda: api.model_info(src.repo_id, revision=src.revision, files_metadata=True))
    sibling = next((s for s in info.siblings or [] if s.rfilename == src.repo_path), None)
    if sibling is None:
        raise LoraLibraryError(f"{src.repo_id} has no file {src.repo_path} at {src.revision}")
    size = sibling.lfs.size if sibling.lfs else sibling.size
    sha256 = sibling.lfs.sha256 if sibling.lfs else None
    url = hf_hub_url(src.repo_id, src.repo_path, revision=info.sha, endpoint=endpoint)
    meta = hub_call(artifact, lambda: get_hf_file_metadata(url, endpoint=endpoint))
    headers = build_hf_headers()
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # never send the token to a CDN
    headers = {k: v for k, v in headers.items() if k.lower() in ("authorization", "user-agent")}
    # A small non-LFS file has no published SHA-256 (only a git blob id): its size is checked, its hash recorded.
    verified = "hub" if sha256 else "none"
    return _Remote(meta.location, headers, PurePosixPath(src.repo_path).name, size, sha256, verified)


def _resolve_civitai(src: LoraSource) -> _Remote:
    import httpx

    base = os.environ.get(ENV_CIVITAI_ENDPOINT, "https://civitai.com").rstrip("/")
    token = os.environ.get(ENV_CIVITAI_TOKEN)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    meta_url = f"{base}/api/v1/model-versions/{src.version_id}"
    try:
        response = httpx.get(meta_url, headers=headers, timeout=30.0)
    except httpx.HTTPError as exc:
        raise DownloadError(f"cannot reach CivitAI at {base} ({type(exc).__name__}: {exc})") from exc
    if response.status_code == 404:
        raise LoraLibraryError(f"CivitAI has no model version {src.version_id}")
    if response.status_code != 200:
        raise LoraLibraryError(_http_problem(response, None, civitai=True))
    try:
        version = response.json()
        files = version.get("files") or []
        primary = next((f for f in files if f.get("primary")), files[0] if files else None)
    except (ValueError, AttributeError):
        raise LoraLibraryError(
            f"CivitAI answered something unexpected for version {src.version_id}"
        ) from None
    if not primary:
        raise LoraLibraryError(f"CivitAI model version {src.version_id} has no file")
    sha256 = (primary.get("hashes") or {}).get("SHA256")
    return _Remote(
        url=f"{base}/api/download/models/{src.version_id}",
        headers=headers,
        filename=str(primary.get("name") or f"civitai-{src.version_id}{DOWNLOAD_SUFFIX}"),
        size=None,  # CivitAI's sizeKB is rounded: the SHA-256 decides
        sha256=sha256.lower() if isinstance(sha256, str) else None,
        verified_against="civitai" if sha256 else "none",
        trigger_words=tuple(str(w).strip() for w in version.get("trainedWords") or [] if str(w).strip()),
        base_model=version.get("baseModel"),
        civitai=True,
    )


def _filename_from_url(url: str) -> str:
    return unquote(PurePosixPath(urlparse(url).path).name)


def _name_from(filename: str, src: LoraSource) -> str:
    """The proposed file name, made safe (only its last path part; refused if still unsafe)."""
    candidate = PurePosixPath(filename.replace("\\", "/")).name
    if not candidate.lower().endswith(DOWNLOAD_SUFFIX):
        raise LoraLibraryError(
            f"{src.text}: the file is {candidate!r}, not a {DOWNLOAD_SUFFIX} file (only safetensors LoRAs are "
            "downloaded); if it is one, give it a name ending in .safetensors"
        )
    try:
        return check_name(candidate)
    except LoraLibraryError:
        raise LoraLibraryError(
            f'{src.text}: the file name {candidate!r} is not usable here; give a name (--name / "name")'
        ) from None


def _http_problem(response: Any, remote: _Remote | None, *, civitai: bool = False) -> str:
    status = response.status_code
    civitai = civitai or (remote is not None and remote.civitai)
    where = "CivitAI" if civitai else str(response.url).split("?")[0]
    if status in (401, 403):
        hint = f" set {ENV_CIVITAI_TOKEN} to your CivitAI API key" if civitai else ""
        return (
            f"{where} refused the download (HTTP {status});{hint or ' the link needs an account or a token'}"
        )
    if status == 404:
        return f"{where}: not found (HTTP 404)"
    return f"{where} answered HTTP {status}"


def _from_metadata(metadata: Mapping[str, str]) -> tuple[list[str], list[str], str | None]:
    """(trigger words, most frequent training tags, base model) from a safetensors file's metadata."""
    words: list[str] = []
    lowered = {k.lower(): v for k, v in metadata.items()}
    for key in _TRIGGER_KEYS:
        value = lowered.get(key)
        if not value:
            continue
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        items = parsed if isinstance(parsed, list) else str(parsed).split(",")
        words += [str(w).strip() for w in items if str(w).strip()]
    tags: list[str] = []
    try:
        frequency = json.loads(lowered.get("ss_tag_frequency") or "{}")
        counts: dict[str, int] = {}
        for per_set in frequency.values():
            for tag, n in per_set.items():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
        tags = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8] if t]
    except (ValueError, AttributeError, TypeError):
        tags = []
    base = lowered.get("modelspec.architecture") or lowered.get("ss_base_model_version") or None
    return list(dict.fromkeys(words))[:32], tags, base


def _too_big(size: int, limit: int) -> str:
    return f"the file is {size / 1e6:.0f} MB, more than the {limit / 1e6:.0f} MB a LoRA may have here"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
