"""The model registry: versioned artifacts as safetensors plus a JSON manifest, never pickle.

A registry is a directory. Each published version lives in ``<root>/<kind>/<version>/`` with
``weights.safetensors`` and ``manifest.json``; the manifest holds the version, its parent, a free
``schema`` (what a loader needs to rebuild the module), metrics and the sha256 of every file.
Publishing writes into a temporary directory and renames it into place, so a reader never sees a
half-written version. Loading verifies every checksum before it returns a tensor; anything that
does not check out raises :class:`CorruptArtifact` with the reason.

>>> import tempfile, torch
>>> registry = ModelRegistry(tempfile.mkdtemp())
>>> first = registry.publish("model", {"w": torch.ones(2)}, schema={"dim": 2}, metrics={"auc": 0.7})
>>> first.version, registry.latest("model")
('v000001', 'v000001')
>>> second = registry.publish("model", {"w": torch.zeros(2)}, schema={"dim": 2}, parent=first.version)
>>> loaded = registry.load("model")
>>> loaded.version, loaded.manifest["parent"], loaded.tensors["w"].tolist()
('v000002', 'v000001', [0.0, 0.0])
>>> registry.announcement(second).kind
'model'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from streaming.events import ModelUpdate

Kind = Literal["model", "policy"]
KINDS: tuple[str, ...] = ("model", "policy")
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_VERSION = re.compile(r"^v(\d{6,})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CorruptArtifact(ValueError):
    """A published version that cannot be trusted: missing files, bad checksums, wrong format."""


class VersionNotFound(LookupError):
    """The registry has no such version (or no version at all) of that kind."""


@dataclass(frozen=True)
class PublishedArtifact:
    kind: str
    version: str
    path: Path
    manifest_digest: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return self.path.resolve().as_uri()


@dataclass(frozen=True)
class LoadedArtifact:
    kind: str
    version: str
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    manifest_digest: str
    directory: Path | None = None  # where it was loaded from (side files are read from here)

    @property
    def schema(self) -> dict[str, Any]:
        return self.manifest["schema"]

    def read_file(self, name: str) -> bytes:
        """A side file of this version, verified against the manifest's checksum."""
        expected = self.manifest["files"].get(name)
        if expected is None or self.directory is None:
            raise CorruptArtifact(f"{self.kind} {self.version} has no file {name!r}")
        try:
            data = (self.directory / name).read_bytes()
        except OSError as exc:
            raise CorruptArtifact(f"{self.kind} {self.version}: cannot read {name}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptArtifact(f"{self.kind} {self.version}: checksum mismatch for {name} (truncated or tampered)")
        return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {', '.join(KINDS)}")


class ModelRegistry:
    """Publish, list and load versions of models and policies under one directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = str(root)
        self.root = Path(root[len("file://"):] if root.startswith("file://") else root)

    def versions(self, kind: str) -> list[str]:
        """Published versions of ``kind``, oldest first."""
        _check_kind(kind)
        directory = self.root / kind
        if not directory.is_dir():
            return []
        found = [p.name for p in directory.iterdir() if p.is_dir() and _VERSION.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def latest(self, kind: str) -> str | None:
        versions = self.versions(kind)
        return versions[-1] if versions else None

    def publish(self, kind: str, tensors: dict[str, torch.Tensor], *, schema: dict[str, Any],
                parent: str | None = None, metrics: dict[str, float] | None = None,
                extra_files: dict[str, bytes] | None = None) -> PublishedArtifact:
        """Write a new version atomically and return where it is; the version number is assigned here.

        ``extra_files`` are small JSON/text side files (e.g. a vocabulary); they are checksummed too.
        """
        _check_kind(kind)
        if not tensors:
            raise ValueError("an artifact needs at least one tensor")
        (self.root / kind).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root / kind))
        try:
            save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()},
                      str(staging / WEIGHTS))
            files = {WEIGHTS: sha256_file(staging / WEIGHTS)}
            for name, data in (extra_files or {}).items():
                if "/" in name or name in (WEIGHTS, MANIFEST) or name.startswith("."):
                    raise ValueError(f"bad side-file name {name!r}")
                (staging / name).write_bytes(data)
                files[name] = hashlib.sha256(data).hexdigest()
            clean_metrics = {k: float(v) for k, v in (metrics or {}).items()}
            while True:  # claim the next number; a concurrent publisher makes the rename fail
                latest = self.latest(kind)
                version = f"v{(int(latest[1:]) if latest else 0) + 1:06d}"
                manifest = {
                    "format": MANIFEST_FORMAT, "kind": kind, "version": version, "parent": parent,
                    "created_at_ms": int(time.time() * 1000), "schema": schema,
                    "metrics": clean_metrics, "files": files,
                }
                manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
                (staging / MANIFEST).write_bytes(manifest_bytes)
                try:
                    os.rename(staging, self.root / kind / version)
                except OSError:
                    if (self.root / kind / version).exists():
                        continue
                    raise
                break
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return PublishedArtifact(kind, version, self.root / kind / version,
                                 hashlib.sha256(manifest_bytes).hexdigest(), clean_metrics)

    def load(self, kind: str, version: str | None = None) -> LoadedArtifact:
        """Load and verify one version (the latest when ``version`` is None)."""
        _check_kind(kind)
        version = version or self.latest(kind)
        if version is None:
            raise VersionNotFound(f"the registry at {self.root} has no published {kind}")
        if not _VERSION.match(version):
            raise VersionNotFound(f"{version!r} is not a version name (expected v000001, v000002, ...)")
        directory = self.root / kind / version
        if not directory.is_dir():
            raise VersionNotFound(f"{kind} {version} is not in the registry at {self.root}")
        artifact = load_artifact_dir(directory, expected_kind=kind)
        if artifact.version != version:
            raise CorruptArtifact(f"{directory}: its manifest says it is version {artifact.version}")
        return artifact

    def read_file(self, kind: str, version: str, name: str) -> bytes:
        """A verified side file of a published version."""
        artifact_dir = self.root / kind / version
        manifest, _ = _read_manifest(artifact_dir)
        expected = manifest["files"].get(name)
        if expected is None:
            raise CorruptArtifact(f"{kind} {version} has no file {name!r}")
        data = (artifact_dir / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptArtifact(f"{kind} {version}: checksum mismatch for {name}")
        return data

    def announcement(self, artifact: PublishedArtifact) -> ModelUpdate:
        """The ``model-updates`` event that tells serving a version is ready (with its finite metrics;
        an undefined one, e.g. an AUC before any click, stays in the manifest only)."""
        return ModelUpdate(event_time=int(time.time() * 1000), kind=artifact.kind, version=artifact.version,
                           artifact_uri=artifact.uri, manifest_digest=artifact.manifest_digest,
                           metrics={k: v for k, v in artifact.metrics.items() if math.isfinite(v)})


def _read_manifest(directory: Path) -> tuple[dict[str, Any], str]:
    try:
        raw = (directory / MANIFEST).read_bytes()
    except OSError as exc:
        raise CorruptArtifact(f"{directory}: cannot read {MANIFEST}: {exc}") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptArtifact(f"{directory}: {MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise CorruptArtifact(f"{directory}: {MANIFEST} is not a JSON object")
    required = {"format", "kind", "version", "schema", "files"}
    if not required <= manifest.keys():
        raise CorruptArtifact(f"{directory}: {MANIFEST} lacks {sorted(required - manifest.keys())}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise CorruptArtifact(f"{directory}: manifest format {manifest['format']!r} is not {MANIFEST_FORMAT}")
    if manifest["kind"] not in KINDS or not isinstance(manifest["version"], str) or not _VERSION.match(manifest["version"]):
        raise CorruptArtifact(f"{directory}: the manifest's kind {manifest['kind']!r} or version {manifest['version']!r} "
                              f"is not one a registry publishes")
    if not isinstance(manifest["files"], dict) or WEIGHTS not in manifest["files"]:
        raise CorruptArtifact(f"{directory}: the manifest lists no {WEIGHTS}")
    for name, digest in manifest["files"].items():
        if not _is_plain_file_name(name):  # "../x" or "/etc/x" would make loading read (or write) elsewhere
            raise CorruptArtifact(f"{directory}: the manifest names {name[:100]!r}, which is not a file inside the "
                                  "artifact's directory")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise CorruptArtifact(f"{directory}: the manifest's checksum of {name} is not a sha256 hex digest")
    return manifest, hashlib.sha256(raw).hexdigest()


def _is_plain_file_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def load_artifact_dir(directory: str | os.PathLike[str], expected_kind: str | None = None,
                      expected_digest: str | None = None) -> LoadedArtifact:
    """Verify and load one artifact directory; raises CorruptArtifact on any mismatch."""
    directory = Path(str(directory).removeprefix("file://"))
    manifest, digest = _read_manifest(directory)
    if expected_digest is not None and digest != expected_digest:
        raise CorruptArtifact(f"{directory}: manifest digest {digest[:12]} is not the announced {expected_digest[:12]}")
    if expected_kind is not None and manifest["kind"] != expected_kind:
        raise CorruptArtifact(f"{directory}: holds a {manifest['kind']!r}, expected a {expected_kind!r}")
    try:
        data = (directory / WEIGHTS).read_bytes()
    except OSError as exc:
        raise CorruptArtifact(f"{directory}: cannot read {WEIGHTS}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != manifest["files"][WEIGHTS]:
        raise CorruptArtifact(f"{directory}: checksum mismatch for {WEIGHTS} (truncated or tampered)")
    try:
        tensors = load_safetensors_bytes(data)  # safetensors never executes code, unlike pickle
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CorruptArtifact(f"{directory}: {WEIGHTS} is not a valid safetensors file: {exc}") from None
    return LoadedArtifact(manifest["kind"], manifest["version"], tensors, manifest, digest, directory)
