"""A golden case on disk, and the checks a family runs against it.

A case is `<name>.json` (the manifest) + `<name>.safetensors` (tensors) + optional side files in the
official checkpoint formats. Families read the manifest, load weights through the public loaders,
run our code and report each compared tensor through `CaseReport`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


class CaseError(Exception):
    """The case cannot be run: malformed manifest, missing tensor, unsupported setting."""


def rel_l2(ours: torch.Tensor, golden: torch.Tensor) -> float:
    """‖ours − golden‖ / ‖golden‖ in float64 (the golden README's metric)."""
    a = ours.detach().to("cpu", torch.float64)
    b = golden.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise CaseError(f"shape mismatch: ours {tuple(a.shape)} vs golden {tuple(b.shape)}")
    denom = b.norm()
    num = (a - b).norm()
    if denom == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / denom)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    rel_l2: float | None = None
    bound: float | None = None


@dataclass
class CaseReport:
    """Collects the checks of one case; a family calls `compare`/`exact` for every output it reproduces."""

    case: str
    checks: list[Check] = field(default_factory=list)
    exact_informational: bool = False  # reduced precision: exact mismatches are reported, not failed

    def compare(self, name: str, ours: torch.Tensor, golden: torch.Tensor, bound: float) -> float:
        try:
            err = rel_l2(ours, golden)
        except CaseError as exc:
            self.checks.append(Check(name, False, str(exc)))
            return float("inf")
        ok = bool(err <= bound) and bool(torch.isfinite(ours.detach().float()).all())
        self.checks.append(Check(name, ok, f"rel_l2 {err:.2e} (bound {bound:.0e})", err, bound))
        return err

    def exact(self, name: str, ours: Any, golden: Any) -> bool:
        if isinstance(ours, torch.Tensor) or isinstance(golden, torch.Tensor):
            ours_t, gold_t = torch.as_tensor(ours), torch.as_tensor(golden)
            ok = ours_t.shape == gold_t.shape and bool(torch.equal(ours_t.to(gold_t.dtype), gold_t))
        else:
            ok = ours == golden
        detail = "exact" if ok else f"ours {_short(ours)} != golden {_short(golden)}"
        if not ok and self.exact_informational:
            detail = "(informational in reduced precision) " + detail
        self.checks.append(Check(name, ok or self.exact_informational, detail))
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value.tolist() if isinstance(value, torch.Tensor) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class GoldenCase:
    """One case: its manifest, its tensors (loaded lazily) and its side files."""

    manifest_path: Path

    @cached_property
    def manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CaseError(f"{self.manifest_path.name}: unreadable manifest: {exc}") from exc
        if not isinstance(data, dict):
            raise CaseError(f"{self.manifest_path.name}: manifest is not a JSON object")
        return data

    @property
    def name(self) -> str:
        return str(self.manifest.get("case") or self.manifest_path.stem)

    @property
    def kind(self) -> str | None:
        kind = self.manifest.get("kind")
        return kind if isinstance(kind, str) else None

    @property
    def directory(self) -> Path:
        return self.manifest_path.parent

    def path(self, filename: str) -> Path:
        """A side file of this case, which must exist."""
        p = self.directory / filename
        if not p.is_file():
            raise CaseError(f"{self.name}: side file {filename} is missing")
        return p

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        path = self.directory / f"{self.manifest_path.stem}.safetensors"
        if not path.is_file():
            raise CaseError(f"{self.name}: {path.name} is missing")
        return load_file(str(path))

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CaseError(f"{self.name}: tensor {name!r} is not in the case file") from None

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix`, with the prefix removed (e.g. `weights/` → a state dict)."""
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def tolerance(self, *keys: str, default: float) -> float:
        """The first numeric bound found under the given manifest paths (dotted), else `default`."""
        for key in keys:
            node: Any = self.manifest
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                return float(node)
        return default

    def referenced_files(self) -> set[str]:
        """Every file name this manifest mentions (its tensors, side files, shared weights)."""
        names = {f"{self.manifest_path.stem}.safetensors", self.manifest_path.name}
        _collect_strings(self.manifest.get("files"), names)
        _collect_strings(self.manifest.get("weights"), names)
        if isinstance(self.manifest.get("files"), dict):
            names.update(self.manifest["files"].keys())
        return names

    def verify_files(self) -> list[str]:
        """SHA-256 of the files the manifest lists with a hash; returns the names that differ."""
        bad = []
        files = self.manifest.get("files")
        if not isinstance(files, dict):
            return bad
        for fname, meta in files.items():
            if not isinstance(meta, dict) or "sha256" not in meta:
                continue
            p = self.directory / fname
            if not p.is_file():
                bad.append(f"{fname} (missing)")
                continue
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest != meta["sha256"]:
                bad.append(f"{fname} (sha256 mismatch)")
        return bad


def _collect_strings(node: Any, out: set[str]) -> None:
    if isinstance(node, str):
        out.add(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            out.add(str(k))
            _collect_strings(v, out)
    elif isinstance(node, list):
        for v in node:
            _collect_strings(v, out)
