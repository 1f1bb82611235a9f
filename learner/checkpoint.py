"""Atomic training checkpoints (safetensors + JSON) and the ledger of learned example ids.

A checkpoint is a directory ``ckpt-<seq>/`` holding ``state.safetensors`` (weights, optimizer
moments, metric arrays) and ``state.json`` (consumed offsets, counters, catalog, the sha256 of
the tensors file). It is written into a staging directory, fsynced and renamed into place, so a
crash leaves either the whole checkpoint or none of it. :meth:`CheckpointStore.latest` returns
the newest checkpoint that verifies.

The optional ledger lists the event ids each checkpoint learned, one segment file per
checkpoint, written before the checkpoint is renamed into place; on restore, segments newer
than the checkpoint restored from are deleted, because the model never kept what they learned.
The union of the remaining segments is exactly what the restored model has learned.

>>> import tempfile, torch
>>> store = CheckpointStore(tempfile.mkdtemp(), ledger=True)
>>> store.save({"w": torch.ones(2)}, {"offsets": {"examples:0": 2}}, learned_ids=["a", "b"])
1
>>> checkpoint = store.latest()
>>> checkpoint.seq, checkpoint.meta["offsets"], checkpoint.tensors["w"].tolist(), store.ledger_ids()
(1, {'examples:0': 2}, [1.0, 1.0], ['a', 'b'])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save

log = logging.getLogger(__name__)
TENSORS, META = "state.safetensors", "state.json"
FORMAT = 1
_CHECKPOINT = re.compile(r"^ckpt-(\d{6,})$")
_SEGMENT = re.compile(r"^seg-(\d{6,})\.txt$")


class CorruptCheckpoint(ValueError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    def __init__(self, directory: str | os.PathLike[str], keep: int = 2, ledger: bool = False) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.ledger = ledger
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.ledger_dir).mkdir(exist_ok=True)

    @property
    def ledger_dir(self) -> Path:
        return self.directory / "ledger"

    def sequences(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _CHECKPOINT.match(p.name)))

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], learned_ids: list[str] | None = None) -> int:
        """Write the next checkpoint atomically; return its sequence number."""
        existing = self.sequences()
        seq = (existing[-1] if existing else 0) + 1
        if self.ledger:  # before the checkpoint: a segment without its checkpoint is deleted on restore
            _fsync_write(self.ledger_dir / f"seg-{seq:06d}.txt", "".join(f"{i}\n" for i in (learned_ids or [])).encode())
            _fsync_dir(self.ledger_dir)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.directory))
        try:
            data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
            _fsync_write(staging / TENSORS, data)
            body = {"format": FORMAT, "seq": seq, "sha256": hashlib.sha256(data).hexdigest(), "meta": meta}
            _fsync_write(staging / META, json.dumps(body, separators=(",", ":")).encode())
            os.rename(staging, self.directory / f"ckpt-{seq:06d}")
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in existing[: max(0, len(existing) + 1 - self.keep)]:
            shutil.rmtree(self.directory / f"ckpt-{old:06d}", ignore_errors=True)
        return seq

    def load(self, seq: int) -> Checkpoint:
        directory = self.directory / f"ckpt-{seq:06d}"
        try:
            body = json.loads((directory / META).read_bytes())
            data = (directory / TENSORS).read_bytes()
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"checkpoint {directory} is unreadable: {exc}") from None
        if body.get("format") != FORMAT or body.get("seq") != seq:
            raise CorruptCheckpoint(f"checkpoint {directory} has format {body.get('format')!r}, seq {body.get('seq')!r}")
        if hashlib.sha256(data).hexdigest() != body["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {directory}: {TENSORS} does not match its checksum")
        try:
            tensors = load_safetensors_bytes(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CorruptCheckpoint(f"checkpoint {directory}: {exc}") from None
        return Checkpoint(seq, tensors, body["meta"])

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; newer broken ones and their ledger segments are removed."""
        for seq in reversed(self.sequences()):
            try:
                checkpoint = self.load(seq)
            except CorruptCheckpoint as exc:
                log.error("%s; falling back to the previous checkpoint", exc)
                shutil.rmtree(self.directory / f"ckpt-{seq:06d}", ignore_errors=True)
                continue
            self._drop_segments_after(seq)
            return checkpoint
        self._drop_segments_after(0)
        return None

    def _drop_segments_after(self, seq: int) -> None:
        for path in self.ledger_dir.iterdir():
            m = _SEGMENT.match(path.name)
            if m and int(m.group(1)) > seq:
                path.unlink()
        for path in self.directory.iterdir():
            if path.name.startswith(".staging-"):
                shutil.rmtree(path, ignore_errors=True)

    def ledger_ids(self) -> list[str]:
        """Every event id the committed checkpoints learned, in order (with repeats, if any)."""
        ids: list[str] = []
        segments = sorted((int(m.group(1)), p) for p in self.ledger_dir.iterdir() if (m := _SEGMENT.match(p.name)))
        newest = max(self.sequences(), default=0)
        for seq, path in segments:
            if seq <= newest:  # a newer segment's checkpoint never landed
                ids += path.read_text().split()
        return ids
