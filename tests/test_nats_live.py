"""End-to-end tests of the claim update publisher against a real nats-server on
127.0.0.1, checked by an independent nats-py subscriber in its own thread."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping

import nats
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from nasd.creds import load_credentials
from nasd.nats import ClaimUpdatePublisher
from tests.tokens import FIXTURES as FIXTURE_ROOT

FIXTURES = str(FIXTURE_ROOT)
OPERATOR_JWT = f"{FIXTURES}/stores/demo/demo.jwt"
SYS_ACCOUNT = "AC2PZDSITLEQ7QIFCTF4EVZ7EIQK67U4CRDJQ4UCQJWNAJFOGCTT7FTS"
SYS_ACCOUNT_JWT = f"{FIXTURES}/stores/demo/accounts/SYS/SYS.jwt"
SHOP_ACCOUNT = "AARE3U7RTFWNNQPBUC6KITHHQ52HDNR5LINTV53ZWOA66OX5W3ANZINI"
SHOP_ACCOUNT_JWT = f"{FIXTURES}/stores/demo/accounts/SHOP/SHOP.jwt"
PUBLISHER_CREDS = f"{FIXTURES}/keys/creds/demo/SYS/sys.creds"
# A user of the SHOP account, which the MEMORY resolver does not know.
UNTRUSTED_CREDS = f"{FIXTURES}/keys/creds/demo/SHOP/bob.creds"
SUBSCRIBER_CREDS = f"{FIXTURES}/keys/creds/demo/SYS/sysuser.creds"
CLAIMS_UPDATE_WILDCARD = "$SYS.ACCOUNT.*.CLAIMS.UPDATE"

# Seconds allowed for each wait: server start, subscriber start, publish, delivery.
WAIT_TIMEOUT = 10.0


def find_nats_server() -> str:
    """Return the nats-server binary installed beside Python or on PATH, or skip."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("nats-server")
    if on_path is None:
        raise SkipTest("nats-server binary not found beside sys.executable or on PATH")
    return on_path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def read_jwt(path: str) -> bytes:
    with open(path, "rb") as jwt_file:
        return jwt_file.read().strip()


class NATSServerProcess:
    """A nats-server subprocess in operator mode with a MEMORY resolver on 127.0.0.1.

    ``preload`` maps account public keys to the JWT files the resolver starts with
    (the system account by default), and ``extra`` is appended to the configuration.
    """

    def __init__(
        self,
        directory: str,
        port: int,
        name: str = "nats-server",
        preload: Mapping[str, str] | None = None,
        extra: str = "",
    ) -> None:
        self.port = port
        self.name = name
        self.config_path = os.path.join(directory, f"{name}.conf")
        self.log_path = os.path.join(directory, f"{name}.log")
        self.process: subprocess.Popen[bytes] | None = None
        accounts = preload if preload is not None else {SYS_ACCOUNT: SYS_ACCOUNT_JWT}
        entries = "".join(f'  {key}: "{read_jwt(path).decode()}"\n' for key, path in accounts.items())
        with open(self.config_path, "w", encoding="utf-8") as config:
            config.write(
                f"server_name: {name}\n"
                f"listen: 127.0.0.1:{port}\n"
                f"operator: {OPERATOR_JWT}\n"
                f"system_account: {SYS_ACCOUNT}\n"
                "resolver: MEMORY\n"
                f"resolver_preload: {{\n{entries}}}\n"
                f"{extra}"
            )

    def start(self, binary: str) -> None:
        """Start the server and block until its port accepts connections."""
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [binary, "-c", self.config_path],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

        deadline = time.monotonic() + WAIT_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nats-server exited early:\n{self.read_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(
            f"nats-server did not listen on port {self.port} within {WAIT_TIMEOUT} s:\n{self.read_log()}"
        )

    def stop(self) -> None:
        """Kill the server process that start() launched, by its PID, and wait for it to exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait(timeout=WAIT_TIMEOUT)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def read_log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log_file:
            return log_file.read()


class ClaimUpdateSubscriber:
    """A nats-py client, in a thread with its own asyncio loop, that collects every
    message on ``$SYS.ACCOUNT.*.CLAIMS.UPDATE`` as (subject, payload)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)

    def start(self) -> None:
        """Start the thread and block until the subscription is active on the server."""
        self._thread.start()
        if not self._ready.wait(WAIT_TIMEOUT):
            raise AssertionError(f"the nats-py subscriber did not start within {WAIT_TIMEOUT} s")
        if self._error is not None:
            raise AssertionError(f"the nats-py subscriber failed: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_TIMEOUT)

    async def _run(self) -> None:
        try:
            client = await nats.connect(
                self.url,
                user_credentials=SUBSCRIBER_CREDS,
                connect_timeout=WAIT_TIMEOUT,
                allow_reconnect=False,
            )
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await client.subscribe(CLAIMS_UPDATE_WILDCARD, cb=self._collect)
            await client.flush(timeout=WAIT_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - start() reports it in the test thread
            self._error = error
            self._ready.set()
            return

        self._ready.set()
        await self._stop.wait()
        await client.close()

    async def _collect(self, message: nats.aio.msg.Msg) -> None:
        self.messages.put((message.subject, message.data))


class NatsPyClient:
    """A nats-py client that stays connected, in a thread with its own asyncio loop,
    until stop(). A user's connection makes nats-server load the user's account."""

    def __init__(self, url: str, creds: str) -> None:
        self.url = url
        self.creds = creds
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)

    def start(self) -> None:
        """Start the thread and block until the connection is established."""
        self._thread.start()
        if not self._ready.wait(WAIT_TIMEOUT):
            raise AssertionError(f"the nats-py client did not connect to {self.url} within {WAIT_TIMEOUT} s")
        if self._error is not None:
            raise AssertionError(f"the nats-py client failed to connect to {self.url}: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_TIMEOUT)

    async def _run(self) -> None:
        try:
            client = await nats.connect(
                self.url,
                user_credentials=self.creds,
                connect_timeout=WAIT_TIMEOUT,
                allow_reconnect=False,
            )
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await client.flush(timeout=WAIT_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - start() reports it in the test thread
            self._error = error
            self._ready.set()
            return

        self._ready.set()
        await self._stop.wait()
        if not client.is_closed:
            await client.close()


async def wait_until(condition: Callable[[], bool], description: str, timeout: float = WAIT_TIMEOUT) -> None:
    """Poll ``condition`` on the reactor every 50 ms and fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {description}")
        await deferLater(reactor, 0.05, lambda: None)


class LogCollector:
    """Collect the formatted log lines published while a test runs, by level."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, level: LogLevel | None = None) -> list[str]:
        return [formatEvent(event) for event in self.events if level is None or event.get("log_level") == level]

    def matching(self, fragment: str, level: LogLevel | None = None) -> list[str]:
        return [line for line in self.lines(level) if fragment in line]


class LiveClaimUpdateTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.binary = find_nats_server()
        directory = tempfile.mkdtemp(prefix="nasd-nats-live-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.server = NATSServerProcess(directory, self.port)
        self.addCleanup(self.server.stop)
        self.shop_jwt = read_jwt(SHOP_ACCOUNT_JWT)

    def start_publisher(self, creds_path: str = PUBLISHER_CREDS) -> ClaimUpdatePublisher:
        publisher = ClaimUpdatePublisher(
            reactor,
            [self.url],
            load_credentials(creds_path),
            connect_timeout=5.0,
            reconnect_wait=0.2,
            max_reconnects=-1,
            name="nasd-live-test",
        )
        publisher.startService()
        self.addCleanup(publisher.stopService)
        return publisher

    def start_subscriber(self) -> ClaimUpdateSubscriber:
        subscriber = ClaimUpdateSubscriber(self.url)
        self.addCleanup(subscriber.stop)
        subscriber.start()
        return subscriber

    async def receive(self, subscriber: ClaimUpdateSubscriber) -> tuple[str, bytes]:
        try:
            message: tuple[str, bytes] = await deferToThread(subscriber.messages.get, timeout=WAIT_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no message on {CLAIMS_UPDATE_WILDCARD} within {WAIT_TIMEOUT} s") from None
        return message

    def test_update_reaches_subscriber(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._update_reaches_subscriber())

    async def _update_reaches_subscriber(self) -> None:
        self.server.start(self.binary)
        subscriber = self.start_subscriber()
        publisher = self.start_publisher()
        await wait_until(lambda: publisher.connected, "the publisher is connected")
        self.assertEqual(publisher.server_url, self.url)

        publisher.publish_account_update(SHOP_ACCOUNT, self.shop_jwt)
        await wait_until(lambda: publisher.pending_count == 0, "the update is confirmed")

        subject, payload = await self.receive(subscriber)
        self.assertEqual(subject, f"$SYS.ACCOUNT.{SHOP_ACCOUNT}.CLAIMS.UPDATE")
        self.assertEqual(payload, self.shop_jwt)
        self.assertIsNotNone(publisher.last_published)

    def test_update_held_until_server_starts(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._update_held_until_server_starts())

    async def _update_held_until_server_starts(self) -> None:
        publisher = self.start_publisher()
        publisher.publish_account_update(SHOP_ACCOUNT, self.shop_jwt)
        await wait_until(lambda: publisher.factory.retries >= 1, "a connection attempt has failed")
        self.assertFalse(publisher.connected)
        self.assertEqual(publisher.pending_count, 1)

        # Both calls block the reactor thread, so the publisher cannot reconnect and
        # publish before the subscriber is ready.
        self.server.start(self.binary)
        subscriber = self.start_subscriber()

        await wait_until(lambda: publisher.pending_count == 0, "the held update is confirmed")
        subject, payload = await self.receive(subscriber)
        self.assertEqual(subject, f"$SYS.ACCOUNT.{SHOP_ACCOUNT}.CLAIMS.UPDATE")
        self.assertEqual(payload, self.shop_jwt)
        self.assertTrue(publisher.connected)

    def test_unknown_account_rejected(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._unknown_account_rejected())

    async def _unknown_account_rejected(self) -> None:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.server.start(self.binary)

        publisher = self.start_publisher(UNTRUSTED_CREDS)
        publisher.publish_account_update(SHOP_ACCOUNT, self.shop_jwt)

        def rejections() -> list[str]:
            return [
                formatEvent(event)
                for event in events
                if event.get("log_level") == LogLevel.error and "Authorization Violation" in formatEvent(event)
            ]

        await wait_until(lambda: bool(rejections()), "the server rejects the credentials")
        self.assertIn(UNTRUSTED_CREDS, rejections()[0])
        self.assertFalse(publisher.connected)
        self.assertEqual(publisher.pending_count, 1)
