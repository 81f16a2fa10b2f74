"""Shared fixtures. The S3 ones start nothing unless a test asks for them (moto is imported by its own subprocess)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.s3_server import AWS_UNSET, FaultProxy, MotoServer, s3_client, s3_environ


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """A moto S3 server for the session; ``os.environ`` points every client at it (children spawned by tests too).

    The previous values of the variables it sets or removes come back at the end of the session.
    """
    server = MotoServer()
    env = s3_environ(server.endpoint)
    saved = {name: os.environ.get(name) for name in (*env, *AWS_UNSET)}
    for name in AWS_UNSET:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> str:
    """A fresh, empty bucket on the session's server, as ``"s3://<name>"``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client(s3_server.endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def fault_proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of the session's server, with no fault set. Tests route clients through it
    themselves, e.g. ``monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)``."""
    proxy = FaultProxy(s3_server.endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()
