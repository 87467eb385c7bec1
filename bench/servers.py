"""Start and stop nasd, nats-server and wrk for the benchmark, all on 127.0.0.1.

Every child process is recorded with its PID and stopped by that PID: SIGTERM first,
then SIGKILL when it has not exited after a bounded wait.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"

# Polling interval of the start-up measurement, in seconds.
STARTUP_POLL_INTERVAL = 0.010

RESOLVER_LINE = re.compile(r"resolver: URL\(http://127\.0\.0\.1:(\d+)/jwt/v1/accounts/\)")

# twistd writes "<time> [<namespace>#<level>] <message>". Lines at these levels, tracebacks and
# unhandled failures mean that nasd caught a problem.
PROBLEM_LINE = re.compile(r"#(error|critical)\]|Traceback \(most recent call last\)|Unhandled")


class BenchError(Exception):
    """A step of the benchmark failed. The message names the step and the cause."""


@dataclass
class Child:
    """A process started by the benchmark, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    started: float
    exit_status: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@dataclass
class Processes:
    """The children of one benchmark run, stopped by PID when the run ends."""

    children: list[Child] = field(default_factory=list)

    def start(self, name: str, arguments: list[str], log_path: Path, env: dict[str, str] | None = None) -> Child:
        log_file = open(log_path, "ab")
        started = time.monotonic()
        try:
            popen = subprocess.Popen(
                arguments,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=log_path.parent,
                env=env,
                # A new session keeps Ctrl-C in the terminal away from the children, so the
                # benchmark stops them itself, in order and by PID.
                start_new_session=True,
            )
        except OSError as error:
            log_file.close()
            raise BenchError(f"starting {name} ({arguments[0]}) failed: {error}") from error
        child = Child(name, popen, log_path, log_file, started)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 15.0) -> int:
        """Send SIGTERM, wait up to *timeout* seconds, then send SIGKILL. Returns the exit status."""
        if child.running():
            child.popen.send_signal(signal.SIGTERM)
            try:
                child.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait(5)
        child.log_file.close()
        if child in self.children:
            self.children.remove(child)
        child.exit_status = child.popen.returncode
        return child.exit_status

    def stop_all(self) -> None:
        """Stop every child still recorded, newest first."""
        for child in reversed(list(self.children)):
            self.stop(child, timeout=10.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """Send one request on a new connection and return the status and body."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/jwt"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def health(port: int) -> dict:
    status, body = http_request(port, "GET", "/healthz")
    if status != 200:
        raise BenchError(f"GET /healthz returned {status}: {body[:200]!r}")
    return json.loads(body)


def nasd_config(store: Path, operator_jwt: Path, system_account: str, nats_url: str | None, creds: Path | None) -> str:
    """Return a nasd configuration: port 0 on 127.0.0.1, a sharded store, info logging."""
    text = (
        f'operator: "{operator_jwt}"\n'
        f"system_account: {system_account}\n"
        f"http {{ host: {HOST}, port: 0 }}\n"
        f'store {{ dir: "{store}", shard: true, readonly: false }}\n'
        "logging { debug: false, trace: false }\n"
    )
    if nats_url is not None:
        # A short reconnect wait lets nasd connect soon after the nats-server, which can
        # only start once nasd serves the system account.
        text += f'nats {{ servers: ["{nats_url}"], usercredentials: "{creds}", reconnectwait: 200 }}\n'
    return text


def start_nasd(
    processes: Processes,
    twistd: str,
    repository: Path,
    config_path: Path,
    probe_key: str,
    timeout: float,
) -> tuple[Child, int, float]:
    """Start nasd and poll every 10 ms until GET of *probe_key* returns 200.

    Returns the child, its HTTP port (read from the resolver line in its log) and the
    seconds from spawning the process to that first 200.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repository) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    arguments = [twistd, "-n", "--pidfile=", "nas", "-c", str(config_path)]
    log_path = config_path.with_suffix(".log")
    child = processes.start("nasd", arguments, log_path, env)
    deadline = child.started + timeout
    port: int | None = None
    while True:
        if not child.running():
            raise BenchError(f"nasd exited with status {child.popen.returncode} during start-up:\n{child.tail()}")
        if port is None:
            match = RESOLVER_LINE.search(child.output())
            if match:
                port = int(match.group(1))
        if port is not None:
            try:
                status, _ = http_request(port, "GET", f"/jwt/v1/accounts/{probe_key}", timeout=1.0)
            except OSError:
                status = 0
            if status == 200:
                return child, port, time.monotonic() - child.started
        if time.monotonic() > deadline:
            raise BenchError(
                f"nasd timed out: no 200 for a stored account after {timeout:.0f} s (port {port}):\n{child.tail()}"
            )
        time.sleep(STARTUP_POLL_INTERVAL)


def wait_for_account_count(child: Child, port: int, timeout: float) -> tuple[int, float]:
    """Poll /healthz every 10 ms until it reports the number of stored accounts.

    nasd lists the store in the background after it starts serving, and reports null
    until then. Returns the count and the seconds since the process was spawned.
    """
    deadline = time.monotonic() + timeout
    while True:
        count = health(port).get("store", {}).get("accounts")
        if isinstance(count, int):
            return count, time.monotonic() - child.started
        if not child.running():
            raise BenchError(f"nasd exited with status {child.popen.returncode}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise BenchError(
                f"timed out after {timeout:.0f} s waiting for nasd's /healthz to count the stored accounts"
            )
        time.sleep(STARTUP_POLL_INTERVAL)


def wait_for_nats_connection(child: Child, port: int, timeout: float) -> None:
    """Wait until nasd's /healthz shows "connected": true under "nats"."""
    deadline = time.monotonic() + timeout
    while True:
        if not child.running():
            raise BenchError(f"nasd exited with status {child.popen.returncode}:\n{child.tail()}")
        if health(port).get("nats", {}).get("connected") is True:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for nasd to connect to NATS:\n{child.tail()}")
        time.sleep(0.05)


def start_nats_server(
    processes: Processes,
    binary: str,
    folder: Path,
    port: int,
    operator_jwt: Path,
    system_account: str,
    resolver_port: int,
    timeout: float = 20.0,
) -> Child:
    """Start nats-server in operator mode with a URL resolver pointing at nasd."""
    config_path = folder / "nats-server.conf"
    config_path.write_text(
        f"listen: {HOST}:{port}\n"
        "server_name: nasd-bench\n"
        f'operator: "{operator_jwt}"\n'
        f"system_account: {system_account}\n"
        f"resolver: URL(http://{HOST}:{resolver_port}/jwt/v1/accounts/)\n"
    )
    child = processes.start("nats-server", [binary, "-c", str(config_path)], folder / "nats-server.log")
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if not child.running():
            raise BenchError(f"nats-server exited with status {child.popen.returncode}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for nats-server on port {port}:\n{child.tail()}")
        time.sleep(0.05)
    return child


def peak_rss_mib(pid: int) -> float:
    """Return VmHWM, the peak resident set size of *pid*, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no VmHWM line")


def log_problems(child: Child) -> list[str]:
    """Return the lines of *child*'s log that report an error, a traceback or an unhandled failure."""
    return [line for line in child.output().splitlines() if PROBLEM_LINE.search(line)]
