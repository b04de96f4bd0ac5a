"""Atomic writes and A/B slots on a real filesystem."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.common.atomic import atomic_symlink, atomic_write, atomic_write_chunks, atomic_write_json
from agent.common.errors import UpdateError
from agent.update.slots import SlotStore


def test_atomic_write_replaces_content_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def chunks() -> object:
        yield b"partial"
        raise OSError("disk yanked")

    with pytest.raises(OSError, match="disk yanked"):
        atomic_write_chunks(target, chunks())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_json_and_symlink(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "x.json").read_text().startswith("{\n")
    link = tmp_path / "active"
    atomic_symlink(link, "a")
    atomic_symlink(link, "b")
    assert os.readlink(link) == "b"


def _model(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / f"src-{len(content)}.tflite"
    path.write_bytes(content)
    return path


def test_slots_alternate_and_never_touch_the_active_slot(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "slots")
    assert store.active() is None
    plan = store.plan()
    assert (plan.slot, plan.previous_slot) == ("a", None)
    store.write(plan, _model(tmp_path, b"r1"), {"release": 1})
    store.activate(plan.slot)
    assert store.active() == "a"
    plan2 = store.plan()
    assert (plan2.slot, plan2.previous_slot) == ("b", "a")
    store.write(plan2, _model(tmp_path, b"r2-bytes"), {"release": 2})
    assert store.model_path("a").read_bytes() == b"r1"
    store.activate("b")
    assert store.active_manifest() == {"release": 2}
    with pytest.raises(UpdateError, match="active slot"):
        store.write(
            store.plan().__class__("b", "a", store.model_path("b"), tmp_path / "m"),
            _model(tmp_path, b"x"),
            {},
        )


def test_activating_an_incomplete_slot_is_refused(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "slots")
    (store.root / "b" / "model.tflite").write_bytes(b"half")
    with pytest.raises(UpdateError, match="no complete model"):
        store.activate("b")
    assert store.active() is None


def test_corrupt_manifest_reads_as_empty_slot(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "slots")
    (store.root / "a" / "manifest.json").write_text("{not json")
    assert store.manifest("a") is None
