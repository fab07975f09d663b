"""Run the bridge as a separate process, as an operator would (`python -m bridge run`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from tests.harness.mqtt import wait_until
from tests.harness.services import free_port

REPO = Path(__file__).resolve().parents[2]


class BridgeProcess:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = dict(env)
        if self.env.get("RACKTWIN_HTTP_PORT", "0") == "0":
            self.env["RACKTWIN_HTTP_PORT"] = str(free_port())
        self.port = int(self.env["RACKTWIN_HTTP_PORT"])
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> "BridgeProcess":
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "bridge", "run"], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))
        if wait_ready:
            wait_until(self.ready, timeout=30, what=f"bridge ready (log {self.log_path})")
        return self

    def ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"bridge exited with {self.proc.returncode}: {self.log()[-2000:]}")
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def metrics(self, names: list[str] | None = None) -> str:
        """/metrics, or only the named samples (``name[]``: cheaper for the bridge when polled often)."""
        params = {"name[]": names} if names else None
        return requests.get(f"http://127.0.0.1:{self.port}/metrics", params=params, timeout=5).text

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
