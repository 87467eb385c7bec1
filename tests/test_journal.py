"""Tests for the pending-update journal and its use by the claim update publisher."""

import os
import shutil
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from nasd.creds import load_credentials
from nasd.journal import JOURNAL_NAME, PendingJournal
from nasd.nats import ClaimUpdatePublisher
from tests.test_nats import info_line
from tests.tokens import ACME, CREDS, SHOP, fixture_jwt


class PendingJournalTests(TestCase):
    def setUp(self) -> None:
        folder = tempfile.mkdtemp(prefix="nasd-journal-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        self.path = os.path.join(folder, JOURNAL_NAME)

    def test_missing_file_is_empty(self) -> None:
        self.assertEqual(PendingJournal(self.path).load(), [])

    def test_record_then_load(self) -> None:
        PendingJournal(self.path).record({SHOP, ACME})
        self.assertEqual(sorted(PendingJournal(self.path).load()), sorted([SHOP, ACME]))
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_empty_record_removes_file(self) -> None:
        journal = PendingJournal(self.path)
        journal.record({SHOP})
        journal.record(set())
        self.assertFalse(os.path.exists(self.path))

    def test_load_skips_invalid_lines(self) -> None:
        with open(self.path, "w") as file:
            file.write(f"{SHOP}\n../etc/passwd\n\nnot-a-key\n")
        self.assertEqual(PendingJournal(self.path).load(), [SHOP])

    def test_unwritable_folder_logged(self) -> None:
        journal = PendingJournal(os.path.join(self.path, "missing", JOURNAL_NAME))
        os.makedirs(self.path)
        with open(os.path.join(self.path, "missing"), "w") as file:
            file.write("a file where a folder is expected")
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        journal.record({SHOP})
        errors = [formatEvent(event) for event in events if event.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("cannot write the pending-update journal", errors[0])
        self.assertFalse(os.path.exists(journal.path))


class PublisherJournalTests(TestCase):
    def setUp(self) -> None:
        folder = tempfile.mkdtemp(prefix="nasd-journal-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        self.journal = PendingJournal(os.path.join(folder, JOURNAL_NAME))
        self.reactor = MemoryReactorClock()
        self.publisher = ClaimUpdatePublisher(
            self.reactor,
            ["nats://127.0.0.1:4222"],
            load_credentials(str(CREDS / "SYS" / "sys.creds")),
            connect_timeout=5.0,
            reconnect_wait=1.0,
            max_reconnects=-1,
            journal=self.journal,
        )

    def accept(self):
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(info_line())
        protocol.dataReceived(b"PONG\r\n")
        return protocol, transport

    def test_held_update_recorded(self) -> None:
        self.publisher.startService()
        self.publisher.publish_account_update(SHOP, fixture_jwt("SHOP"))
        self.assertEqual(PendingJournal(self.journal.path).load(), [SHOP])

    def test_confirmed_update_clears_journal(self) -> None:
        self.publisher.startService()
        self.publisher.publish_account_update(SHOP, fixture_jwt("SHOP"))
        protocol, _ = self.accept()
        protocol.dataReceived(b"PONG\r\n")
        self.assertEqual(self.publisher.pending_count, 0)
        self.assertFalse(os.path.exists(self.journal.path))

    def test_connected_publish_writes_nothing(self) -> None:
        self.publisher.startService()
        protocol, _ = self.accept()
        self.publisher.publish_account_update(SHOP, fixture_jwt("SHOP"))
        self.assertFalse(os.path.exists(self.journal.path))
        protocol.dataReceived(b"PONG\r\n")
        self.assertFalse(os.path.exists(self.journal.path))

    def test_stop_with_pending_keeps_journal(self) -> None:
        self.publisher.startService()
        self.publisher.publish_account_update(ACME, fixture_jwt("ACME"))
        self.successResultOf(self.publisher.stopService())
        self.assertEqual(PendingJournal(self.journal.path).load(), [ACME])


class NewestJWTTests(TestCase):
    def test_held_update_sends_newest_stored(self) -> None:
        stored = {SHOP: fixture_jwt("SHOP")}
        reactor = MemoryReactorClock()
        publisher = ClaimUpdatePublisher(
            reactor,
            ["nats://127.0.0.1:4222"],
            load_credentials(str(CREDS / "SYS" / "sys.creds")),
            connect_timeout=5.0,
            reconnect_wait=1.0,
            max_reconnects=-1,
            latest_jwt=stored.get,
        )
        publisher.startService()
        publisher.publish_account_update(SHOP, b"an older JWT held during an outage")
        host, port, factory, _, _ = reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(info_line())
        protocol.dataReceived(b"PONG\r\n")
        sent = transport.value()
        self.assertIn(fixture_jwt("SHOP"), sent)
        self.assertNotIn(b"an older JWT held during an outage", sent)
