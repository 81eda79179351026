"""Where export files live: an S3 bucket (:mod:`.s3`) or a local folder (:mod:`.local`), behind one protocol
(:mod:`.protocol`), with keys from :mod:`.keys`."""

from __future__ import annotations

from exports.storage.keys import InvalidKey, check_key, key_for
from exports.storage.local import LocalStorage
from exports.storage.protocol import MAX_LINK_TTL, ObjectMissing, Storage, Upload
from exports.storage.s3 import S3Storage, open_s3_storage

__all__ = [
    "MAX_LINK_TTL",
    "InvalidKey",
    "LocalStorage",
    "ObjectMissing",
    "S3Storage",
    "Storage",
    "Upload",
    "check_key",
    "key_for",
    "open_s3_storage",
]
