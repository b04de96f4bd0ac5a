"""Where TUF metadata and targets are stored: a local directory or an S3-compatible bucket.

Keys are repository-relative paths (``metadata/3.targets.json``,
``targets/digits/<sha256>.r1.int8-cpu.tflite``). In a bucket they sit under
``<prefix>/tuf/``, the layout of the server's own URLs (``agent.protocol.api``),
so ``https://<bucket host>/<prefix>`` (or a CDN in front of it) is a base URL
devices can use in place of the server's (``--targets-url``): TUF signatures,
not the transport, make them trustworthy. Each object carries the
Cache-Control a CDN needs: unversioned metadata changes in place and must not
be cached; versioned metadata and content-addressed targets never change.

The local directory is the default (one box). With S3 the server keeps a local
cache of the target bytes it needs (deltas are built from old releases), and
several replicas share the bucket as the one source of truth.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from agent.common.atomic import atomic_write, commit_file
from agent.protocol.api import TUF_METADATA_PREFIX
from server.errors import ConfigError, NotFoundError, ServerError

log = logging.getLogger(__name__)

__all__ = ["ArtifactStore", "ArtifactStoreError", "LocalStore", "S3Store", "open_store"]

S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL"  # boto3's own variable, honoured for --s3-endpoint-url
_URL_ROOT = TUF_METADATA_PREFIX.strip("/").split("/")[0]  # "tuf", as in /tuf/metadata/


class ArtifactStoreError(ServerError):
    """The store could not be read or written (network, permissions, missing bucket)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def cache_control(key: str) -> str:
    """``timestamp.json``/``root.json`` change in place; everything else is immutable."""
    name = key.rsplit("/", 1)[-1]
    if key.startswith("metadata/"):
        return "no-store" if name[:1].isalpha() else "public, max-age=300"
    return "public, max-age=31536000, immutable"


def _content_type(key: str) -> str:
    return "application/json" if key.endswith(".json") else "application/octet-stream"


class ArtifactStore(Protocol):
    """The operations the TUF repository needs; every key is a relative path."""

    @property
    def local_root(self) -> Path | None:
        """The directory that holds the keys as files, when there is one."""

    def describe(self) -> str: ...

    def read(self, key: str) -> bytes:
        """The object's bytes; ``NotFoundError`` when absent."""

    def write(self, key: str, data: bytes) -> None: ...

    def upload(self, key: str, source: Path) -> None:
        """Store the local file ``source`` under ``key``."""

    def download(self, key: str, dest: Path) -> None:
        """Copy ``key`` to the local file ``dest`` atomically; ``NotFoundError`` when absent."""

    def delete(self, key: str) -> None: ...


class LocalStore:
    """Files under one directory, written atomically (today's layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def local_root(self) -> Path | None:
        return self.root

    def describe(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as err:
            raise NotFoundError(f"{key} is not in {self.root}") from err
        except OSError as err:
            raise ArtifactStoreError(f"cannot read {key} in {self.root}: {err}", key) from err

    def write(self, key: str, data: bytes) -> None:
        atomic_write(self.path(key), data)

    def upload(self, key: str, source: Path) -> None:
        dest = self.path(key)
        if dest.exists() and Path(source).samefile(dest):
            return  # the repository's working copy is this store's file
        _copy_atomically(Path(source), dest)

    def download(self, key: str, dest: Path) -> None:
        src = self.path(key)
        if not src.is_file():
            raise NotFoundError(f"{key} is not in {self.root}")
        if Path(dest).exists() and src.samefile(dest):
            return
        _copy_atomically(src, Path(dest))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


class S3Store:
    """Objects in an S3-compatible bucket under ``prefix`` (AWS, MinIO, Ceph, R2...).

    Credentials and region come from boto3's usual sources (``AWS_ACCESS_KEY_ID``,
    profiles, instance roles); the endpoint from ``endpoint_url`` or ``$AWS_ENDPOINT_URL``.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        try:  # the optional extra "s3"
            import boto3  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
            from botocore.config import Config  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
            from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
        except ImportError as err:
            raise ConfigError("an s3:// artifact store needs boto3 (extra: edgefleet[s3])") from err
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get(S3_ENDPOINT_ENV) or None
        config = Config(retries={"max_attempts": 5, "mode": "standard"})
        self._s3: Any = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)

    @property
    def local_root(self) -> Path | None:
        return None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def object_key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, _URL_ROOT, key) if p)

    def _missing(self, err: Exception) -> bool:
        code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    def _fail(self, doing: str, key: str, err: Exception) -> ServerError:
        if self._missing(err):
            return NotFoundError(f"{key} is not in {self.describe()}")
        return ArtifactStoreError(f"cannot {doing} {key} in {self.describe()}: {err}", key)

    def read(self, key: str) -> bytes:
        try:
            reply = self._s3.get_object(Bucket=self.bucket, Key=self.object_key(key))
            data: bytes = reply["Body"].read()
        except self._errors as err:
            raise self._fail("read", key, err) from err
        return data

    def _extra(self, key: str) -> dict[str, str]:
        return {"CacheControl": cache_control(key), "ContentType": _content_type(key)}

    def write(self, key: str, data: bytes) -> None:
        try:
            self._s3.put_object(
                Bucket=self.bucket, Key=self.object_key(key), Body=data, **self._extra(key)
            )
        except self._errors as err:
            raise self._fail("write", key, err) from err

    def upload(self, key: str, source: Path) -> None:
        try:
            self._s3.upload_file(
                str(source), self.bucket, self.object_key(key), ExtraArgs=self._extra(key)
            )
        except self._errors as err:
            raise self._fail("upload", key, err) from err

    def download(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".download.", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self._s3.download_file(self.bucket, self.object_key(key), str(tmp))
            os.chmod(tmp, 0o644)
            commit_file(tmp, dest)
        except self._errors as err:
            raise self._fail("download", key, err) from err
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except self._errors as err:
            raise self._fail("delete", key, err) from err


def _copy_atomically(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".incoming.", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        commit_file(tmp, dest)
    except OSError as err:
        raise ArtifactStoreError(f"cannot copy {src} to {dest}: {err}", str(dest)) from err
    finally:
        tmp.unlink(missing_ok=True)


def open_store(spec: str | None, repo_dir: Path, endpoint_url: str | None = None) -> ArtifactStore:
    """``None`` or a path: a local directory (default ``repo_dir``); ``s3://bucket/prefix``."""
    if spec is None or spec == "":
        return LocalStore(repo_dir)
    parts = urlsplit(spec)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"artifact store {spec!r} names no bucket (s3://bucket/prefix)")
        return S3Store(parts.netloc, parts.path, endpoint_url)
    if parts.scheme in ("", "file"):
        return LocalStore(Path(parts.path).expanduser().resolve())
    raise ConfigError(f"artifact store {spec!r} must be a directory, file:// or s3:// URL")
