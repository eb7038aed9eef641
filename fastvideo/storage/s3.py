"""`S3Store`: an `ArtifactStore` in an S3 bucket (AWS, SeaweedFS, MinIO, ...).

Credentials and endpoint come from boto3's standard chain (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, instance roles, ...);
this module never receives, stores or prints a secret. A single PUT is atomic
in S3, so a reader never sees a partial object.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from fastvideo.storage.base import ArtifactStore, check_key
from fastvideo.storage.errors import ObjectNotFoundError, StoreError, StoreUnavailableError

_ACCESS_DENIED_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AllAccessDisabled",
    }
)
_MISSING_KEY_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Refused, timed out, dropped mid-transfer: the network, not the request, is at fault.
_TRANSIENT_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError)
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
)


class S3Store(ArtifactStore):
    """Objects live under `s3://bucket/prefix/`. Opening checks access (nothing is written)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        """`max_attempts` counts botocore's own tries per request, the first included.

        Small timeouts make an unreachable endpoint fail in seconds, as a
        `StoreUnavailableError` that `retry_io` can retry at a coarser grain.
        """
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
        )
        self._client: Any = boto3.session.Session().client("s3", config=config)
        self._check_access()

    @classmethod
    def from_uri(cls, uri: str) -> S3Store:
        parts = urlsplit(uri)
        if not parts.netloc:
            raise ValueError(f"S3 URI {uri!r} has no bucket; use s3://bucket/prefix")
        return cls(parts.netloc, parts.path)

    @property
    def root_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def endpoint_url(self) -> str:
        return str(self._client.meta.endpoint_url)

    def __repr__(self) -> str:
        return f"S3Store({self.root_uri!r}, endpoint={self.endpoint_url!r})"

    def _check_access(self) -> None:
        # A GET (not HEAD_bucket) because its error body names the cause,
        # e.g. SignatureDoesNotMatch vs InvalidAccessKeyId.
        with self._errors("list"):
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._full(""), MaxKeys=1)

    def _full(self, key: str) -> str:
        if not key:
            return f"{self.prefix}/" if self.prefix else ""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("put", key):
            self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

    def put_file(self, key: str, path: str | Path) -> None:
        # One streamed PUT (up to 5 GB): atomic, unlike a multipart upload's parts.
        with open(path, "rb") as f, self._errors("put", key):
            self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=f)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("get", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
            return bytes(response["Body"].read())

    def get_file(self, key: str, path: str | Path) -> None:
        dest = Path(path)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        try:
            with os.fdopen(fd, "wb") as f, self._errors("get", key):
                response = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
                shutil.copyfileobj(response["Body"], f)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        try:
            with self._errors("head", key):
                self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ObjectNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        root = self._full("")
        keys: list[str] = []
        with self._errors("list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix
            )
            for page in pages:
                keys.extend(obj["Key"][len(root) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore errors into the store's exceptions, naming bucket and cause."""
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, action, key) from exc

    def _translate(self, exc: Exception, action: str, key: str | None) -> StoreError:
        bucket = f"bucket {self.bucket!r}"
        what = f"{action} {self.uri(key)}" if key else f"{action} in {bucket}"
        if isinstance(exc, NoCredentialsError):
            return StoreError(
                f"no AWS credentials for {bucket}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"
            )
        if isinstance(exc, _TRANSIENT_ERRORS):
            return StoreUnavailableError(
                f"S3 endpoint {self.endpoint_url} unreachable for {what} ({type(exc).__name__})"
            )
        if not isinstance(exc, ClientError):
            return StoreError(f"S3 {what} failed ({type(exc).__name__}: {exc})")
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if code == "NoSuchBucket":
            return StoreError(f"{bucket} does not exist at {self.endpoint_url}")
        if code in _ACCESS_DENIED_CODES or status == 403:
            return StoreError(f"access denied to {bucket} ({code}): check AWS credentials")
        if key is not None and (code in _MISSING_KEY_CODES or status == 404):
            return ObjectNotFoundError(f"no object {self.uri(key)}")
        if code in _TRANSIENT_CODES or status >= 500:
            return StoreUnavailableError(f"S3 {what} failed ({code}, HTTP {status}); retry later")
        return StoreError(f"S3 {what} failed ({code}: {error.get('Message', '')})")
