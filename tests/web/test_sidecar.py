from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from channels.instagram.signature import sign
from tests.gateway_harness import RunningGateway
from tests.web.conftest import SECRET, VERIFY, running_sidecar


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_sidecar(tmp_path, SWITCHBOARD_HTTP_MAX_BODY_BYTES="2048") as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_liveness_and_readiness(sidecar: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(sidecar.http_url + "/healthz") as reply:
        assert reply.status == 200
    async with http.get(sidecar.http_url + "/readyz") as reply:
        assert reply.status == 200
        assert (await reply.json())["status"] == "ready"


async def test_unknown_channel_is_404_naming_it(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(sidecar.http_url + "/webhooks/telegraph", data=b"{}") as reply:
        assert reply.status == 404
        assert "telegraph" in await reply.text()
    async with http.get(sidecar.http_url + "/oauth/telegraph/callback?code=x") as reply:
        assert reply.status == 404
        assert "telegraph" in await reply.text()


async def test_webhook_verification_echoes_the_challenge_only_for_the_right_token(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    params = {"hub.mode": "subscribe", "hub.challenge": "1158201444", "hub.verify_token": VERIFY}
    async with http.get(sidecar.http_url + "/webhooks/instagram", params=params) as reply:
        assert reply.status == 200
        assert reply.content_type == "text/plain"
        assert await reply.text() == "1158201444"
    params["hub.verify_token"] = "wrong"
    async with http.get(sidecar.http_url + "/webhooks/instagram", params=params) as reply:
        assert reply.status == 403


async def test_the_echoed_challenge_is_never_sniffed_as_another_type(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    challenge = "<html><script>alert(1)</script></html>"
    params = {"hub.mode": "subscribe", "hub.challenge": challenge, "hub.verify_token": VERIFY}
    async with http.get(sidecar.http_url + "/webhooks/instagram", params=params) as reply:
        assert reply.status == 200
        assert await reply.text() == challenge
        assert reply.content_type == "text/plain"
        assert reply.headers["X-Content-Type-Options"] == "nosniff"


def deliveries(outcome: str) -> float:
    labels = {"channel": "instagram", "outcome": outcome}
    return REGISTRY.get_sample_value("switchboard_webhook_deliveries_total", labels) or 0.0


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_400_and_counted(
    sidecar: RunningGateway,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    encoding: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    body = b'{"object":"instagram","entry":[]}'
    # Even signed: it is not authentic data until it decodes and its signature checks.
    headers = {"Content-Encoding": encoding, "X-Hub-Signature-256": sign(body, SECRET.encode())}
    before = deliveries("bad_encoding")
    async with http.post(
        sidecar.http_url + "/webhooks/instagram", data=body, headers=headers
    ) as reply:
        assert reply.status == 400
        assert await reply.text() == "the body does not decode as its Content-Encoding says\n"
    await asyncio.sleep(0.05)  # anything aiohttp would log after the answer

    assert deliveries("bad_encoding") == before + 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert any(r.getMessage() == "webhook body does not decode" for r in caplog.records)


async def test_compressed_webhooks_are_still_read_and_other_encodings_refused(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    body = b'{"object":"instagram","entry":[]}'
    signed = {"X-Hub-Signature-256": sign(body, SECRET.encode())}
    url = sidecar.http_url + "/webhooks/instagram"
    gzipped = {**signed, "Content-Encoding": "gzip"}
    async with http.post(url, data=gzip.compress(body), headers=gzipped) as reply:
        assert reply.status == 200
    # Without their decoders installed, aiohttp's parser answers these itself.
    for encoding in ("br", "zstd"):
        headers = {**signed, "Content-Encoding": encoding}
        async with http.post(url, data=body, headers=headers) as reply:
            assert reply.status == 400


async def test_forged_or_unsigned_webhooks_are_403(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    body = b'{"object":"instagram","entry":[]}'
    url = sidecar.http_url + "/webhooks/instagram"
    async with http.post(url, data=body) as reply:
        assert reply.status == 403
    forged = sign(body, b"not the app secret")
    async with http.post(url, data=body, headers={"X-Hub-Signature-256": forged}) as reply:
        assert reply.status == 403


async def test_a_signed_empty_delivery_is_acknowledged(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    body = b'{"object":"instagram","entry":[]}'
    headers = {"X-Hub-Signature-256": sign(body, SECRET.encode())}
    async with http.post(
        sidecar.http_url + "/webhooks/instagram", data=body, headers=headers
    ) as reply:
        # Nothing to store: acknowledged at once (tests/inbound covers real deliveries).
        assert reply.status == 200


async def test_bodies_over_the_limit_are_413(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(sidecar.http_url + "/webhooks/instagram", data=b"x" * 4096) as reply:
        assert reply.status == 413


async def test_access_log_never_prints_query_strings(
    sidecar: RunningGateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.http.access")
    url = sidecar.http_url + "/oauth/instagram/callback?code=SECRETCODE123&state=SECRETSTATE456"
    async with http.get(url) as reply:
        await reply.read()
    lines = [r for r in caplog.records if r.name == "gateway.http.access"]
    assert any(getattr(r, "path", "") == "/oauth/instagram/callback" for r in lines)
    assert "SECRETCODE123" not in caplog.text
    assert "SECRETSTATE456" not in caplog.text


def test_signature_matches_metas_test_vector() -> None:
    assert sign(b"Hello, World!", SECRET.encode()) == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


async def test_request_metrics_label_odd_methods_as_other(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    from prometheus_client import REGISTRY

    def count(route: str, method: str, status: str) -> float:
        labels = {"route": route, "method": method, "status": status}
        return REGISTRY.get_sample_value("switchboard_http_requests_total", labels) or 0.0

    before_get = count("/healthz", "GET", "200")
    before_other = count("unmatched", "OTHER", "405")
    async with http.get(sidecar.http_url + "/healthz") as reply:
        assert reply.status == 200
    for method in ("PROPFIND", "MKCOL"):
        async with http.request(method, sidecar.http_url + "/healthz") as reply:
            assert reply.status == 405
    assert count("/healthz", "GET", "200") == before_get + 1
    assert count("unmatched", "OTHER", "405") == before_other + 2
    assert count("unmatched", "PROPFIND", "405") == 0


async def test_each_request_gets_its_own_request_id_unless_it_brings_one(
    sidecar: RunningGateway, http: aiohttp.ClientSession
) -> None:
    made = set()
    for _ in range(3):
        async with http.get(sidecar.http_url + "/healthz") as reply:
            made.add(reply.headers["X-Request-Id"])
    assert len(made) == 3
    assert all(len(r) == 16 and int(r, 16) >= 0 for r in made)
    given = {"X-Request-Id": "from-the-caller-1"}
    async with http.get(sidecar.http_url + "/healthz", headers=given) as reply:
        assert reply.headers["X-Request-Id"] == "from-the-caller-1"
    # One that could pass for more of the log line is replaced, as on the gRPC side.
    forged = {"X-Request-Id": "x] WARNING gateway.services.inbound webhook refused"}
    async with http.get(sidecar.http_url + "/healthz", headers=forged) as reply:
        assert reply.headers["X-Request-Id"] != forged["X-Request-Id"]
        assert len(reply.headers["X-Request-Id"]) == 16
