"""TLS, mutual TLS and bearer tokens on real servers, with certificates made in the test."""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import json
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rm_client import RetryPolicy, RewardClient, RewardServiceError, Security
from rm_client.samples import text_samples
from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc
from rm_server.launch import BIN, free_port, probe, start_server, stop_server
from rm_server.transport.security import read_token

NO_RETRY = RetryPolicy(max_attempts=1)


def _certificate(subject: str, key, issuer_name, issuer_key, ca: bool, hosts: tuple[str, ...] = ()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names = [x509.DNSName(h) if not h[0].isdigit() else x509.IPAddress(ipaddress.ip_address(h)) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost / 127.0.0.1, a client certificate, and a stranger's CA."""
    directory = tmp_path_factory.mktemp("pki")
    files = {}

    def write(name: str, cert, key) -> None:
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (directory / f"{name}.key").write_bytes(pem)
        files[name] = (str(directory / f"{name}.crt"), str(directory / f"{name}.key"))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, None, None, ca=True)
    write("ca", ca, ca_key)
    for name, hosts in (("server", ("localhost", "127.0.0.1")), ("client", ())):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, _certificate(name, key, ca.subject, ca_key, ca=False, hosts=hosts), key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    write("stranger", _certificate("stranger CA", other_key, None, None, ca=True), other_key)
    return files


def score(target: str, security: Security) -> float:
    with RewardClient(target, security=security, retry=NO_RETRY, timeout_s=10) as client:
        return float(client.score(["How was the food?"], ["Lovely."])[0])


def test_tls_and_mutual_tls(encoder_bundle, tmp_path, pki):
    cert, key = pki["server"]
    tls = start_server(encoder_bundle, tmp_path / "tls.log", "--tls-cert", cert, "--tls-key", key, secure=True)
    try:
        assert isinstance(score(f"localhost:{tls.port}", Security(tls=True, ca_file=pki["ca"][0])), float)
        with pytest.raises(RewardServiceError) as plaintext:
            score(f"localhost:{tls.port}", Security())
        assert plaintext.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RewardServiceError):  # a server certificate from a CA the client does not trust
            score(f"localhost:{tls.port}", Security(tls=True, ca_file=pki["stranger"][0]))
    finally:
        stop_server(tls)

    mutual = ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", pki["ca"][0]]
    mtls = start_server(encoder_bundle, tmp_path / "mtls.log", *mutual, secure=True)
    try:
        client_cert, client_key = pki["client"]
        trusted = Security(tls=True, ca_file=pki["ca"][0], cert_file=client_cert, key_file=client_key)
        assert isinstance(score(f"localhost:{mtls.port}", trusted), float)
        with pytest.raises(RewardServiceError):  # no client certificate
            score(f"localhost:{mtls.port}", Security(tls=True, ca_file=pki["ca"][0]))
        assert "mutual TLS" in mtls.log()
    finally:
        stop_server(mtls)


@pytest.mark.parametrize("token", [None, "wrong", "s3cret-token-but-longer", "s3cret-toke"])
def test_calls_without_the_right_token_are_unauthenticated(token_server, token):
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def calls() -> list[tuple[grpc.StatusCode, str]]:
        async with grpc.aio.insecure_channel(token_server.target) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            refusals = []

            async def nothing():  # the stream sends nothing: its refusal cannot race a write of ours
                await asyncio.Event().wait()
                yield pb.ScoreRequest()

            for call in (
                stub.Score(pb.ScoreRequest(samples=text_samples(["a"], ["b"])), metadata=metadata, timeout=30),
                stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=30),
                drain(stub.ScoreStream(nothing(), metadata=metadata, timeout=30)),
            ):
                try:
                    await call
                except grpc.aio.AioRpcError as e:
                    refusals.append((e.code(), e.details()))
            health = health_pb2_grpc.HealthStub(channel)
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status
            assert status == health_pb2.HealthCheckResponse.SERVING  # health stays open for probes by default
            return refusals

    refusals = asyncio.run(calls())
    assert len(refusals) == 3, refusals  # unary calls and the stream alike are refused
    assert all(code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details for code, details in refusals)


async def drain(stream) -> None:
    async for _ in stream:
        pass


def test_the_right_token_is_accepted_on_grpc_and_http(token_server):
    with RewardClient(token_server.target, security=Security(token="s3cret-token")) as client:
        assert client.score(["a"], ["b"]).shape == (1,)
        assert client.model_info().name == "toy"
    body = json.dumps({"query": ["Hi there"], "prompts": ["Hi"]}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(token_server.http_url, data=body), timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(token_server.http_url, data=body, headers={"Authorization": "Bearer s3cret-token"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert len(json.loads(answer.read())["rewards"]) == 1
    base = token_server.http_url.removesuffix("/get_reward")  # vLLM's routes: the same token, but not for probes
    for path, body in (("/classify", {"input": "Hi"}), ("/pooling", {"input": "Hi"}), ("/v1/models", None)):
        send = httpx.get if body is None else functools.partial(httpx.post, json=body)
        refused = send(base + path, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert refused.status_code == 401 and "bearer token" in refused.json()["error"]["message"]
        assert send(base + path, headers={"Authorization": "Bearer s3cret-token"}, timeout=10).status_code == 200
    assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_health_can_require_the_token_too(encoder_bundle, tmp_path):
    server = start_server(
        encoder_bundle, tmp_path / "serve.log", "--health-requires-auth", env={"RM_AUTH_TOKEN": "abc"}, token="abc"
    )
    try:
        with RewardClient(server.target, retry=NO_RETRY) as anonymous:
            with pytest.raises(RewardServiceError) as error:
                anonymous.health()
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        with RewardClient(server.target, security=Security(token="abc")) as client:
            assert client.health() == "SERVING"
        # the image's HEALTHCHECK carries the server's own token (RM_AUTH_TOKEN, as the container has it)
        assert probe(server.target, RM_AUTH_TOKEN="").stdout.strip() == "UNAUTHENTICATED"
        with_token = probe(server.target, RM_AUTH_TOKEN="abc")
        assert (with_token.returncode, with_token.stdout.strip()) == (0, "SERVING")
    finally:
        stop_server(server)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "x.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"], "cannot read /nonexistent"),
        (["--auth-token-file", "/nonexistent-token"], "--auth-token-file: cannot read"),
    ],
)
def test_bad_security_options_exit_2(encoder_bundle, flags, message):
    command = [str(BIN / "rm-serve"), "--bundle", str(encoder_bundle), "--metrics-port", "-1", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr


def test_the_token_from_the_environment_is_stripped(monkeypatch):
    """A token read with its trailing newline (RM_AUTH_TOKEN=$(cat file)) still matches: it is stripped."""
    monkeypatch.setenv("RM_AUTH_TOKEN", "s3cret\n")
    assert read_token(None) == "s3cret"
    monkeypatch.setenv("RM_AUTH_TOKEN", "  \n")
    assert read_token(None) is None


def test_calls_without_a_token_are_refused_before_their_message_is_read(token_server):
    """24 unauthenticated 60 MB Score calls are refused before their messages are read: receiving and
    parsing them first took 2.9 GB peak RSS and 6 s; refused first, ~270 MB and 1 s."""
    big = pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt="p", response="x" * (60 << 20)))])
    body = big.SerializeToString()
    channel = grpc.insecure_channel(token_server.target, options=[("grpc.max_send_message_length", 100 << 20)])
    call = channel.unary_unary("/reward.v1.RewardService/Score")

    def unauthenticated(_) -> str:
        try:
            call(body, timeout=60)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    with ThreadPoolExecutor(24) as pool:
        codes = set(pool.map(unauthenticated, range(24)))
    assert codes == {"UNAUTHENTICATED"}
    assert peak_rss_mib(token_server.process.pid) < 1024
    assert token_server.health() == health_pb2.HealthCheckResponse.SERVING


def peak_rss_mib(pid: int) -> float:
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_the_openrlhf_port_uses_the_grpc_ports_tls(encoder_bundle, tmp_path, pki):
    """With TLS on the gRPC port, the OpenRLHF port serves TLS too and refuses plaintext: the bearer token
    never crosses in clear."""
    import ssl

    cert, key = pki["server"]
    http_port = free_port()
    flags = ["--tls-cert", cert, "--tls-key", key, "--http-port", str(http_port)]
    server = start_server(encoder_bundle, tmp_path / "tls.log", *flags, secure=True)
    body = json.dumps({"query": ["How was it? Lovely."], "prompts": ["How was it?"]}).encode()
    try:
        context = ssl.create_default_context(cafile=pki["ca"][0])
        request = urllib.request.Request(f"https://localhost:{http_port}/get_reward", data=body)
        answer = json.loads(urllib.request.urlopen(request, timeout=10, context=context).read())
        assert len(answer["rewards"]) == 1
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext is not served
            urllib.request.urlopen(f"http://localhost:{http_port}/get_reward", data=body, timeout=10)
        assert f"HTTP (OpenRLHF, vLLM API) https://127.0.0.1:{http_port}" in server.log()
        vllm = httpx.post(f"https://localhost:{http_port}/classify", json={"input": "Lovely."}, verify=context)
        assert vllm.status_code == 200 and len(vllm.json()["data"]) == 1
    finally:
        stop_server(server)
