"""Which firmware profile fits the board the agent runs on.

Detection reads facts under a root directory (``/`` on a device, a fake tree
in tests), then applies a pure matcher; the most specific profile (highest
``priority``) among those whose every rule holds wins.
"""

from __future__ import annotations

import glob
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.common.errors import ProfileError
from agent.profiles.schema import (
    DEVICE_TREE_MODEL,
    NV_TEGRA_RELEASE,
    USB_DEVICES,
    DetectRules,
    Profile,
    under_root,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoardFacts:
    """What detection looks at, read once from the filesystem."""

    machine: str
    device_tree_model: str | None
    nv_tegra_release: str | None
    usb_ids: frozenset[str]
    globs_present: frozenset[str]

    def summary(self) -> str:
        return (
            f"machine {self.machine!r}, device-tree model {self.device_tree_model!r}, "
            f"nv_tegra_release {'present' if self.nv_tegra_release is not None else 'absent'}, "
            f"USB ids {sorted(self.usb_ids) or 'none'}, "
            f"paths present {sorted(self.globs_present) or 'none'}"
        )


def _read_text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    # The device tree stores strings NUL-terminated.
    return raw.replace(b"\0", b" ").decode("utf-8", errors="replace").strip()


def _usb_ids(devices: Path) -> frozenset[str]:
    """``vendor:product`` of every USB device; interfaces and hubs without ids are skipped."""
    found: set[str] = set()
    for entry in glob.glob(os.path.join(glob.escape(str(devices)), "*")):
        vendor, product = _read_text(Path(entry, "idVendor")), _read_text(Path(entry, "idProduct"))
        if vendor and product:
            found.add(f"{vendor.lower()}:{product.lower()}")
    return frozenset(found)


def read_board_facts(root: Path, globs: Iterable[str], machine: str | None = None) -> BoardFacts:
    base = glob.escape(str(root))
    present = frozenset(g for g in set(globs) if glob.glob(os.path.join(base, g.lstrip("/"))))
    return BoardFacts(
        machine=machine or platform.machine(),
        device_tree_model=_read_text(under_root(root, DEVICE_TREE_MODEL)),
        nv_tegra_release=_read_text(under_root(root, NV_TEGRA_RELEASE)),
        usb_ids=_usb_ids(under_root(root, USB_DEVICES)),
        globs_present=present,
    )


def _contains_any(text: str | None, needles: tuple[str, ...]) -> bool:
    return not needles or (text is not None and any(n in text for n in needles))


def matches(rules: DetectRules, facts: BoardFacts) -> bool:
    """Pure: does every rule of ``rules`` hold for ``facts``?"""
    return (
        (not rules.machine or facts.machine.lower() in {m.lower() for m in rules.machine})
        and _contains_any(facts.device_tree_model, rules.device_tree_model)
        and _contains_any(facts.nv_tegra_release, rules.nv_tegra_release)
        and all(g in facts.globs_present for g in rules.paths_present)
        and not any(g in facts.globs_present for g in rules.paths_absent)
        and (not rules.usb_ids or bool(facts.usb_ids.intersection(rules.usb_ids)))
    )


class NoMatchingProfileError(ProfileError):
    """Detection cannot choose: no profile matches, or two tie at the top.

    ``reason`` says why without advice, so each caller names its own way to choose
    (the daemon: ``profile`` in the configuration; ``enroll``: ``--profile``).
    """

    def __init__(self, reason: str, known: Iterable[str]) -> None:
        self.reason = reason
        self.known = tuple(sorted(known))
        super().__init__(
            f"{reason}; known profiles: {', '.join(self.known)}. "
            "Set 'profile' in the agent configuration to choose one."
        )


def choose_profile(profiles: Mapping[str, Profile], facts: BoardFacts) -> Profile:
    """Pure: the highest-priority matching profile; a tie at the top is an error."""
    candidates = sorted(
        (p for p in profiles.values() if matches(p.detect, facts)),
        key=lambda p: (-p.priority, p.name),
    )
    if not candidates:
        raise NoMatchingProfileError(
            f"no firmware profile matches this board ({facts.summary()})", profiles
        )
    best = candidates[0]
    if len(candidates) > 1 and candidates[1].priority == best.priority:
        raise NoMatchingProfileError(
            f"firmware profiles {best.name!r} and {candidates[1].name!r} both match with "
            f"priority {best.priority} (give one a higher priority)",
            profiles,
        )
    return best


def board_facts(
    profiles: Mapping[str, Profile], root: Path, machine: str | None = None
) -> BoardFacts:
    """The facts every profile's rules look at, read under ``root``."""
    globs = {g for p in profiles.values() for g in p.detect.globs}
    return read_board_facts(root, globs, machine)


def detect_profile(
    profiles: Mapping[str, Profile],
    root: Path = Path("/"),
    override: str | None = None,
    machine: str | None = None,
) -> Profile:
    """The profile for this board: ``override`` if given (``auto`` means detect),
    else detection under ``root``."""
    if override is not None and override != "auto":
        if override not in profiles:
            raise ProfileError(
                f"profile override {override!r} is not a known profile; "
                f"known: {', '.join(sorted(profiles))}"
            )
        log.info("firmware profile %s chosen by configuration", override)
        return profiles[override]
    facts = board_facts(profiles, root, machine)
    profile = choose_profile(profiles, facts)
    log.info(
        "detected firmware profile %s (priority %d): %s",
        profile.name,
        profile.priority,
        facts.summary(),
    )
    return profile
