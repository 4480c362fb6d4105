"""What is present where: the local models folder, its verification records, and run-time lookup.

Layout (`docs/weights.md` documents it for users):

    <models dir>/                          WANSTREAM_MODELS_DIR, default ~/.cache/wanstream/models
      StreamDiffusionV2/wan_causal_dmd_v2v/model.pt
      Wan2.1-T2V-1.3B/config.json, Wan2.1_VAE.pth, google/umt5-xxl/…
      …                                    <repo name>/<path in the repo>, see registry.py
      .wanstream/records/<same path>.json  what the file was verified against (size, hash, commit)
      .wanstream/partial/<same path>.part  a download in progress; never at the final path
      .wanstream/download.lock             held while `wanstream download` writes

A file appears at its final path only after its size and hash were checked, so a present file is a
complete one. Files put there by hand (or by Scope) count as present but "unverified" until
`wanstream download` has hashed them. Nothing here downloads: missing files raise
`MissingWeightsError` with the exact command to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from wanstream.weights.registry import (
    DEFAULT_PIPELINE,
    Artifact,
    ModelSize,
    Selection,
    TextEncoder,
    get_pipeline,
    human_bytes,
    selection_for,
)

ENV_MODELS_DIR = "WANSTREAM_MODELS_DIR"
ENV_LORA_DIR = "WANSTREAM_LORA_DIR"
STATE_DIR = ".wanstream"
LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

State = Literal["verified", "present", "partial", "missing"]


def default_models_dir() -> Path:
    """The per-user default: $XDG_CACHE_HOME/wanstream/models (~/.cache/…; %LOCALAPPDATA% on Windows)."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "wanstream" / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "wanstream" / "models"


def resolve_models_dir(override: str | Path | None = None) -> Path:
    """`override` (a --models-dir flag), else WANSTREAM_MODELS_DIR, else the per-user default."""
    raw = override or os.environ.get(ENV_MODELS_DIR) or default_models_dir()
    return Path(raw).expanduser().absolute()


def models_dir_flag(models_dir: Path) -> str | None:
    """The `--models-dir` value a suggested command needs (None when the environment already implies it)."""
    return None if models_dir == resolve_models_dir() else str(models_dir)


@dataclass(frozen=True)
class FileRecord:
    """What a local file was verified against; stale as soon as its size or mtime changes."""

    repo_id: str
    repo_path: str
    revision: str  # the commit the file was resolved at
    size: int
    sha256: str | None  # LFS files
    git_oid: str | None  # small (non-LFS) files: the git blob id
    mtime_ns: int


@dataclass(frozen=True)
class ArtifactStatus:
    artifact: Artifact
    state: State
    path: Path  # the file, or the folder of a folder artifact
    files: tuple[Path, ...]  # present files (one, or the folder's members)
    bytes_present: int
    partial_bytes: int = 0

    @property
    def present(self) -> bool:
        return self.state in ("verified", "present")


class Store:
    """The models folder: final paths, records and partial downloads of registry artifacts."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = resolve_models_dir(root)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def record_path(self, relpath: str) -> Path:
        return self.state_dir / "records" / f"{relpath}.json"

    def folder_record_path(self, artifact: Artifact) -> Path:
        return self.state_dir / "records" / artifact.local_relpath() / ".folder.json"

    def partial_path(self, relpath: str) -> Path:
        return self.state_dir / "partial" / f"{relpath}.part"

    def lock_path(self) -> Path:
        return self.state_dir / "download.lock"

    # -- records -------------------------------------------------------------------------------
    def read_record(self, relpath: str) -> FileRecord | None:
        try:
            return FileRecord(**json.loads(self.record_path(relpath).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write_record(self, relpath: str, record: FileRecord) -> None:
        _write_json_atomic(self.record_path(relpath), asdict(record))

    def write_folder_record(self, artifact: Artifact, members: list[str]) -> None:
        _write_json_atomic(self.folder_record_path(artifact), {"files": sorted(members)})

    def read_folder_record(self, artifact: Artifact) -> list[str] | None:
        try:
            files = json.loads(self.folder_record_path(artifact).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return [str(f) for f in files]

    def is_verified(self, relpath: str) -> bool:
        """A record exists and the file is unchanged since (same size and mtime): no need to re-hash."""
        record = self.read_record(relpath)
        try:
            st = self.path(relpath).stat()
        except OSError:
            return False
        return record is not None and st.st_size == record.size and st.st_mtime_ns == record.mtime_ns

    # -- status --------------------------------------------------------------------------------
    def status(self, artifact: Artifact) -> ArtifactStatus:
        if artifact.is_folder:
            return self._folder_status(artifact)
        relpath = artifact.local_relpath()
        path = self.path(relpath)
        if path.is_file():
            state: State = "verified" if self.is_verified(relpath) else "present"
            return ArtifactStatus(artifact, state, path, (path,), path.stat().st_size)
        part = self.partial_path(relpath)
        if part.is_file():
            return ArtifactStatus(artifact, "partial", path, (), 0, part.stat().st_size)
        return ArtifactStatus(artifact, "missing", path, (), 0)

    def _folder_status(self, artifact: Artifact) -> ArtifactStatus:
        folder = self.path(artifact.local_relpath())
        files = tuple(sorted(p for p in folder.rglob("*") if p.is_file())) if folder.is_dir() else ()
        if not files:
            return ArtifactStatus(artifact, "missing", folder, (), 0)
        size = sum(p.stat().st_size for p in files)
        members = self.read_folder_record(artifact)
        relpaths = [p.relative_to(self.root).as_posix() for p in files]
        verified = members is not None and set(members) <= set(relpaths)
        verified = verified and all(self.is_verified(r) for r in members or ())
        return ArtifactStatus(artifact, "verified" if verified else "present", folder, files, size)

    def statuses(self, selection: Selection) -> list[ArtifactStatus]:
        return [self.status(a) for a in selection.artifacts()]


@dataclass(frozen=True)
class PipelineFiles:
    """Local paths of everything a pipeline run needs (what `resolve_pipeline_files` returns)."""

    models_dir: Path
    model_size: ModelSize
    generator: Path
    config: Path
    vae: Path
    text_encoder: Path
    text_encoder_format: TextEncoder
    tokenizer: Path  # a folder (google/umt5-xxl)
    taehv: Path | None = None
    vace: Path | None = None


class MissingWeightsError(FileNotFoundError):
    """Model files are missing; the message lists them and the exact download command."""

    def __init__(self, message: str, missing: list[Artifact], command: str) -> None:
        super().__init__(message)
        self.missing = missing
        self.command = command


def resolve_pipeline_files(
    pipeline: str = DEFAULT_PIPELINE,
    *,
    models_dir: str | Path | None = None,
    model_size: ModelSize = "1.3b",
    text_encoder: TextEncoder | Literal["auto"] = "auto",
    taehv: bool = False,
    vace: bool = False,
) -> PipelineFiles:
    """Local paths of a pipeline's files; raises `MissingWeightsError` (never downloads).

    `text_encoder="auto"` takes the bf16 encoder if present, else the fp8 one.
    """
    if model_size not in ("1.3b", "14b"):
        raise ValueError(f"model_size must be '1.3b' or '14b', got {model_size!r}")
    store = Store(models_dir)
    spec = get_pipeline(pipeline)

    def pick(role: str, variant: str | None = None) -> ArtifactStatus:
        for a in spec.artifacts:
            if a.role == role and (variant is None or a.variant == variant):
                return store.status(a)
        raise KeyError(f"pipeline {pipeline!r} has no {role} {variant or ''}")

    if text_encoder == "auto":
        te = next(
            (s for s in (pick("text_encoder", v) for v in ("bf16", "fp8")) if s.present),
            pick("text_encoder", "bf16"),
        )
    else:
        te = pick("text_encoder", text_encoder)
    needed = {
        "generator": pick("generator", model_size),
        "config": pick("config", model_size),
        "vae": pick("vae"),
        "text_encoder": te,
        "tokenizer": pick("tokenizer"),
    }
    if taehv:
        needed["taehv"] = pick("taehv")
    if vace:
        needed["vace"] = pick("vace")
    missing = [s for s in needed.values() if not s.present]
    if missing:
        raise _missing_error(store, pipeline, [s.artifact for s in needed.values()], missing)
    return PipelineFiles(
        models_dir=store.root,
        model_size=model_size,
        generator=needed["generator"].path,
        config=needed["config"].path,
        vae=needed["vae"].path,
        text_encoder=te.path,
        text_encoder_format=te.artifact.variant,  # type: ignore[arg-type]
        tokenizer=needed["tokenizer"].path,
        taehv=needed["taehv"].path if taehv else None,
        vace=needed["vace"].path if vace else None,
    )


def require_artifacts(
    artifacts: list[Artifact], *, models_dir: str | Path | None = None, pipeline: str = DEFAULT_PIPELINE
) -> list[ArtifactStatus]:
    """The statuses of `artifacts`, all present; else `MissingWeightsError` with the command that fetches
    them. Never downloads."""
    store = Store(models_dir)
    statuses = [store.status(a) for a in artifacts]
    missing = [s for s in statuses if not s.present]
    if missing:
        raise _missing_error(store, pipeline, artifacts, missing)
    return statuses


def resolve_prompt_extender(
    pipeline: str = DEFAULT_PIPELINE, *, models_dir: str | Path | None = None
) -> Path:
    """The local folder of the prompt extender's instruct model (`MissingWeightsError` naming
    `wanstream download --with-prompt-extender` when a file of it is missing)."""
    wanted = [a for a in get_pipeline(pipeline).artifacts if a.role == "prompt_extender"]
    return require_artifacts(wanted, models_dir=models_dir, pipeline=pipeline)[0].path.parent


def download_command(artifacts: list[Artifact], models_dir: Path, pipeline: str = DEFAULT_PIPELINE) -> str:
    """The `wanstream download …` command that fetches `artifacts` into `models_dir`."""
    return selection_for(artifacts, pipeline).command(models_dir_flag(models_dir))


def _missing_error(
    store: Store, pipeline: str, wanted: list[Artifact], missing: list[ArtifactStatus]
) -> MissingWeightsError:
    command = download_command(wanted, store.root, pipeline)
    lines = [f"Missing model files in {store.root}:"]
    for s in missing:
        a = s.artifact
        extra = f", {human_bytes(s.partial_bytes)} downloaded so far" if s.state == "partial" else ""
        lines.append(
            f"  - {a.local_relpath()}  ({a.description}, ~{human_bytes(a.approx_bytes)} "
            f"from {a.repo_id}{extra})"
        )
    lines.append(f"Download them with:\n  {command}")
    return MissingWeightsError("\n".join(lines), [s.artifact for s in missing], command)


def lora_files(lora_dir: str | Path | None = None) -> tuple[Path | None, list[Path]]:
    """LoRA weight files under `lora_dir` (default: WANSTREAM_LORA_DIR; none when unset)."""
    raw = lora_dir or os.environ.get(ENV_LORA_DIR)
    if not raw:
        return None, []
    root = Path(raw).expanduser().absolute()
    if not root.is_dir():
        return root, []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)
    return root, files


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks (LoRA downloads checked against the hub's; session logs'
    model identity)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
