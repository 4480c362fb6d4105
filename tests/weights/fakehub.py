"""A local stand-in for the Hugging Face Hub, close enough that `huggingface_hub` runs unchanged.

An HTTP/1.1 server on 127.0.0.1 (in a thread) answers what our downloader and `huggingface_hub`
ask for:

* `GET /api/models/<repo>[/revision/<rev>]?blobs=true` — model info: commit `sha` and `siblings`
  with `size`, `blobId` and, for LFS files, `lfs.{sha256,size,pointerSize}`.
* `HEAD|GET /<repo>/resolve/<rev>/<path>` — small files answer 200 with `ETag` (git blob id);
  LFS files answer 302 to `/cdn/<sha256>` with `X-Linked-Etag` / `X-Linked-Size`; both carry
  `X-Repo-Commit`. Errors carry the hub's `X-Error-Code` (RepoNotFound, EntryNotFound, GatedRepo,
  RevisionNotFound) so `huggingface_hub` raises its real exception types.
* `HEAD|GET /cdn/<sha256>` — the blob, with `Accept-Ranges`, `Content-Length`, `Range` → 206.

Faults to script: cut a body once mid-file (`cut_once`), then refuse further GETs (`fail_after_cut`),
serve corrupted bytes under the right hash (`corrupt`), ignore Range headers (`ignore_range`), gate a repo behind a token (`gated`), forget
a repo. Every request is logged in `requests`.

`populate_streamdiffusionv2(hub, golden_dir)` fills the hub with tiny but real, loadable files in
the official layouts of every registry artifact (built from the golden cases' tiny weights).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

LFS_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".model")

# The architectures of the tiny files `streamdiffusionv2_files` serves (to load them end to end):
# the DiTs' own config.json files are served too; the others need these constructor arguments.
TINY_CONFIGS = {
    "vae": {"dim": 4, "num_res_blocks": 1},  # WanVAEConfig; real: dim 96, 2 residual blocks
    "taehv": {"encoder_width": 16, "decoder_widths": (64, 32, 16, 16)},  # TAEHVConfig; real: 64, 256…
    "umt5": "inferred from the checkpoint (vocab 512, dim 48, 3 layers)",
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n"
        ).encode()

    @property
    def blob_id(self) -> str:
        return git_blob_id(self.pointer if self.lfs else self.content)


@dataclass
class FakeRepo:
    files: dict[str, FakeFile] = field(default_factory=dict)
    commit: str = ""
    gated: bool = False

    def __post_init__(self) -> None:
        self.bump()

    def bump(self) -> None:
        """A new commit id derived from the content (changes when a file changes)."""
        h = hashlib.sha1()
        for path in sorted(self.files):
            h.update(path.encode() + self.files[path].sha256.encode())
        h.update(str(len(self.files)).encode())
        self.commit = h.hexdigest()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


class FakeHub:
    """Start with `with FakeHub() as hub:`; point HF_ENDPOINT at `hub.url`."""

    GOOD_TOKEN = "hf_fake_good_token"

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self.cut_once: set[str] = set()  # repo paths ("owner/name/path") whose next body is cut
        self.fail_after_cut = False  # once a body was cut, GETs of that blob answer 500
        self.corrupt: set[str] = set()  # repo paths served with one flipped byte
        self.ignore_range = False  # answer Range requests with the whole file (200), like some proxies
        self._cut_done: set[str] = set()  # sha256 of blobs already cut
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------------------------
    def add_file(self, repo_id: str, path: str, content: bytes, *, lfs: bool | None = None) -> FakeFile:
        repo = self.repos.setdefault(repo_id, FakeRepo())
        is_lfs = lfs if lfs is not None else path.endswith(LFS_SUFFIXES) or len(content) > 10_000_000
        repo.files[path] = FakeFile(content, is_lfs)
        repo.bump()
        return repo.files[path]

    def file(self, repo_id: str, path: str) -> FakeFile:
        return self.repos[repo_id].files[path]

    def blob_gets(self, repo_id: str, path: str) -> list[Request]:
        """GET requests that fetched the bytes of a file (the CDN URL or the resolve URL)."""
        f = self.file(repo_id, path)
        targets = (
            {f"/cdn/{f.sha256}"} if f.lfs else {f"/{repo_id}/resolve/{self.repos[repo_id].commit}/{path}"}
        )
        return [r for r in self.requests if r.method == "GET" and r.path.split("?")[0] in targets]

    # -- server --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub
    timeout = 10  # a stuck client never hangs the test session

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    # -- routing -------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        request = Request(method, self.path, {k.lower(): v for k, v in self.headers.items()})
        with self.fake._lock:
            self.fake.requests.append(request)
        self._request = request
        path = self.path.split("?", 1)[0]
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._model_info(m.group(1), m.group(2) or "main")
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(method, m.group(1), m.group(2), m.group(3))
        if m := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
            return self._cdn(method, m.group(1))
        self._error(404, "not a hub route")

    def _authorized(self, repo: FakeRepo) -> bool:
        return not repo.gated or self.headers.get("authorization") == f"Bearer {FakeHub.GOOD_TOKEN}"

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "Repository not found", code="RepoNotFound")
        if revision not in ("main", repo.commit):
            return self._error(404, "Invalid rev id", code="RevisionNotFound")
        siblings = []
        for path, f in sorted(repo.files.items()):
            entry: dict[str, Any] = {"rfilename": path, "size": len(f.content), "blobId": f.blob_id}
            if f.lfs:
                entry["lfs"] = {"sha256": f.sha256, "size": len(f.content), "pointerSize": len(f.pointer)}
            siblings.append(entry)
        body = {
            "_id": "0" * 24,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "Repository not found", code="RepoNotFound")
        if revision not in ("main", repo.commit):
            return self._error(404, "Invalid rev id", code="RevisionNotFound")
        commit = {"X-Repo-Commit": repo.commit}
        if not self._authorized(repo):
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            )
            return self._error(401, message, code="GatedRepo", extra=commit)
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "Entry not found", code="EntryNotFound", extra=commit)
        if f.lfs:
            headers = {
                **commit,
                "Location": f"{self.fake.url}/cdn/{f.sha256}",
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(len(f.content)),
                "ETag": f'"{f.blob_id}"',
            }
            return self._send(302, b"", headers, head=method == "HEAD")
        self._serve_bytes(method, f"{repo_id}/{path}", f.content, {**commit, "ETag": f'"{f.blob_id}"'})

    def _cdn(self, method: str, sha: str) -> None:
        for repo_id, repo in self.fake.repos.items():
            for path, f in repo.files.items():
                if f.lfs and f.sha256 == sha:
                    return self._serve_bytes(method, f"{repo_id}/{path}", f.content, {"ETag": f'"{sha}"'})
        self._error(404, "no such blob")

    # -- bytes, ranges and faults --------------------------------------------------------------
    def _serve_bytes(self, method: str, key: str, content: bytes, headers: dict[str, str]) -> None:
        fake = self.fake
        if key in fake.corrupt:
            content = bytes([content[0] ^ 0xFF]) + content[1:]
        digest = hashlib.sha256(content).hexdigest()
        if method == "GET" and fake.fail_after_cut and digest in fake._cut_done:
            return self._error(500, "Internal Error")
        start, status = 0, 200
        if method == "GET" and (rng := self.headers.get("Range")) and not fake.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            if not m or int(m.group(1)) > len(content):
                return self._error(416, "Range Not Satisfiable")
            start, status = int(m.group(1)), 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}"}
        body = content[start:]
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        cut = method == "GET" and key in fake.cut_once and len(body) > 1
        if cut:
            with fake._lock:
                fake.cut_once.discard(key)
                fake._cut_done.add(digest)
            self._request.status = status
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the peer sees the body end early
            return
        self._send(status, body, headers, head=method == "HEAD")

    def _error(
        self, status: int, message: str, *, code: str | None = None, extra: dict | None = None
    ) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool = False) -> None:
        self._request.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and self.command != "HEAD":
            self.wfile.write(body)


# ------------------------------------------------------------------------------------------------
# Tiny files in the official layouts
# ------------------------------------------------------------------------------------------------
def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors_bytes(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sd.items()}, metadata=metadata)


def tiny_wan_config(*, dim: int = 64, layers: int = 2, heads: int = 2, ffn: int = 128) -> dict[str, Any]:
    """A Wan `config.json` (the official file's keys) for a tiny DiT."""
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": dim,
        "eps": 1e-06,
        "ffn_dim": ffn,
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "t2v",
        "num_heads": heads,
        "num_layers": layers,
        "out_dim": 16,
        "text_len": 512,
    }


def tiny_generator_state(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a tiny `WanDiT` in the official key layout (no `model.` prefix)."""
    from wanstream.models.dit import WanConfig, WanDiT

    torch.manual_seed(seed)
    model = WanDiT(WanConfig.from_dict(config))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_tokenizer_files() -> dict[str, bytes]:
    """A tiny umT5-style tokenizer folder: spiece.model, tokenizer.json and the two configs."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    corpus = [
        "a red fox jumps over the lazy dog",
        "streaming video diffusion in real time",
        "a cat sits on a mat in the sun",
        "the quick brown fox, the slow green turtle",
    ] * 10
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=80,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 512,
        "extra_ids": 0,
        "additional_special_tokens": [],
        **special,
    }
    return {
        "spiece.model": proto,
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(config, indent=2).encode(),
        "special_tokens_map.json": json.dumps(special, indent=2).encode(),
    }


def _fp8_umt5(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Like Kijai's umt5-xxl-enc-fp8_e4m3fn.safetensors: linear weights float8, embeddings/norms bf16.

    (6.73 GB for 5.68 B parameters = the 1.05 B embedding in bf16 plus the blocks in one byte each.)
    """
    out = {}
    for k, v in sd.items():
        linear = k.endswith(".weight") and v.ndim == 2 and (".attn." in k or ".ffn." in k)
        out[k] = v.to(torch.float8_e4m3fn) if linear else v.to(torch.bfloat16)
    return out


def _tiny_vace(dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A VACE module file: only `vace_blocks.*` and `vace_patch_embedding.*` keys, bf16."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "vace_patch_embedding.weight": torch.randn(dim, 96, 1, 2, 2, generator=g),
        "vace_patch_embedding.bias": torch.randn(dim, generator=g),
    }
    for i in range(2):
        p = f"vace_blocks.{i}."
        if i == 0:
            sd[p + "before_proj.weight"] = torch.randn(dim, dim, generator=g)
            sd[p + "before_proj.bias"] = torch.randn(dim, generator=g)
        sd[p + "after_proj.weight"] = torch.randn(dim, dim, generator=g)
        sd[p + "after_proj.bias"] = torch.randn(dim, generator=g)
        sd[p + "modulation"] = torch.randn(1, 6, dim, generator=g)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


def streamdiffusionv2_files(golden_dir: Path) -> dict[tuple[str, str], bytes]:
    """(repo_id, path) -> bytes of every registry artifact, tiny and loadable.

    Built from the golden cases' tiny weights: the generator, config and VAE of `stream_v2v_weights`
    (one consistent tiny pipeline), the umT5 of `t5_encoder.pth`, the TAEHV of `tae_roundtrip`.
    """
    from safetensors.torch import load_file

    g = Path(golden_dir)
    config_1_3b = json.loads((g / "stream_v2v_weights.config.json").read_text())
    config_14b = tiny_wan_config(dim=96, layers=3, heads=3, ffn=160)  # "bigger": another shape
    gen_14b = {f"model.{k}": v for k, v in tiny_generator_state(config_14b, seed=14).items()}
    t5 = torch.load(g / "t5_encoder.pth", map_location="cpu", weights_only=True)
    tae = load_file(str(g / "tae_roundtrip.safetensors"))
    taehv = {k[len("weights/") :]: v.to(torch.float16) for k, v in tae.items() if k.startswith("weights/")}
    files: dict[tuple[str, str], bytes] = {
        ("jerryfeng/StreamDiffusionV2", "wan_causal_dmd_v2v/model.pt"): (
            g / "stream_v2v_weights.model.pt"
        ).read_bytes(),
        ("jerryfeng/StreamDiffusionV2", "wan_causal_dmd_v2v_14b/model.pt"): _torch_bytes(
            {"generator": gen_14b}
        ),
        ("Wan-AI/Wan2.1-T2V-1.3B", "config.json"): json.dumps(config_1_3b, indent=1).encode(),
        ("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth"): (g / "stream_v2v_weights.Wan2.1_VAE.pth").read_bytes(),
        ("Wan-AI/Wan2.1-T2V-1.3B", "models_t5_umt5-xxl-enc-bf16.pth"): (g / "t5_encoder.pth").read_bytes(),
        ("Wan-AI/Wan2.1-T2V-14B", "config.json"): json.dumps(config_14b, indent=1).encode(),
        ("Kijai/WanVideo_comfy", "umt5-xxl-enc-fp8_e4m3fn.safetensors"): _safetensors_bytes(_fp8_umt5(t5)),
        ("Kijai/WanVideo_comfy", "Wan2_1-VACE_module_1_3B_bf16.safetensors"): _safetensors_bytes(
            _tiny_vace(config_1_3b["dim"])
        ),
        ("lightx2v/Autoencoders", "taew2_1.pth"): _torch_bytes(taehv),
    }
    for name, data in tiny_tokenizer_files().items():
        files[("Wan-AI/Wan2.1-T2V-1.3B", f"google/umt5-xxl/{name}")] = data
    return files


def populate_streamdiffusionv2(hub: FakeHub, golden_dir: Path, files: dict | None = None) -> None:
    """Fill `hub` with the tiny official-layout files, plus the neighbours real repos have."""
    for (repo_id, path), data in (files or streamdiffusionv2_files(golden_dir)).items():
        hub.add_file(repo_id, path, data)
    # Real repos hold more than we need; the downloader must fetch only what the registry names.
    hub.add_file("Wan-AI/Wan2.1-T2V-1.3B", "README.md", b"# Wan2.1\n")
    hub.add_file("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl-other/unused.json", b"{}")
    hub.add_file(
        "Kijai/WanVideo_comfy", "Wan2_1_VAE_bf16.safetensors", _safetensors_bytes({"x": torch.zeros(4)})
    )
    hub.add_file("lightx2v/Autoencoders", "lighttaew2_1.pth", _torch_bytes({"x": torch.zeros(4)}))
