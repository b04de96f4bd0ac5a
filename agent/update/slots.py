"""A/B model slots on disk.

Layout under ``root``::

    a/model.tflite  a/manifest.json
    b/model.tflite  b/manifest.json
    active -> a          (symlink; switched with one atomic rename)

Slot contents are written only to the inactive slot, so the running model is
never touched by an install. Which slot is active (boot state) is kept apart
from what each slot holds (slot state), as RAUC does.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.atomic import atomic_symlink, atomic_write_chunks, atomic_write_json
from agent.common.errors import UpdateError

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class InstallPlan:
    """Pure description of an install: where the new model goes, what it replaces."""

    slot: str
    previous_slot: str | None
    model_path: Path
    manifest_path: Path


def other(slot: str) -> str:
    if slot not in SLOTS:
        raise UpdateError("install", f"unknown slot {slot!r}")
    return SLOTS[1 - SLOTS.index(slot)]


class SlotStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for slot in SLOTS:
            (self.root / slot).mkdir(parents=True, exist_ok=True)

    @property
    def _link(self) -> Path:
        return self.root / "active"

    def active(self) -> str | None:
        """The active slot, or None before the first install."""
        try:
            target = self._link.readlink().name
        except FileNotFoundError:
            return None
        return target if target in SLOTS else None

    def model_path(self, slot: str) -> Path:
        return self.root / slot / MODEL_FILE

    def manifest(self, slot: str) -> dict[str, Any] | None:
        path = self.root / slot / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("slot %s manifest unreadable: %s", slot, err)
            return None
        return data if isinstance(data, dict) else None

    def active_manifest(self) -> dict[str, Any] | None:
        slot = self.active()
        return self.manifest(slot) if slot else None

    def plan(self) -> InstallPlan:
        current = self.active()
        slot = other(current) if current else SLOTS[0]
        return InstallPlan(
            slot=slot,
            previous_slot=current,
            model_path=self.model_path(slot),
            manifest_path=self.root / slot / MANIFEST_FILE,
        )

    def write(self, plan: InstallPlan, source: Path, manifest: dict[str, Any]) -> None:
        """Fill the plan's (inactive) slot; the manifest is written last, so a slot
        with a manifest always has its complete model beside it."""
        if plan.slot == self.active():
            raise UpdateError("install", "refusing to overwrite the active slot")
        plan.manifest_path.unlink(missing_ok=True)
        with open(source, "rb") as handle:
            atomic_write_chunks(plan.model_path, iter(lambda: handle.read(_CHUNK), b""))
        atomic_write_json(plan.manifest_path, manifest)

    def activate(self, slot: str) -> None:
        if self.manifest(slot) is None or not self.model_path(slot).exists():
            raise UpdateError("install", f"slot {slot} holds no complete model")
        atomic_symlink(self._link, slot)
        log.info("slot %s is now active", slot)

    def clear(self, slot: str) -> None:
        """Empty an inactive slot (after a failed install)."""
        if slot == self.active():
            return
        shutil.rmtree(self.root / slot, ignore_errors=True)
        (self.root / slot).mkdir(parents=True, exist_ok=True)
