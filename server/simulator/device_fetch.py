"""Each simulated device's own bytes on the wire: its TUF metadata refresh and its download.

Verification stays shared (``artifacts.SharedArtifacts`` checks signatures and
hashes once per target for the process), but the traffic a fleet causes must
be the fleet's: every device, for every update, makes the requests python-tuf's
``Updater.refresh`` would make from its own metadata cache, then downloads its
own delta or full file. So a static host or CDN in front of the targets, and
the server's bandwidth accounting, see N devices, not one.

The refresh follows the TUF client workflow on the metadata the device knows:
probe ``<root+1>.root.json`` (a 404 ends the root update), fetch
``timestamp.json``, and only when the snapshot version it names is new fetch
``<v>.snapshot.json``; only when the targets version that names is new fetch
``<v>.targets.json`` (consistent snapshots, as the server's repository). Bodies
are counted, not kept; the two small ones whose versions drive the walk are
parsed.

Paths are the agent's: ``<base>/tuf/metadata/`` and ``<base>/tuf/targets/``, where
``base`` is the server, or a static host that mirrors that layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.common.errors import ProtocolError, ServerRequestError
from agent.protocol.api import TUF_METADATA_PREFIX
from agent.protocol.custom_fields import TargetInfo
from agent.update.download import target_url
from server.simulator.http_pool import Answer, HttpPool, HttpPoolError, PoolLimits
from server.simulator.stats import FleetStats

_MAX_ROOT_STEPS = 32  # root versions a refresh may walk, as python-tuf's max_root_rotations


class DeviceFetchError(ServerRequestError):
    """A device's own metadata or target request failed (status, short, or unreachable)."""

    def __init__(self, what: str, url: str, problem: str, status: int | None = None) -> None:
        super().__init__(f"{what} {url}: {problem}", status)
        self.what = what
        self.url = url
        self.problem = problem


@dataclass
class KnownMetadata:
    """The metadata versions one device holds (its TUF cache, reduced to versions)."""

    root: int = 1
    snapshot: int = 0
    targets: int = 0


class DeviceFetch:
    """Metadata refreshes and target downloads for many devices over one connection pool."""

    def __init__(
        self,
        base_url: str,
        connections: int,
        timeout_s: float,
        stats: FleetStats,
        *,
        user_agent: str,
        max_body: int = 512 * 1024 * 1024,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.stats = stats
        self._pool = HttpPool(
            self.base_url,
            PoolLimits(connections=connections, timeout_s=timeout_s, max_body=max_body),
            user_agent,
        )

    async def close(self) -> None:
        await self._pool.close()

    async def _get(self, path: str, what: str, *, keep: bool = False) -> Answer:
        try:
            answer = await self._pool.request("GET", path, urgent=True, keep_body=keep)
        except HttpPoolError as err:
            self.stats.error(f"{what}: {'timeout' if 'timed out' in str(err) else 'connection'}")
            raise DeviceFetchError(what, path, str(err)) from err
        except ProtocolError:
            self.stats.error(f"{what}: malformed HTTP")
            raise
        return answer

    async def _metadata(self, name: str) -> Answer:
        answer = await self._get(TUF_METADATA_PREFIX + name, "metadata", keep=True)
        if answer.status != 200:
            self.stats.error(f"metadata: HTTP {answer.status}")
            raise DeviceFetchError("metadata", name, f"HTTP {answer.status}", answer.status)
        return answer

    async def refresh(self, known: KnownMetadata) -> int:
        """One device's metadata refresh; updates ``known``; the bytes it received."""
        received = 0
        for _ in range(_MAX_ROOT_STEPS):
            name = f"{known.root + 1}.root.json"
            probe = await self._get(TUF_METADATA_PREFIX + name, "metadata")
            if probe.status == 404:  # no newer root: the usual answer (its body is not metadata)
                break
            if probe.status != 200:
                self.stats.error(f"metadata: HTTP {probe.status}")
                raise DeviceFetchError("metadata", name, f"HTTP {probe.status}", probe.status)
            received += probe.size
            known.root += 1
        timestamp = await self._metadata("timestamp.json")
        received += timestamp.size
        snapshot_version = _version_of(timestamp.body, "snapshot.json")
        if snapshot_version != known.snapshot:
            snapshot = await self._metadata(f"{snapshot_version}.snapshot.json")
            received += snapshot.size
            known.snapshot = snapshot_version
            targets_version = _version_of(snapshot.body, "targets.json")
            if targets_version != known.targets:
                targets = await self._metadata(f"{targets_version}.targets.json")
                received += targets.size
                known.targets = targets_version
        self.stats.downloaded_bytes += received
        return received

    async def download(self, info: TargetInfo) -> int:
        """Download one target as the device would (bytes counted, dropped); its length."""
        url = target_url("", info.path, info.sha256)
        answer = await self._get(url, "download")
        if answer.status != 200:
            self.stats.error(f"download: HTTP {answer.status}")
            raise DeviceFetchError("download", url, f"HTTP {answer.status}", answer.status)
        if answer.size != info.length:
            self.stats.error("download: wrong length")
            raise DeviceFetchError(
                "download", url, f"{answer.size} bytes, the signed length is {info.length}"
            )
        self.stats.downloaded_bytes += answer.size
        return answer.size


def _version_of(raw: bytes, role: str) -> int:
    """``signed.meta[role].version`` of a timestamp or snapshot document."""
    try:
        doc: Any = json.loads(raw)
        version = doc["signed"]["meta"][role]["version"]
    except (ValueError, KeyError, TypeError) as err:
        raise ServerRequestError(f"metadata lacks the version of {role}") from err
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ServerRequestError(f"metadata names a bad version of {role}: {version!r}")
    return version
