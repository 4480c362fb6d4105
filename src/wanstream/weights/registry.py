"""The model registry, as data: which files each pipeline needs and where they come from.

Nothing here touches the network or the disk. `download.py` fetches what a selection names,
`store.py` says what is present, and both use the local layout defined by `Artifact.local_path`:

    <models dir>/<local_dir>/<path in the repo>

`local_dir` is the repo name without its owner, the layout Daydream Scope uses, so a Scope models
folder (`~/.daydream-scope/models`) can be used as is through `WANSTREAM_MODELS_DIR`.

Sizes are for display before the hub is asked; the hub's own metadata (size, LFS SHA-256, git blob
id) is what downloads are verified against. `sha256` pins a file: the download refuses a hub file
whose hash differs. Only hashes read off the official repos' file pages are pinned.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

TextEncoder = Literal["bf16", "fp8"]
TEXT_ENCODERS: tuple[TextEncoder, ...] = ("bf16", "fp8")
DEFAULT_TEXT_ENCODER: TextEncoder = "bf16"
ModelSize = Literal["1.3b", "14b"]
MODEL_SIZES: tuple[ModelSize, ...] = ("1.3b", "14b")

GB = 1000**3
MB = 1000**2


@dataclass(frozen=True)
class Artifact:
    """One file of a Hugging Face model repo, or a folder of it (`path` ending in `/*`)."""

    key: str  # stable id, e.g. "vae"
    role: str  # what the runtime uses it for: generator, config, vae, text_encoder, tokenizer, taehv, vace
    repo_id: str
    path: str  # in the repo; "google/umt5-xxl/*" means every file under that folder
    approx_bytes: int  # for display only
    description: str
    variant: str | None = None  # "1.3b" / "14b" for the DiT, "bf16" / "fp8" for the text encoder
    option: str | None = None  # the `wanstream download` flag that selects it; None = always
    sha256: str | None = None  # pinned LFS hash (single files only)
    revision: str = "main"
    local_dir: str = ""  # default: the repo name without its owner

    def __post_init__(self) -> None:
        if not self.local_dir:
            object.__setattr__(self, "local_dir", self.repo_id.split("/", 1)[1])
        if self.is_folder and self.sha256:
            raise ValueError(f"{self.key}: a folder artifact cannot pin a sha256")

    @property
    def is_folder(self) -> bool:
        return self.path.endswith("/*")

    @property
    def folder(self) -> str:
        """The repo folder of a folder artifact ("google/umt5-xxl"); "" for a single file."""
        return self.path[:-2] if self.is_folder else ""

    def matches(self, repo_path: str) -> bool:
        """Whether a file of the repo belongs to this artifact."""
        if self.is_folder:
            return repo_path.startswith(self.folder + "/")
        return repo_path == self.path

    def local_relpath(self, repo_path: str | None = None) -> str:
        """Path under the models dir of `repo_path` (default: the artifact itself, or its folder)."""
        inner = repo_path if repo_path is not None else (self.folder if self.is_folder else self.path)
        return f"{self.local_dir}/{inner}"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    artifacts: tuple[Artifact, ...] = field(default_factory=tuple)

    def artifact(self, key: str) -> Artifact:
        for a in self.artifacts:
            if a.key == key:
                return a
        raise KeyError(f"pipeline {self.name!r} has no artifact {key!r}")


_SDV2 = "jerryfeng/StreamDiffusionV2"
_WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B"
_WAN_14B = "Wan-AI/Wan2.1-T2V-14B"
_KIJAI = "Kijai/WanVideo_comfy"
# Scope mirrors TAEHV here (upstream: github.com/madebyollin/taehv, not on the hub under that name).
_AUTOENCODERS = "lightx2v/Autoencoders"
# The prompt extender (`wanstream extend`, docs/prompts.md): a 1.5B instruct model, ~3.1 GB in bf16, small
# enough to sit next to the 1.3B pipeline on one GPU (or to run on the CPU).
PROMPT_EXTENDER_REPO = "Qwen/Qwen2.5-1.5B-Instruct"
_EXTENDER_FILES = (  # (path in the repo, approximate size): what transformers needs to load it
    ("config.json", 660),
    ("generation_config.json", 242),
    ("model.safetensors", int(3.09 * GB)),
    ("tokenizer.json", int(7.03 * MB)),
    ("tokenizer_config.json", 7_300),
    ("vocab.json", int(2.78 * MB)),
    ("merges.txt", int(1.67 * MB)),
)
PROMPT_EXTENDER_ARTIFACTS = tuple(
    Artifact(
        key=f"prompt_extender:{path}",
        role="prompt_extender",
        option="--with-prompt-extender",
        repo_id=PROMPT_EXTENDER_REPO,
        path=path,
        approx_bytes=size,
        description=f"Qwen2.5-1.5B-Instruct prompt extender ({path})",
    )
    for path, size in _EXTENDER_FILES
)

STREAMDIFFUSIONV2 = Pipeline(
    name="streamdiffusionv2",
    description="StreamDiffusionV2: causal Wan2.1-T2V DiT distilled for streaming video-to-video",
    artifacts=(
        Artifact(
            key="generator",
            role="generator",
            variant="1.3b",
            repo_id=_SDV2,
            path="wan_causal_dmd_v2v/model.pt",
            approx_bytes=int(5.7 * GB),  # size not published; a float32 1.3B state dict is 5.68 GB
            description="StreamDiffusionV2 causal DMD generator, 1.3B",
        ),
        Artifact(
            key="config",
            role="config",
            variant="1.3b",
            repo_id=_WAN_1_3B,
            path="config.json",
            approx_bytes=249,
            description="Wan2.1-T2V-1.3B architecture (config.json)",
        ),
        Artifact(
            key="vae",
            role="vae",
            repo_id=_WAN_1_3B,
            path="Wan2.1_VAE.pth",
            approx_bytes=508 * MB,
            sha256="38071ab59bd94681c686fa51d75a1968f64e470262043be31f7a094e442fd981",
            description="Wan2.1 VAE",
        ),
        Artifact(
            key="tokenizer",
            role="tokenizer",
            repo_id=_WAN_1_3B,
            path="google/umt5-xxl/*",
            approx_bytes=21 * MB,
            description="umT5-XXL tokenizer files",
        ),
        Artifact(
            key="text_encoder_bf16",
            role="text_encoder",
            variant="bf16",
            option="--text-encoder bf16",
            repo_id=_WAN_1_3B,
            path="models_t5_umt5-xxl-enc-bf16.pth",
            approx_bytes=int(11.36 * GB),
            sha256="7cace0da2b446bbbbc57d031ab6cf163a3d59b366da94e5afe36745b746fd81d",
            description="umT5-XXL text encoder, official bf16",
        ),
        Artifact(
            key="text_encoder_fp8",
            role="text_encoder",
            variant="fp8",
            option="--text-encoder fp8",
            repo_id=_KIJAI,
            path="umt5-xxl-enc-fp8_e4m3fn.safetensors",
            approx_bytes=6_731_333_792,
            sha256="3fe5173588270c22505d4f9158bb1644b78331b8614206a97e92760b960c9ffa",
            description="umT5-XXL text encoder, float8_e4m3fn repack (ComfyUI)",
        ),
        Artifact(
            key="taehv",
            role="taehv",
            option="--with-taehv",
            repo_id=_AUTOENCODERS,
            path="taew2_1.pth",
            approx_bytes=int(22.7 * MB),
            description="TAEHV tiny autoencoder for Wan2.1 (fast decode)",
        ),
        Artifact(
            key="generator_14b",
            role="generator",
            variant="14b",
            option="--with-14b",
            repo_id=_SDV2,
            path="wan_causal_dmd_v2v_14b/model.pt",
            approx_bytes=57 * GB,  # size not published; a float32 14B state dict is 57 GB
            description="StreamDiffusionV2 causal DMD generator, 14B",
        ),
        Artifact(
            key="config_14b",
            role="config",
            variant="14b",
            option="--with-14b",
            repo_id=_WAN_14B,
            path="config.json",
            approx_bytes=250,
            description="Wan2.1-T2V-14B architecture (config.json)",
        ),
        Artifact(
            key="vace",
            role="vace",
            option="--with-vace",
            repo_id=_KIJAI,
            path="Wan2_1-VACE_module_1_3B_bf16.safetensors",
            approx_bytes=int(1.5 * GB),
            description="VACE conditioning module for the 1.3B DiT, bf16",
        ),
        *PROMPT_EXTENDER_ARTIFACTS,
    ),
)

PIPELINES: dict[str, Pipeline] = {p.name: p for p in (STREAMDIFFUSIONV2,)}
DEFAULT_PIPELINE = STREAMDIFFUSIONV2.name


def get_pipeline(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        known = ", ".join(sorted(PIPELINES))
        raise ValueError(f"unknown pipeline {name!r} (known: {known})") from None


@dataclass(frozen=True)
class Selection:
    """Which optional parts of a pipeline a user wants; maps 1:1 onto `wanstream download` flags."""

    pipeline: str = DEFAULT_PIPELINE
    text_encoder: TextEncoder = DEFAULT_TEXT_ENCODER
    taehv: bool = False
    with_14b: bool = False
    vace: bool = False
    prompt_extender: bool = False

    def __post_init__(self) -> None:
        get_pipeline(self.pipeline)
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}")

    def artifacts(self) -> list[Artifact]:
        chosen = []
        for a in get_pipeline(self.pipeline).artifacts:
            if a.role == "text_encoder":
                keep = a.variant == self.text_encoder
            elif a.option == "--with-taehv":
                keep = self.taehv
            elif a.option == "--with-14b":
                keep = self.with_14b
            elif a.option == "--with-vace":
                keep = self.vace
            elif a.option == "--with-prompt-extender":
                keep = self.prompt_extender
            else:
                keep = a.option is None
            if keep:
                chosen.append(a)
        return chosen

    def command(self, models_dir: str | None = None) -> str:
        """The exact `wanstream download` command that fetches this selection."""
        parts = ["wanstream", "download"]
        if self.pipeline != DEFAULT_PIPELINE:
            parts += ["--pipeline", self.pipeline]
        if models_dir:
            parts += ["--models-dir", shlex.quote(models_dir)]
        if self.text_encoder != DEFAULT_TEXT_ENCODER:
            parts += ["--text-encoder", self.text_encoder]
        for flag, on in (
            ("--with-taehv", self.taehv),
            ("--with-14b", self.with_14b),
            ("--with-vace", self.vace),
            ("--with-prompt-extender", self.prompt_extender),
        ):
            if on:
                parts.append(flag)
        return " ".join(parts)


def selection_for(artifacts: Iterable[Artifact], pipeline: str = DEFAULT_PIPELINE) -> Selection:
    """The smallest `Selection` that includes every artifact given (for "run this command" hints)."""
    arts = list(artifacts)
    encoders = [a.variant for a in arts if a.role == "text_encoder"]
    return Selection(
        pipeline=pipeline,
        text_encoder=encoders[0] if encoders else DEFAULT_TEXT_ENCODER,  # type: ignore[arg-type]
        taehv=any(a.option == "--with-taehv" for a in arts),
        with_14b=any(a.option == "--with-14b" for a in arts),
        vace=any(a.option == "--with-vace" for a in arts),
        prompt_extender=any(a.option == "--with-prompt-extender" for a in arts),
    )


def find_artifact(path: str) -> tuple[Pipeline, Artifact] | None:
    """The registry entry a local file most likely is: by our layout, else by a unique repo path."""
    norm = path.replace("\\", "/")
    singles = [(p, a) for p in PIPELINES.values() for a in p.artifacts if not a.is_folder]
    for p, a in singles:
        if norm == a.local_relpath() or norm.endswith("/" + a.local_relpath()):
            return p, a
    # A bare "config.json" or "model.pt" is ambiguous; "wan_causal_dmd_v2v/model.pt" is not.
    hits = [(p, a) for p, a in singles if norm == a.path or norm.endswith("/" + a.path)]
    return hits[0] if len(hits) == 1 else None


def human_bytes(n: int | float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the hub displays them)."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
