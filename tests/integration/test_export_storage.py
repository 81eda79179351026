"""Export storage on the real moto S3 server over HTTP and in a local folder: multipart uploads whose sha256 is
that of the stored bytes, aborts that leave nothing, links that download and expire, the lifecycle rule; and
the object keys and signed links that guard the local folder."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exports import signing
from exports.csv_format import INCIDENT, encode_parts
from exports.storage import InvalidKey, LocalStorage, ObjectMissing, S3Storage, Storage, check_key, key_for
from exports.storage.keys import org_segment
from exports.storage.s3 import LIFECYCLE_RULE_ID, MIN_PART_SIZE, open_s3_storage
from kernel.errors import Forbidden

SECRET = "link-secret-" + "s" * 32
CREATED = dt.datetime(2026, 11, 3, 14, 5, tzinfo=dt.UTC)
MiB = 1024 * 1024


def new_key(org: str | None = "org_a") -> str:
    return key_for(org, CREATED, uuid.uuid4())


def csv_parts(rows: int, part_size: int) -> list[bytes]:
    """A real incident CSV cut into parts as the worker will send them."""
    start = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)
    source = (
        (start + dt.timedelta(microseconds=n), f"evt-{n}", "api", "org_a", "proj_1", "key_1", "gpt-4o", 200, None,
         12.5 + n, None, 1200, 100, 300, "=eu-west-1")
        for n in range(rows)
    )  # fmt: skip
    return list(encode_parts(INCIDENT, source, part_size=part_size))


async def read_all(storage: Storage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key)])


# --- S3 (moto over HTTP) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def bucket(s3: Any) -> str:
    name = f"exports-{uuid.uuid4().hex[:12]}"
    await s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
async def s3_storage(session: Any, s3_endpoint: str, bucket: str) -> AsyncIterator[S3Storage]:
    async with open_s3_storage(bucket, endpoint_url=s3_endpoint, region="us-east-1", session=session) as storage:
        yield storage


async def open_uploads(s3: Any, bucket: str, key: str | None = None) -> list[dict[str, Any]]:
    answer = await s3.list_multipart_uploads(Bucket=bucket)
    return [upload for upload in answer.get("Uploads", []) if key is None or upload["Key"] == key]


async def test_s3_multipart_upload_stores_exactly_the_bytes_whose_sha256_it_reports(
    s3_storage: S3Storage, s3: Any, bucket: str
) -> None:
    parts = csv_parts(120_000, MIN_PART_SIZE)
    assert len(parts) >= 3, "the file must need more than two parts"
    key = new_key()
    upload = await s3_storage.start(key)
    for part in parts:
        await upload.write(part)
    size, sha256 = await upload.complete()

    data = b"".join(parts)
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
    head = await s3.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith(f"-{len(parts)}")  # a multipart object of that many parts
    url = await s3_storage.download_url(key, dt.timedelta(minutes=15))
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == sha256
    assert response.headers["content-disposition"] == f'attachment; filename="{key.rsplit("/", 1)[1]}"'
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert hashlib.sha256(await read_all(s3_storage, key)).hexdigest() == sha256
    assert await open_uploads(s3, bucket, key) == []


async def test_s3_small_file_is_one_put_and_small_writes_are_buffered_to_the_part_minimum(
    s3_storage: S3Storage, s3: Any, bucket: str
) -> None:
    key = new_key()
    upload = await s3_storage.start(key)
    for part in csv_parts(50, 512):
        await upload.write(part)
    size, sha256 = await upload.complete()
    head = await s3.head_object(Bucket=bucket, Key=key)
    assert "-" not in head["ETag"] and head["ContentLength"] == size
    assert hashlib.sha256(await read_all(s3_storage, key)).hexdigest() == sha256

    key = new_key()
    upload = await s3_storage.start(key)
    for _ in range(12):  # 1 MiB writes: two parts of >= 5 MiB, then a 2 MiB tail
        await upload.write(os.urandom(MiB))
    size, _ = await upload.complete()
    head = await s3.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3") and size == 12 * MiB


async def test_s3_abort_leaves_no_object_and_no_multipart_upload(s3_storage: S3Storage, s3: Any, bucket: str) -> None:
    key = new_key()
    upload = await s3_storage.start(key)
    await upload.write(os.urandom(6 * MiB))
    assert len(await open_uploads(s3, bucket, key)) == 1  # the part went up: there is something to abort
    await upload.abort()
    await upload.abort()  # idempotent
    assert await open_uploads(s3, bucket, key) == []
    assert not await s3_storage.exists(key)


class CorruptingClient:
    """The real client, except that completing a multipart upload names a part S3 never received."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def complete_multipart_upload(self, **kwargs: Any) -> Any:
        kwargs["MultipartUpload"]["Parts"][0]["ETag"] = '"00000000000000000000000000000000"'
        return await self._client.complete_multipart_upload(**kwargs)


async def test_s3_a_failed_completion_aborts_the_upload(s3: Any, bucket: str) -> None:
    storage = S3Storage(CorruptingClient(s3), bucket)
    key = new_key()
    upload = await storage.start(key)
    await upload.write(os.urandom(6 * MiB))
    await upload.write(b"tail")
    with pytest.raises(Exception, match=r"InvalidPart|part"):
        await upload.complete()
    assert await open_uploads(s3, bucket, key) == []
    assert not await storage.exists(key)


class TruncatingClient(CorruptingClient):
    """The real client, except that a single-request upload loses its last byte on the way."""

    async def put_object(self, **kwargs: Any) -> Any:
        kwargs["Body"] = kwargs["Body"][:-1]
        return await self._client.put_object(**kwargs)


async def test_s3_completion_checks_the_stored_size(s3: Any, bucket: str) -> None:
    upload = await S3Storage(TruncatingClient(s3), bucket).start(new_key())
    await upload.write(b"a,b\r\n")
    with pytest.raises(RuntimeError, match=r"stored 4 bytes of .*, wrote 5"):
        await upload.complete()


async def test_s3_a_cancelled_write_aborts_the_upload(s3_storage: S3Storage, s3: Any, bucket: str) -> None:
    key = new_key()
    upload = await s3_storage.start(key)
    await upload.write(os.urandom(6 * MiB))  # the multipart upload exists now
    writing = asyncio.ensure_future(upload.write(os.urandom(6 * MiB)))
    await asyncio.sleep(0)  # let the second part start
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert await open_uploads(s3, bucket, key) == []


async def test_s3_abort_incomplete_removes_what_a_dead_worker_left(s3_storage: S3Storage, s3: Any, bucket: str) -> None:
    key, other = new_key(), new_key()
    for name in (key, key, other):
        await s3.create_multipart_upload(Bucket=bucket, Key=name)
    assert await s3_storage.abort_incomplete(key) == 2
    assert await open_uploads(s3, bucket, key) == []
    assert len(await open_uploads(s3, bucket, other)) == 1
    assert await s3_storage.abort_incomplete(other) == 1


async def test_s3_delete_exists_and_a_missing_object(s3_storage: S3Storage) -> None:
    key = new_key()
    upload = await s3_storage.start(key)
    await upload.write(b"a,b\r\n")
    await upload.complete()
    assert await s3_storage.exists(key)
    await s3_storage.delete(key)
    await s3_storage.delete(key)  # idempotent
    assert not await s3_storage.exists(key)
    with pytest.raises(ObjectMissing):
        await read_all(s3_storage, key)


async def test_s3_presigned_url_is_sigv4_with_the_ttl_and_at_most_seven_days(s3_storage: S3Storage) -> None:
    key = new_key()
    url = await s3_storage.download_url(key, dt.timedelta(seconds=1))
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-Expires"] == "1"
    assert query["X-Amz-Credential"].endswith("/us-east-1/s3/aws4_request")
    signed_at = dt.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - signed_at).total_seconds()) < 60
    assert "test" not in query["X-Amz-Signature"]  # the secret key never appears, only its signature
    await s3_storage.download_url(key, dt.timedelta(days=7))
    for ttl in (dt.timedelta(days=7, seconds=1), dt.timedelta(0), dt.timedelta(seconds=-5)):
        with pytest.raises(ValueError, match="between 1 second and 7 days"):
            await s3_storage.download_url(key, ttl)


async def test_s3_lifecycle_rule_expires_exports_and_aborts_uploads_and_keeps_other_rules(
    s3_storage: S3Storage, s3: Any, bucket: str
) -> None:
    other = {"ID": "someone-else", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 3}}
    await s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [other]})
    await s3_storage.ensure_lifecycle(30)
    await s3_storage.ensure_lifecycle(45)  # replaces its own rule, never adds a second
    rules = {rule["ID"]: rule for rule in (await s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]}
    assert set(rules) == {"someone-else", LIFECYCLE_RULE_ID}
    ours = rules[LIFECYCLE_RULE_ID]
    assert ours["Filter"] == {"Prefix": "exports/"} and ours["Status"] == "Enabled"
    assert ours["Expiration"] == {"Days": 45}
    assert ours["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    with pytest.raises(ValueError):
        await s3_storage.ensure_lifecycle(0)


# --- local folder ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def local(tmp_path: Path, clock: Clock) -> LocalStorage:
    return LocalStorage(tmp_path / "data", SECRET, clock=clock)


def split_link(url: str) -> tuple[str, str, str]:
    parts = urllib.parse.urlsplit(url)
    assert parts.path.startswith("/exports/download/")
    query = dict(urllib.parse.parse_qsl(parts.query))
    return urllib.parse.unquote(parts.path.removeprefix("/exports/download/")), query["expires"], query["sig"]


async def test_local_upload_is_atomic_and_reports_the_sha256_of_the_file(local: LocalStorage) -> None:
    parts = csv_parts(3_000, 64 * 1024)
    assert len(parts) > 2
    key = new_key()
    upload = await local.start(key)
    for part in parts:
        await upload.write(part)
    final = local.root / key
    assert not final.exists()  # nothing under the final name before complete
    size, sha256 = await upload.complete()
    data = final.read_bytes()
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest()) and data == b"".join(parts)
    assert [path.name for path in final.parent.iterdir()] == [final.name]  # no temporary file left
    assert await read_all(local, key) == data
    assert await local.exists(key)


async def test_local_abort_and_abort_incomplete_leave_nothing(local: LocalStorage) -> None:
    key = new_key()
    upload = await local.start(key)
    await upload.write(b"x" * 1000)
    await upload.abort()
    await upload.abort()
    folder = (local.root / key).parent
    assert list(folder.iterdir()) == [] and not await local.exists(key)

    dead = [await local.start(key), await local.start(key)]  # workers that died mid-upload
    assert len(list(folder.iterdir())) == 2
    assert await local.abort_incomplete(key) == 2
    assert list(folder.iterdir()) == []
    for upload in dead:
        await upload.abort()  # closes the file a dead process would have left open


async def test_local_delete_and_a_missing_file(local: LocalStorage) -> None:
    key = new_key()
    upload = await local.start(key)
    await upload.write(b"a\r\n")
    await upload.complete()
    await local.delete(key)
    await local.delete(key)
    assert not await local.exists(key)
    with pytest.raises(ObjectMissing):
        await read_all(local, key)
    with pytest.raises(ObjectMissing):
        local.open_for_download(key)


async def test_local_link_downloads_until_it_expires_and_refuses_tampering(local: LocalStorage, clock: Clock) -> None:
    key = new_key()
    upload = await local.start(key)
    await upload.write(b"a,b\r\n")
    await upload.complete()
    url = await local.download_url(key, dt.timedelta(seconds=1))
    link_key, expires, sig = split_link(url)
    assert link_key == key
    assert local.open_signed(link_key, expires, sig) == (local.root / key).resolve()

    other = new_key()
    tampered = [
        (other, expires, sig),  # another file
        (link_key, str(int(expires) + 3600), sig),  # a later expiry
        (link_key, expires, sig[:-1] + ("A" if sig[-1] != "A" else "B")),
        (link_key, expires, ""),
        (link_key, "１２３", sig),  # non-ASCII digits
        (link_key, "9" * 40, sig),
        (link_key, expires, "é" * 43),
    ]
    for arguments in tampered:
        with pytest.raises(Forbidden):
            local.open_signed(*arguments)

    clock.now += dt.timedelta(seconds=2)  # the link's second is over
    with pytest.raises(Forbidden, match="invalid or has expired"):
        local.open_signed(link_key, expires, sig)
    with pytest.raises(ValueError, match="between 1 second and 7 days"):
        await local.download_url(key, dt.timedelta(days=8))


async def test_local_link_expires_on_the_real_clock(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, SECRET)
    key = new_key()
    _, expires, sig = split_link(await storage.download_url(key, dt.timedelta(seconds=1)))
    assert signing.verify(key, expires, sig, SECRET, dt.datetime.now(dt.UTC))
    deadline = time.monotonic() + 5
    while time.time() < int(expires):  # await the instant itself, not a guessed sleep
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert not signing.verify(key, expires, sig, SECRET, dt.datetime.now(dt.UTC))


@pytest.mark.parametrize(
    "key",
    [
        "exports/../../etc/passwd",
        "/etc/passwd",
        "exports/org_a/2026/11/../../../../x.csv",
        "exports/../2026/11/00000000-0000-0000-0000-000000000000.csv",
        "exports/./2026/11/00000000-0000-0000-0000-000000000000.csv",
        "exports/org\x00/2026/11/00000000-0000-0000-0000-000000000000.csv",
        "exports/org_a/2026/11/00000000-0000-0000-0000-000000000000.csv\x00.txt",
        "exports/org_a/2026/13/00000000-0000-0000-0000-000000000000.csv",
        "exports/org_a/2026/11/notes.txt",
        "pgdata/postgresql.conf",
        "exports/org_a//2026/11/00000000-0000-0000-0000-000000000000.csv",
        "exports\\org_a\\2026\\11\\00000000-0000-0000-0000-000000000000.csv",
    ],
)
def test_local_refuses_keys_outside_the_exports(local: LocalStorage, key: str) -> None:
    with pytest.raises(InvalidKey):
        local.open_for_download(key)


def test_local_refuses_a_symlink_out_of_the_folder(local: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "2026" / "11").mkdir(parents=True)
    key = "exports/org_a/2026/11/00000000-0000-0000-0000-000000000000.csv"
    (outside / "2026" / "11" / key.rsplit("/", 1)[1]).write_text("secret")
    (local.root / "exports").mkdir(parents=True)
    (local.root / "exports" / "org_a").symlink_to(outside)
    with pytest.raises(InvalidKey):
        local.open_for_download(key)


async def test_local_lifecycle_deletes_old_exports_and_stale_temporary_files(local: LocalStorage) -> None:
    old, fresh = new_key("org_old"), new_key("org_fresh")
    for key in (old, fresh):
        upload = await local.start(key)
        await upload.write(b"x")
        await upload.complete()
    live = await local.start(fresh)  # a fresh temporary file: a live upload, kept
    stale = await local.start(old)
    await stale.write(b"y")
    day = 86_400
    os.utime(local.root / old, (time.time() - 31 * day,) * 2)
    for path in (local.root / old).parent.glob("*.part"):
        os.utime(path, (time.time() - 2 * day,) * 2)
    await local.ensure_lifecycle(30)
    assert not (local.root / old).exists() and (local.root / fresh).exists()
    assert list((local.root / old).parent.glob("*.part")) == []
    assert len(list((local.root / fresh).parent.glob("*.part"))) == 1
    await live.abort()
    await stale.abort()


def test_local_storage_refuses_a_short_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        LocalStorage(tmp_path, "short")


def test_both_stores_are_storages(local: LocalStorage, s3_storage: S3Storage) -> None:
    stores: list[Storage] = [local, s3_storage]  # mypy checks the protocol; this checks the runtime surface
    for store in stores:
        for name in ("start", "abort_incomplete", "delete", "exists", "read", "download_url", "ensure_lifecycle"):
            assert callable(getattr(store, name))


# --- keys and signatures -----------------------------------------------------------------------------------


def test_keys_follow_the_contract() -> None:
    job = uuid.UUID("0b7c6a1e-53a4-4f5c-9a35-1d2b4c6e8f00")
    assert key_for("org_a", CREATED, job) == f"exports/org_a/2026/11/{job}.csv"
    assert key_for(None, CREATED, job) == f"exports/_all/2026/11/{job}.csv"
    late_evening = dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2)))
    assert key_for("org_a", late_evening, job) == f"exports/org_a/2026/12/{job}.csv"  # the UTC month
    with pytest.raises(ValueError):
        key_for("org_a", dt.datetime(2026, 11, 3), job)


@pytest.mark.parametrize(
    ("org", "segment"), [("..", "%2E."), (".", "%2E"), ("_all", "%5Fall"), ("a:b-c.d_e", "a:b-c.d_e"), ("a/b", "a%2Fb")]
)
def test_org_segments_never_escape_or_collide(org: str, segment: str) -> None:
    assert org_segment(org) == segment


@given(st.text(alphabet="abcXYZ019._:-/%é\x00", min_size=1, max_size=12))
def test_every_org_id_gives_a_key_that_check_key_accepts_in_a_folder_of_its_own(org: str) -> None:
    key = key_for(org, CREATED, uuid.UUID(int=7))
    assert check_key(key) == key
    segment = key.split("/")[1]
    assert segment not in {".", "..", "_all"} and "/" not in segment
    assert urllib.parse.unquote(segment) == org  # the escape is reversible, so no two orgs share a folder


def test_signatures_cover_key_and_expiry_and_need_a_long_secret() -> None:
    now = dt.datetime(2026, 11, 3, 12, tzinfo=dt.UTC)
    expires_at = now + dt.timedelta(minutes=15)
    expires = signing.expires_param(expires_at)
    sig = signing.sign("k", expires_at, SECRET)
    assert signing.verify("k", expires, sig, SECRET, now)
    assert signing.verify("k", str(expires), sig, SECRET, now)
    assert not signing.verify("k2", expires, sig, SECRET, now)
    assert not signing.verify("k", expires + 1, sig, SECRET, now)
    assert not signing.verify("k", expires, sig, SECRET + "x", now)
    assert not signing.verify("k", expires, sig, SECRET, expires_at)  # the expiry instant itself is too late
    assert signing.expires_param(now + dt.timedelta(seconds=1, microseconds=1)) == int(now.timestamp()) + 2
    with pytest.raises(ValueError):
        signing.sign("k", expires_at, "short")
