"""Exports in an S3 bucket through aioboto3: multipart uploads, SigV4 presigned GETs, a lifecycle rule.

Credentials come from the usual AWS chain (environment, shared config, instance or task role); the endpoint,
bucket and region are explicit. Parts are buffered to S3's 5 MiB minimum (the last may be smaller); a file
under 5 MiB is one ``PutObject``, so a small export never opens a multipart upload. Any failure while writing
or completing aborts the multipart upload before the error propagates, and the lifecycle rule aborts any
upload a killed worker left behind after one day (``abort_incomplete`` does it at once for one key).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aioboto3
import structlog
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from exports.storage.keys import PREFIX
from exports.storage.protocol import ObjectMissing, check_ttl

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
READ_CHUNK = 1024 * 1024
LIFECYCLE_RULE_ID = "analytics-gateway-exports"
_MISSING = {"404", "NoSuchKey", "NotFound"}

log = structlog.get_logger(__name__)


def _is_missing(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code")) in _MISSING


class S3Upload:
    """One object being written: a ``PutObject`` if it stays under 5 MiB, else a multipart upload."""

    def __init__(self, s3: Any, bucket: str, key: str) -> None:
        self._s3, self._bucket, self._key = s3, bucket, key
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._closed = False

    async def write(self, part: bytes) -> None:
        if self._closed:
            raise RuntimeError(f"upload of {self._key} is already closed")
        self._sha256.update(part)
        self._size += len(part)
        self._pending.append(part)
        self._pending_size += len(part)
        if self._pending_size >= MIN_PART_SIZE:
            await self._guarded(self._flush())

    async def complete(self) -> tuple[int, str]:
        if self._closed:
            raise RuntimeError(f"upload of {self._key} is already closed")
        await self._guarded(self._finish())
        self._closed = True
        return self._size, self._sha256.hexdigest()

    async def abort(self) -> None:
        self._closed = True
        self._pending.clear()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            await self._s3.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=upload_id)

    async def _guarded(self, step: Any) -> None:
        try:
            await step
        except BaseException:  # cancellation too: a cancelled job must not leave its parts behind
            try:
                await self.abort()
            except (BotoCoreError, ClientError) as error:  # report the first error; the lifecycle rule cleans up
                log.warning("export.abort_failed", key=self._key, error=type(error).__name__)
            raise

    def _take_pending(self) -> bytes:
        body = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._pending_size = [], 0
        return body

    async def _flush(self) -> None:
        if self._upload_id is None:
            answer = await self._s3.create_multipart_upload(Bucket=self._bucket, Key=self._key, ContentType="text/csv")
            self._upload_id = answer["UploadId"]
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise ValueError(f"an export has at most {MAX_PARTS} parts: the file is too large for its part size")
        answer = await self._s3.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=self._take_pending()
        )
        self._parts.append({"ETag": answer["ETag"], "PartNumber": number})

    async def _finish(self) -> None:
        if self._upload_id is None:
            await self._s3.put_object(
                Bucket=self._bucket, Key=self._key, Body=self._take_pending(), ContentType="text/csv"
            )
        else:
            if self._pending:
                await self._flush()
            await self._s3.complete_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
            )
            self._upload_id = None
        head = await self._s3.head_object(Bucket=self._bucket, Key=self._key)
        if head["ContentLength"] != self._size:  # never report success for an object that is not what we wrote
            raise RuntimeError(f"stored {head['ContentLength']} bytes of {self._key}, wrote {self._size}")


class S3Storage:
    """Exports in one bucket, through an open aioboto3 S3 client (see :func:`open_s3_storage`)."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self._s3 = s3
        self.bucket = bucket

    async def start(self, key: str) -> S3Upload:
        return S3Upload(self._s3, self.bucket, key)

    async def abort_incomplete(self, key: str) -> int:
        answer = await self._s3.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        stale = [upload for upload in answer.get("Uploads", []) if upload["Key"] == key]
        for upload in stale:
            await self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])
        return len(stale)

    async def delete(self, key: str) -> None:
        await self._s3.delete_object(Bucket=self.bucket, Key=key)

    async def exists(self, key: str) -> bool:
        try:
            await self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _is_missing(error):
                return False
            raise
        return True

    async def read(self, key: str) -> AsyncIterator[bytes]:
        try:
            answer = await self._s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _is_missing(error):
                raise ObjectMissing(f"export file {key} is not in the store") from None
            raise
        body = answer["Body"]
        async with body:
            async for chunk in body.iter_chunks(READ_CHUNK):
                yield chunk

    async def download_url(self, key: str, ttl: dt.timedelta) -> str:
        """A SigV4 presigned GET. Signed with temporary credentials (a role), it also ends when they do."""
        params = {
            "Bucket": self.bucket,
            "Key": key,
            "ResponseContentDisposition": f'attachment; filename="{posixpath.basename(key)}"',
            "ResponseContentType": "text/csv; charset=utf-8",
        }
        url: str = await self._s3.generate_presigned_url("get_object", Params=params, ExpiresIn=check_ttl(ttl))
        return url

    async def ensure_lifecycle(self, expire_days: int) -> None:
        """Expire ``exports/`` objects after ``expire_days`` and abort incomplete uploads after one day.

        Other rules of the bucket are kept: only the rule with this service's id is replaced.
        """
        if expire_days < 1:
            raise ValueError("expire_days must be at least 1")
        rules = [rule for rule in await self._lifecycle_rules() if rule.get("ID") != LIFECYCLE_RULE_ID]
        rules.append(
            {
                "ID": LIFECYCLE_RULE_ID,
                "Filter": {"Prefix": PREFIX},
                "Status": "Enabled",
                "Expiration": {"Days": expire_days},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
            }
        )
        await self._s3.put_bucket_lifecycle_configuration(Bucket=self.bucket, LifecycleConfiguration={"Rules": rules})

    async def _lifecycle_rules(self) -> list[dict[str, Any]]:
        try:
            answer = await self._s3.get_bucket_lifecycle_configuration(Bucket=self.bucket)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
                return []
            raise
        return list(answer.get("Rules", []))


def client_config(endpoint_url: str | None) -> Config:
    """SigV4 (as AWS signs), bounded retries and timeouts; path-style addressing for a custom endpoint (MinIO,
    moto), whose host names rarely resolve per bucket."""
    return Config(
        signature_version="s3v4",
        retries={"max_attempts": 4, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )


@asynccontextmanager
async def open_s3_storage(
    bucket: str, *, endpoint_url: str | None = None, region: str | None = None, session: Any = None
) -> AsyncIterator[S3Storage]:
    """An :class:`S3Storage` on a client opened for the caller's lifetime (the app's lifespan)."""
    session = session or aioboto3.Session()
    config = client_config(endpoint_url)
    async with session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config) as s3:
        yield S3Storage(s3, bucket)
