"""``switchboard serve`` as a process: it comes up, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.security.keyring import generate_key_spec


def serve_environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An embedded gateway in ``tmp_path``, every address on a port the system picks."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "SWITCHBOARD_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db",
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_ENCRYPTION_KEYS": generate_key_spec("k1"),
        "SWITCHBOARD_GRPC_ADDR": "127.0.0.1:0",
        "SWITCHBOARD_HTTP_ADDR": "127.0.0.1:0",
        "SWITCHBOARD_METRICS_ADDR": "127.0.0.1:0",
        "SWITCHBOARD_LOG_FORMAT": "json",
        **extra,
    }


def test_serve_comes_up_and_drains_on_sigterm(tmp_path: Path) -> None:
    env = serve_environ(tmp_path, SWITCHBOARD_SHUTDOWN_GRACE_SECONDS="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "all"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        up: dict[str, str] = {}
        deadline = time.monotonic() + 30
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            record = json.loads(line)
            if record.get("msg") == "switchboard is up":
                up = record
                break
        assert up, "no 'switchboard is up' line:\n" + "".join(lines)
        with grpc.insecure_channel(up["grpc"]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        rest = proc.stderr.read()
        assert "shutting down" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "setting", ["SWITCHBOARD_GRPC_ADDR", "SWITCHBOARD_HTTP_ADDR", "SWITCHBOARD_METRICS_ADDR"]
)
def test_an_address_in_use_is_one_line_naming_its_variable(tmp_path: Path, setting: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = serve_environ(tmp_path, **{setting: f"127.0.0.1:{port}"})
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "all"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"switchboard: {setting}: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
