"""What the service's logging (configure_logging, both formats) lets through: no query
string from aiohttp's own lines, no SQL parameters at debug."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp.log
import aiosqlite
import pytest

from gateway.observability.logging import configure_logging
from tests.gateway_harness import RunningGateway
from tests.web.conftest import running_sidecar

CODE = "AQlongcode" + "Z" * 9000
TOKEN = "EAAGsecrettoken" + "Y" * 9000
# Every logger aiohttp writes to.
AIOHTTP_LOGGERS = [v.name for v in vars(aiohttp.log).values() if isinstance(v, logging.Logger)]


@contextlib.contextmanager
def service_logging(fmt: str, level: str = "debug") -> Iterator[io.StringIO]:
    """configure_logging as the service calls it, its handler writing to a buffer; the
    root's handlers and every logger's level and filters restored afterwards."""
    buffer = io.StringIO()
    root = logging.getLogger()
    for name in ("aiosqlite", "psycopg", "asyncio", "grpc._cython", *AIOHTTP_LOGGERS):
        logging.getLogger(name)  # created now, so that they are restored too
    loggers = [root, *logging.Logger.manager.loggerDict.values()]
    saved = [(lg, lg.level, list(lg.filters)) for lg in loggers if isinstance(lg, logging.Logger)]
    handlers = list(root.handlers)
    configure_logging(level, fmt)
    (ours,) = root.handlers
    assert isinstance(ours, logging.StreamHandler)
    ours.setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        for lg, lvl, filters in saved:
            lg.setLevel(lvl)
            lg.filters[:] = filters


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_sidecar(tmp_path) as running:
        yield running


async def raw_request(gw: RunningGateway, request: bytes) -> bytes:
    assert gw.listening.http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listening.http.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


OVER_LONG = {
    "target": (
        f"GET /oauth/instagram/callback?code={CODE}&state=S HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode(),
    "header": (
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    ).encode(),
}


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("where", ["target", "header"])
async def test_an_over_long_request_line_never_reaches_the_logs(
    sidecar: RunningGateway, fmt: str, where: str
) -> None:
    with service_logging(fmt) as captured:
        reply = await raw_request(sidecar, OVER_LONG[where])
        await asyncio.sleep(0.05)  # the access log line follows the answer
    text = captured.getvalue()

    assert reply.startswith(b"HTTP/1.")
    assert b" 400 " in reply.split(b"\r\n", 1)[0]
    for secret in ("AQlongcode", "ZZZZZZZZ", "EAAGsecrettoken", "YYYYYYYY"):
        assert secret not in text
    assert "Traceback" not in text
    # The line about the bad request is still there: what went wrong, and from where.
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        bad = [r for r in lines if r["logger"] == "aiohttp.server"]
        assert [(r["level"], r["msg"], r["error"]) for r in bad] == [
            ("error", "Error handling request from 127.0.0.1", "LineTooLong")
        ]
        assert "exc" not in bad[0]
    else:
        bad = [line for line in text.splitlines() if " aiohttp.server " in line]
        assert len(bad) == 1
        assert "ERROR" in bad[0]
        assert bad[0].endswith("Error handling request from 127.0.0.1 error=LineTooLong")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_aiohttp_lines_lose_query_strings_in_message_and_traceback(fmt: str) -> None:
    with service_logging(fmt) as captured:
        for name in AIOHTTP_LOGGERS:
            try:
                raise ValueError(f"cannot route '/oauth/x/callback?code=SECRETCODE{name}&s=1'")
            except ValueError:
                logging.getLogger(name).exception(
                    "request to %s failed", f"https://graph.example/me?access_token=TOK{name}"
                )
    text = captured.getvalue()

    assert "SECRETCODE" not in text
    assert "access_token=" not in text
    assert "TOK" not in text
    assert all(name in text for name in AIOHTTP_LOGGERS)  # every line kept, redacted
    assert "ValueError: cannot route '/oauth/x/callback?<redacted>'" in text
    assert "request to https://graph.example/me?<redacted> failed" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_sql_parameters_stay_out_of_debug_logs(tmp_path: Path, fmt: str) -> None:
    with service_logging(fmt, level="debug") as captured:
        logging.getLogger("gateway.test").debug("gateway debug line")
        async with aiosqlite.connect(tmp_path / "t.db") as db:
            await db.execute("SELECT ?", ("Hi, my phone number is 555-0100",))
    text = captured.getvalue()

    assert "gateway debug line" in text  # debug is on for the gateway's own lines
    assert "555-0100" not in text
    assert "aiosqlite" not in text
    assert not logging.getLogger("psycopg").isEnabledFor(logging.INFO)
