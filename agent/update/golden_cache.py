"""Golden sets kept by content: a set a device already holds is not downloaded again.

Golden sets are TUF targets named by their sha256 (the server publishes them
content-addressed), and releases often share one. The cache keeps the newest
``keep`` sets under ``state_dir/golden/<sha256>.npz``; a file is only ever put
there after the download checked its length and hash against signed metadata,
and a cached file whose size no longer matches is fetched again. ``fetch`` has
the shape of ``TufFetcher.fetch_aux``, so the smoke test uses either.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from agent.update.fetch import TufFetcher

log = logging.getLogger(__name__)


class GoldenCache:
    def __init__(self, fetcher: TufFetcher, root: Path, keep: int = 3) -> None:
        self.fetcher = fetcher
        self.root = root
        self.keep = max(1, keep)
        self.downloaded = 0  # bytes fetched through this cache, for the bandwidth report

    def fetch(self, target_path: str, dest: Path, max_bytes: int = 64 * 1024 * 1024) -> Path:
        """The verified set at ``dest`` (a link to, or a copy of, the cached file)."""
        info = self.fetcher.target_info(target_path)
        cached = self.root / f"{info.sha256}.npz"
        if not (cached.is_file() and cached.stat().st_size == info.length):
            self.root.mkdir(parents=True, exist_ok=True)
            part = self.root / f"{info.sha256}.part"
            self.fetcher.fetch_aux(target_path, part, max_bytes)  # bounded and hash-checked
            os.replace(part, cached)
            self.downloaded += info.length
            self._trim(cached)
        else:
            log.info("golden set %s already held; not downloaded", target_path)
        dest.unlink(missing_ok=True)
        try:
            os.link(cached, dest)
        except OSError:  # another filesystem: copy instead
            shutil.copyfile(cached, dest)
        return dest

    def _trim(self, newest: Path) -> None:
        held = sorted(self.root.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [p for p in held if p != newest][self.keep - 1 :]:
            old.unlink(missing_ok=True)
