"""This board's profile, and the runtime the agent runs models with on it.

The configuration wins where it says something (``profile``, ``inference.runtime``,
``inference.num_threads``); otherwise the detected profile decides.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import AgentConfig
from agent.profiles.detect import detect_profile
from agent.profiles.schema import Profile, default_profiles_dir, load_profiles
from agent.update.smoke import RuntimeChoice


def resolve_profile(cfg: AgentConfig) -> Profile:
    directory = Path(cfg.profiles_dir) if cfg.profiles_dir else default_profiles_dir()
    return detect_profile(load_profiles(directory), Path(cfg.hw_root), cfg.profile)


def runtime_choice(cfg: AgentConfig, profile: Profile) -> RuntimeChoice:
    spec = profile.runtime
    return RuntimeChoice(
        runtime=cfg.inference.runtime or spec.type,
        num_threads=cfg.inference.num_threads or spec.num_threads,
        delegate=spec.delegate,
        delegate_device=spec.delegate_device,
    )
