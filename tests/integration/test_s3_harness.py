"""The S3 test endpoint (moto server over real HTTP) works as the exports will use it."""

from __future__ import annotations

import uuid

import aioboto3
import httpx
from botocore.config import Config


async def test_multipart_upload_and_presigned_get(s3_endpoint: str) -> None:
    session = aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    bucket, key = f"test-{uuid.uuid4().hex[:8]}", "exports/org_a/2026/11/job.csv"
    part = b"x" * (5 * 1024 * 1024)
    async with session.client("s3", endpoint_url=s3_endpoint, config=Config(signature_version="s3v4")) as s3:
        await s3.create_bucket(Bucket=bucket)
        upload = await s3.create_multipart_upload(Bucket=bucket, Key=key)
        parts = []
        for number, body in enumerate((part, b"tail\r\n"), start=1):
            answer = await s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number,
                                          Body=body)  # fmt: skip
            parts.append({"ETag": answer["ETag"], "PartNumber": number})
        await s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                           MultipartUpload={"Parts": parts})  # fmt: skip
        url = await s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=60)
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    assert len(response.content) == len(part) + 6 and response.content.endswith(b"tail\r\n")
