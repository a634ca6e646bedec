"""Auth, TLS, Info, health, metrics and graceful stop."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitlearn_async import __version__
from splitlearn_async import protocol as proto
from splitlearn_async.server import AsyncGRPCComputeServer, ServerConfig
from tests.support.rpc import (
    RawSession,
    channel,
    make_case,
    reference,
    run_session,
    unary,
)
from tests.support.waiting import wait_until


def good(steps=0, seed=0):
    return make_case(batch=1, prompt=3, steps=steps, hidden_size=64, seed=seed)


async def test_bearer_token(trunk):
    config = ServerConfig(auth_token="s3cret")
    async with AsyncGRPCComputeServer(trunk, config=config) as server, channel(server.port) as chan:
        case = good(steps=1)
        got = await run_session(chan, case, token="s3cret")
        assert all(torch.equal(g, e) for g, e in zip(got, reference(trunk, case)))
        for token in (None, "wrong"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await RawSession(chan, token).open(*case[0])
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(chan, proto.METHOD_INFO, proto.build_info_request(), token=token)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await unary(chan, proto.METHOD_INFO, proto.build_info_request(), token="s3cret")
        assert server.sessions_open == 0


def _self_signed(tmp_path):
    """A self-signed cert for localhost/127.0.0.1: with `cryptography` if installed, else the openssl CLI."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _self_signed_openssl(tmp_path)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    return cert_pem, str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")


def _self_signed_openssl(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert.read_bytes(), str(cert), str(key)


async def test_tls(trunk, tmp_path):
    cert_pem, cert_file, key_file = _self_signed(tmp_path)
    config = ServerConfig(tls_cert_file=cert_file, tls_key_file=key_file, auth_token="t")
    async with AsyncGRPCComputeServer(trunk, config=config) as server:
        async with channel(server.port, root_cert=cert_pem) as chan:
            case = good(steps=2)
            got = await run_session(chan, case, token="t")
            assert all(torch.equal(g, e) for g, e in zip(got, reference(trunk, case)))
        async with channel(server.port) as plain:  # plaintext to a TLS port fails
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(unary(plain, proto.METHOD_INFO, proto.build_info_request(), token="t"), 10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_info(trunk):
    async with AsyncGRPCComputeServer(trunk, config=ServerConfig(max_sessions=7)) as server, channel(server.port) as chan:
        info = proto.parse_info(await unary(chan, proto.METHOD_INFO, proto.build_info_request()))
        assert info["family"] == "llama" and info["model_type"] == "llama"
        assert info["layer_range"] == [2, 4] and info["hidden_size"] == 64
        assert info["dtype"] == "float32" and "float16" in info["wire_dtypes"]
        assert info["max_sessions"] == 7 and info["version"] == __version__
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(chan, proto.METHOD_INFO, b"\xc1")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_and_stop(trunk):
    server = AsyncGRPCComputeServer(trunk)
    await server.start()
    try:
        async with channel(server.port) as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            for service in ("", proto.SERVICE_NAME):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            case = good(steps=2)
            s = RawSession(chan)
            await s.open(*case[0])
            stopping = asyncio.create_task(server.stop(grace=5.0))
            await wait_until(lambda: server.context.stopping)
            # a drain: the open session's steps are still served, a new session is refused
            await s.step(*case[1])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await RawSession(chan).open(*case[0])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await s.close()
            await stopping
    finally:
        await server.stop()
    assert server.sessions_open == 0 and not server.worker.thread.is_alive()


async def test_metrics_endpoint(trunk):
    config = ServerConfig(metrics_port=0)
    async with AsyncGRPCComputeServer(trunk, config=config) as server, channel(server.port) as chan:
        await run_session(chan, good(steps=2))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    assert "splitlearn_trunk_sessions_open 0.0" in text
    assert "splitlearn_trunk_queue_depth" in text
    assert 'splitlearn_trunk_batch_size_count{model="default"} 3.0' in text
    assert 'splitlearn_trunk_step_latency_seconds_count{model="default"} 3.0' in text
    assert 'splitlearn_trunk_model_loaded{model="default"} 1.0' in text
