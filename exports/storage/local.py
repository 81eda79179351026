"""Exports in a local folder (no S3 bucket configured): atomic files and links signed for the gateway to serve.

An upload writes ``{name}.{random}.part`` beside its final path and renames it over the final path on
``complete`` (after fsync), so a reader sees the whole file or none; ``abort`` deletes the temporary file.
Links are ``{base_path}/{key}?expires=..&sig=..`` (:mod:`exports.signing`); the gateway's route calls
:meth:`LocalStorage.open_signed`, which checks the signature, the key's shape and that the path stays inside
the folder.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from exports import signing
from exports.storage.keys import PREFIX, InvalidKey, check_key
from exports.storage.protocol import ObjectMissing, check_ttl
from kernel.errors import Forbidden

READ_CHUNK = 1024 * 1024
BASE_PATH = "/exports/download"
_STALE_PART_S = 24 * 3600  # as S3's rule: a temporary file untouched for a day belongs to a dead worker


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LocalUpload:
    def __init__(self, final: Path, file: BinaryIO, temporary: Path) -> None:
        self._final, self._file, self._temporary = final, file, temporary
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._closed = False

    async def write(self, part: bytes) -> None:
        if self._closed:
            raise RuntimeError(f"upload of {self._final.name} is already closed")
        self._sha256.update(part)
        self._size += len(part)
        await self._guarded(asyncio.to_thread(self._file.write, part))

    async def complete(self) -> tuple[int, str]:
        if self._closed:
            raise RuntimeError(f"upload of {self._final.name} is already closed")
        await self._guarded(asyncio.to_thread(self._commit))
        self._closed = True
        return self._size, self._sha256.hexdigest()

    async def abort(self) -> None:
        self._closed = True
        await asyncio.to_thread(self._discard)

    async def _guarded(self, step: Awaitable[object]) -> None:
        try:
            await step
        except BaseException:  # cancellation too: no temporary file outlives a cancelled job
            await self.abort()
            raise

    def _commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._temporary.replace(self._final)
        _fsync_dir(self._final.parent)

    def _discard(self) -> None:
        self._file.close()
        self._temporary.unlink(missing_ok=True)


class LocalStorage:
    """Exports under ``root`` (keys start with ``exports/``, so the files live in ``root/exports/``)."""

    def __init__(
        self,
        root: Path,
        link_secret: str | bytes,
        *,
        base_path: str = BASE_PATH,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        signing.check_secret(link_secret)  # a short secret stops start-up, not the first download
        self.root = root
        self._secret = link_secret
        self._base_path = base_path.rstrip("/")
        self._clock = clock

    def path_of(self, key: str) -> Path:
        """The file of ``key``, refusing anything but an export key that stays inside the folder."""
        check_key(key)
        root = self.root.resolve()
        path = (root / key).resolve()
        if not path.is_relative_to(root / PREFIX.rstrip("/")):
            raise InvalidKey("not an export file")
        return path

    async def start(self, key: str) -> LocalUpload:
        final = self.path_of(key)
        temporary = final.with_name(f"{final.name}.{secrets.token_hex(8)}.part")

        def create() -> BinaryIO:
            final.parent.mkdir(parents=True, exist_ok=True)
            return temporary.open("xb")

        return LocalUpload(final, await asyncio.to_thread(create), temporary)

    async def abort_incomplete(self, key: str) -> int:
        final = self.path_of(key)

        def remove() -> int:
            stale = list(final.parent.glob(f"{final.name}.*.part")) if final.parent.is_dir() else []
            for path in stale:
                path.unlink(missing_ok=True)
            return len(stale)

        return await asyncio.to_thread(remove)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path_of(key).unlink, missing_ok=True)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_of(key).is_file)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        path = self.path_of(key)
        try:
            file = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise ObjectMissing(f"export file {key} is not in the store") from None
        try:
            while chunk := await asyncio.to_thread(file.read, READ_CHUNK):
                yield chunk
        finally:
            file.close()

    async def download_url(self, key: str, ttl: dt.timedelta) -> str:
        """A gateway path with an HMAC-signed expiry (the caller prefixes the public origin if it needs one)."""
        self.path_of(key)
        expires_at = self._clock() + dt.timedelta(seconds=check_ttl(ttl))
        query = urllib.parse.urlencode(
            {"expires": signing.expires_param(expires_at), "sig": signing.sign(key, expires_at, self._secret)}
        )
        return f"{self._base_path}/{urllib.parse.quote(key, safe='/')}?{query}"

    def open_for_download(self, key: str) -> Path:
        """The file to send for ``key``: :class:`InvalidKey` outside the folder, :class:`ObjectMissing` if absent."""
        path = self.path_of(key)
        if not path.is_file():
            raise ObjectMissing("export file not found")
        return path

    def open_signed(self, key: str, expires: str, sig: str) -> Path:
        """What the download route calls with the request's path and query: the file, or :class:`Forbidden`
        for a tampered or expired link (one message for both, so a probe learns nothing)."""
        if not signing.verify(key, expires, sig, self._secret, self._clock()):
            raise Forbidden("this download link is invalid or has expired")
        return self.open_for_download(key)

    async def ensure_lifecycle(self, expire_days: int) -> None:
        """The S3 rule, applied once (call it at start-up and from the sweeper): delete export files older than
        ``expire_days`` and temporary files untouched for a day."""
        if expire_days < 1:
            raise ValueError("expire_days must be at least 1")
        await asyncio.to_thread(self._sweep, time.time(), expire_days * 86400)

    def _sweep(self, now: float, max_age_s: float) -> None:
        folder = self.root / PREFIX.rstrip("/")
        if not folder.is_dir():
            return
        for path in folder.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            limit = _STALE_PART_S if path.name.endswith(".part") else max_age_s
            if now - path.stat().st_mtime > limit:
                path.unlink(missing_ok=True)
