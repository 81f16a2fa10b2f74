"""The S3 test infrastructure itself: moto over real HTTP, and each fault of the proxy as a boto3 client meets it."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ResponseStreamingError,
)
from urllib3.exceptions import ProtocolError

from tests.s3_server import FaultProxy, MotoServer, s3_client

# What a body cut short raises, depending on where botocore/urllib3 notices it.
TRUNCATED = (ResponseStreamingError, IncompleteReadError, ProtocolError, http.client.IncompleteRead)


def _bucket(url: str) -> str:
    return urlsplit(url).netloc


def test_environment_points_at_the_server(s3_server: MotoServer):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"


def test_put_get_round_trip(s3_bucket: str):
    client = s3_client()  # endpoint from AWS_ENDPOINT_URL, as code under test would get it
    bucket = _bucket(s3_bucket)
    client.put_object(Bucket=bucket, Key="dir/obj.bin", Body=b"\x00\x01payload\xff")
    assert client.get_object(Bucket=bucket, Key="dir/obj.bin")["Body"].read() == b"\x00\x01payload\xff"
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("dir/obj.bin", 10)]


def test_buckets_are_fresh(s3_bucket: str, s3_server: MotoServer):
    assert s3_client().list_objects_v2(Bucket=_bucket(s3_bucket))["KeyCount"] == 0


def test_proxy_forwards_faithfully(s3_bucket: str, fault_proxy: FaultProxy):
    client = s3_client(fault_proxy.endpoint)
    bucket = _bucket(s3_bucket)
    put = client.put_object(Bucket=bucket, Key="k", Body=b"abc" * 1000)
    head = client.head_object(Bucket=bucket, Key="k")
    assert head["ContentLength"] == 3000 and head["ETag"] == put["ETag"]
    client.delete_object(Bucket=bucket, Key="k")
    with pytest.raises(ClientError) as err:
        client.head_object(Bucket=bucket, Key="k")
    assert err.value.response["Error"]["Code"] == "404"
    assert fault_proxy.requests == 4 and fault_proxy.injected == 0
    assert [r.method for r in fault_proxy.history] == ["PUT", "HEAD", "DELETE", "HEAD"]
    assert len({r.client_port for r in fault_proxy.history}) == 1  # one keep-alive connection, error answer included
    # The Host header moto saw is the one the client signed: the proxy's own address.
    assert dict(fault_proxy.history[0].headers)["Host"] == urlsplit(fault_proxy.endpoint).netloc


def test_storm_every_kth_request(s3_bucket: str, fault_proxy: FaultProxy):
    # A non-throttling code keeps botocore's backoff short (50 ms scale instead of 1 s).
    fault_proxy.storm_every(3, status=500, code="InternalError")
    client = s3_client(fault_proxy.endpoint, max_attempts=10)
    for i in range(4):
        client.put_object(Bucket=_bucket(s3_bucket), Key=f"k{i}", Body=b"x")
    assert (fault_proxy.requests, fault_proxy.injected) == (5, 1)  # requests 1, 2, 3 (retried as 4), 5
    fault_proxy.clear()
    before = fault_proxy.requests
    for i in range(6):
        client.head_object(Bucket=_bucket(s3_bucket), Key=f"k{i % 4}")
    assert fault_proxy.requests - before == 6


def test_ranged_get_through_proxy(s3_bucket: str, fault_proxy: FaultProxy):
    data = bytes(range(256)) * 4
    s3_client().put_object(Bucket=_bucket(s3_bucket), Key="k", Body=data)
    got = s3_client(fault_proxy.endpoint).get_object(Bucket=_bucket(s3_bucket), Key="k", Range="bytes=100-299")
    assert got["Body"].read() == data[100:300]
    assert got["ContentRange"] == f"bytes 100-299/{len(data)}"
    assert got["ContentLength"] == 200
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206


def test_drop_cuts_the_body_of_the_next_ranged_get(s3_bucket: str, fault_proxy: FaultProxy):
    data = os.urandom(64 * 1024)
    s3_client().put_object(Bucket=_bucket(s3_bucket), Key="k", Body=data)
    client = s3_client(fault_proxy.endpoint)
    client.head_object(Bucket=_bucket(s3_bucket), Key="k")  # not a ranged GET: never dropped
    fault_proxy.drop(1)
    first = client.get_object(Bucket=_bucket(s3_bucket), Key="k", Range="bytes=0-40959")
    assert first["ContentLength"] == 40960  # the headers arrive whole ...
    with pytest.raises(TRUNCATED):
        first["Body"].read()  # ... the body does not
    second = client.get_object(Bucket=_bucket(s3_bucket), Key="k", Range="bytes=0-40959")
    assert second["Body"].read() == data[:40960]
    assert fault_proxy.injected == 1


def test_multipart_upload_through_proxy(s3_bucket: str, fault_proxy: FaultProxy):
    bucket = _bucket(s3_bucket)
    parts_data = [os.urandom(5 * 1024 * 1024), os.urandom(1234)]
    client = s3_client(fault_proxy.endpoint)
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
    parts = []
    for number, chunk in enumerate(parts_data, start=1):
        etag = client.upload_part(Bucket=bucket, Key="big", UploadId=upload_id, PartNumber=number, Body=chunk)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key="big", UploadId=upload_id, MultipartUpload={"Parts": parts})
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == b"".join(parts_data)
    assert fault_proxy.injected == 0


def test_chunked_request_body_is_forwarded_raw(s3_bucket: str, fault_proxy: FaultProxy):
    # botocore sends Content-Length bodies over plain http; a chunked body (other clients, aws-chunked over TLS)
    # must still reach the server framed as the client framed it.
    conn = http.client.HTTPConnection(*urlsplit(fault_proxy.endpoint).netloc.split(":"))
    conn.request("PUT", f"/{_bucket(s3_bucket)}/chunked", body=iter([b"hello ", b"chunked ", b"world"]))
    assert conn.getresponse().status == 200
    conn.close()
    sent = dict(fault_proxy.history[-1].headers)
    assert sent["Transfer-Encoding"] == "chunked" and "Content-Length" not in sent
    assert s3_client().get_object(Bucket=_bucket(s3_bucket), Key="chunked")["Body"].read() == b"hello chunked world"


def test_stopped_proxy_hangs_up_on_kept_alive_connections(s3_bucket: str, s3_server: MotoServer):
    proxy = FaultProxy(s3_server.endpoint)
    client = s3_client(proxy.endpoint, max_attempts=0)
    client.head_bucket(Bucket=_bucket(s3_bucket))  # leaves a keep-alive connection in the client's pool
    proxy.stop()
    with pytest.raises((EndpointConnectionError, ConnectionClosedError)):
        client.head_bucket(Bucket=_bucket(s3_bucket))
    assert proxy.requests == 1


def test_child_processes_inherit_the_environment(s3_bucket: str):
    code = "import sys, boto3; print(boto3.client('s3').list_objects_v2(Bucket=sys.argv[1])['KeyCount'])"
    s3_client().put_object(Bucket=_bucket(s3_bucket), Key="k", Body=b"x")
    out = subprocess.run([sys.executable, "-c", code, _bucket(s3_bucket)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
