"""``edgefleet-agent profiles``: the profiles this agent has, and the one this board matches.

Pure formatting over the loaded profiles and the board facts, so the command and
its tests share one description of each profile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.profiles.detect import NoMatchingProfileError, board_facts, choose_profile, matches
from agent.profiles.schema import Profile


@dataclass(frozen=True)
class ProfileListing:
    """Every profile as a JSON-ready row; ``detected`` is None when detection cannot choose."""

    rows: list[dict[str, Any]]
    detected: str | None
    reason: str  # why nothing was detected ("" when one was)


def _row(profile: Profile, matched: bool, detected: bool) -> dict[str, Any]:
    rt = profile.runtime
    return {
        "name": profile.name,
        "description": profile.description,
        "priority": profile.priority,
        "runtime": rt.type,
        "delegate": rt.delegate,
        "num_threads": rt.num_threads,
        "variant_preference": list(rt.variant_preference),
        "power": profile.power.method,
        "throttle": profile.thermal.throttle_method,
        "matches": matched,
        "detected": detected,
        "source": str(profile.source),
    }


def list_profiles(
    profiles: Mapping[str, Profile], root: Path, machine: str | None = None
) -> ProfileListing:
    facts = board_facts(profiles, root, machine)
    try:
        detected: str | None = choose_profile(profiles, facts).name
        reason = ""
    except NoMatchingProfileError as err:
        detected, reason = None, err.reason
    rows = [
        _row(p, matches(p.detect, facts), p.name == detected)
        for p in sorted(profiles.values(), key=lambda p: p.name)
    ]
    return ProfileListing(rows, detected, reason)


def render_table(listing: ProfileListing) -> str:
    """Aligned text, ``*`` before the profile this board matches, and a closing line."""
    header = ("", "PROFILE", "RUNTIME", "THREADS", "VARIANTS", "POWER", "DESCRIPTION")
    lines = [header]
    for r in listing.rows:
        runtime = r["runtime"] + (f"+{r['delegate']}" if r["delegate"] else "")
        lines.append(
            (
                "*" if r["detected"] else "",
                r["name"],
                runtime,
                str(r["num_threads"]),
                ",".join(r["variant_preference"]),
                r["power"],
                r["description"],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in lines
    ]
    if listing.detected:
        out.append(f"\nthis board: {listing.detected} (marked *)")
    else:
        out.append(
            f"\nno profile detected: {listing.reason}\n"
            "choose one with `edgefleet-agent enroll --profile NAME`"
        )
    return "\n".join(out)
