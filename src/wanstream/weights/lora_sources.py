"""Where a LoRA link points: `hf://`, `civitai:` and https links resolved to a file to fetch.

* `hf://owner/repo/path/to/file.safetensors[@revision]` — through `huggingface_hub` (HF_TOKEN, HF_ENDPOINT,
  HF_HUB_OFFLINE apply): the hub's size and LFS SHA-256 are what the file is verified against; the token is
  never sent to the CDN the hub redirects to.
* `civitai:MODEL_VERSION_ID` (or a civitai.com model-version link) — CivitAI's public API: the version's
  record (`/api/v1/model-versions/{id}`: file name, SHA-256, trained words, base model) and its download
  (`/api/download/models/{id}`); `CIVITAI_TOKEN` is sent when set (some files need an account).
* `https://…` — any direct link (plain http only to this machine); no hash is published.

Also the rules for the names files are kept under, and what a safetensors file's metadata says about trigger
words. `lora_library.py` does the transfer, the checks and the bookkeeping.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from wanstream.weights.download import DownloadError, hub_call, hub_endpoint, hub_offline

ENV_CIVITAI_TOKEN = "CIVITAI_TOKEN"
ENV_CIVITAI_ENDPOINT = "WANSTREAM_CIVITAI_ENDPOINT"  # tests and mirrors; default https://civitai.com
DOWNLOAD_SUFFIX = ".safetensors"  # from the network: safetensors only (a pickle is code, whoever made it)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()\[\]-]{0,127}$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_TRIGGER_KEYS = (
    "modelspec.trigger_phrase",
    "trigger_phrase",
    "trigger_words",
    "trigger_word",
    "ss_trigger_words",
)


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
    return name


@dataclass(frozen=True)
class Remote:
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


def resolve(src: LoraSource) -> Remote:
    """Where to fetch a source from, and what the file must be (size, hash) when the source says."""
    if src.kind == "hf":
        return _resolve_hf(src)
    if src.kind == "civitai":
        return _resolve_civitai(src)
    return Remote(src.url, {}, filename_from_url(src.url), None, None, "none")


def _resolve_hf(src: LoraSource) -> Remote:
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
    return Remote(meta.location, headers, PurePosixPath(src.repo_path).name, size, sha256, verified)


def _resolve_civitai(src: LoraSource) -> Remote:
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
        raise LoraLibraryError(http_problem(response, None, civitai=True))
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
    return Remote(
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


def filename_from_url(url: str) -> str:
    return unquote(PurePosixPath(urlparse(url).path).name)


def name_from(filename: str, src: LoraSource) -> str:
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


def http_problem(response: Any, remote: Remote | None, *, civitai: bool = False) -> str:
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


def read_metadata_notes(metadata: Mapping[str, str]) -> tuple[list[str], list[str], str | None]:
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
