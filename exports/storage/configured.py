"""The store the settings name: S3 when ``ANALYTICS_S3_BUCKET`` is set, else a folder under the data dir.

The local folder's download links are signed with ``ANALYTICS_EXPORT_LINK_SECRET``; unset, a random key is
generated once into ``{data_dir}/export-link.key`` (mode 0600) and reused by every process sharing the data
dir, so links stay valid across restarts. Several gateways on different machines need the setting (or S3).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from exports.storage.local import LocalStorage
from exports.storage.protocol import Storage
from exports.storage.s3 import open_s3_storage
from kernel.settings import Settings

LINK_KEY_FILE = "export-link.key"


@asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    """The configured store, open for the caller's lifetime."""
    if settings.s3_bucket is not None:
        endpoint = str(settings.s3_endpoint_url) if settings.s3_endpoint_url is not None else None
        async with open_s3_storage(settings.s3_bucket, endpoint_url=endpoint, region=settings.s3_region) as store:
            yield store
        return
    yield local_storage(settings)


def local_storage(settings: Settings) -> LocalStorage:
    secret = settings.export_link_secret
    key = secret.get_secret_value() if secret is not None else link_key(settings.data_dir)
    return LocalStorage(settings.data_dir, key)


def link_key(data_dir: Path) -> str:
    """The data dir's link key, created on first use. Creation is atomic (``O_EXCL``): of several processes
    starting together, one writes the key and the others read it."""
    path = data_dir / LINK_KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the creator may not have written it yet
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.01)
        raise RuntimeError(f"{path} is empty; delete it to generate a new export link key") from None
    key = secrets.token_urlsafe(48)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key
