"""Tests for loading NATS creds files, with the nsc fixture and broken copies of it."""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile

import nkeys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.trial.unittest import TestCase

from nasd.creds import Credentials, CredentialsFile, CredsError, load_credentials
from tests.tokens import CREDS

FIXTURE_CREDS = str(CREDS)
SYS_CREDS = os.path.join(FIXTURE_CREDS, "SYS", "sys.creds")
SYSUSER_CREDS = os.path.join(FIXTURE_CREDS, "SYS", "sysuser.creds")
BOB_CREDS = os.path.join(FIXTURE_CREDS, "SHOP", "bob.creds")
SYS_USER = "UAERFXZREY5KLHSYX2RECL4JRRG5Q27GIZDFXC43TYOMTGWSJU6QYGZ2"


def read_fixture(path: str) -> str:
    with open(path, encoding="ascii") as creds_file:
        return creds_file.read()


def seed_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("SU"))


def jwt_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("eyJ"))


def public_key_bytes(public_key: str) -> bytes:
    """Return the raw Ed25519 key inside a public nkey, after checking its CRC16."""
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    assert binascii.crc_hqx(raw[:-2], 0) == int.from_bytes(raw[-2:], "little")
    return raw[1:-2]


def verify_signature(public_key: str, data: bytes, signature: str) -> None:
    """Raise cryptography's InvalidSignature unless the signature is valid."""
    padded = signature + "=" * (-len(signature) % 4)
    key = Ed25519PublicKey.from_public_bytes(public_key_bytes(public_key))
    key.verify(base64.urlsafe_b64decode(padded), data)


class LoadCredentialsTests(TestCase):
    def make_directory(self) -> str:
        """Create a temporary directory outside the working directory, removed after the test."""
        directory = tempfile.mkdtemp(prefix="nasd-creds-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory

    def write(self, text: str, newline: str = "\n") -> str:
        path = os.path.join(self.make_directory(), "user.creds")
        with open(path, "w", encoding="ascii", newline=newline) as creds_file:
            creds_file.write(text)
        return path

    def assert_error(self, path: str, expected: str) -> str:
        error = self.assertRaises(CredsError, load_credentials, path)
        message = str(error)
        self.assertTrue(message.startswith(f"creds file {path}: "), message)
        self.assertIn(expected, message)
        return message

    def test_fixture_sys_creds(self) -> None:
        credentials = load_credentials(SYS_CREDS)
        text = read_fixture(SYS_CREDS)

        self.assertIsInstance(credentials, Credentials)
        self.assertEqual(credentials.path, SYS_CREDS)
        self.assertEqual(credentials.jwt, jwt_line(text))
        self.assertEqual(credentials.seed, seed_line(text).encode())
        self.assertEqual(credentials.public_key, SYS_USER)

    def test_repr_hides_seed(self) -> None:
        credentials = load_credentials(SYS_CREDS)

        self.assertNotIn(credentials.seed.decode(), repr(credentials))
        self.assertNotIn("seed=", repr(credentials))

    def test_sign_nonce_verifies(self) -> None:
        credentials = load_credentials(SYS_CREDS)
        nonce = "4yuJ5W3xMtoRv1k"

        signature = credentials.sign_nonce(nonce)

        self.assertNotIn("=", signature)
        self.assertNotIn("+", signature)
        self.assertNotIn("/", signature)
        verify_signature(SYS_USER, nonce.encode(), signature)

    def test_crlf_line_ends(self) -> None:
        path = self.write(read_fixture(SYS_CREDS), newline="\r\n")
        with open(path, "rb") as creds_file:
            self.assertIn(b"\r\n", creds_file.read())

        credentials = load_credentials(path)

        self.assertEqual(credentials.public_key, SYS_USER)
        self.assertEqual(credentials.jwt, jwt_line(read_fixture(SYS_CREDS)))

    def test_minimal_frames_without_banner(self) -> None:
        text = read_fixture(SYS_CREDS)
        minimal = (
            "---BEGIN NATS USER JWT---\n"
            f"{jwt_line(text)}\n"
            "---END NATS USER JWT---\n"
            "---BEGIN USER NKEY SEED---\n"
            f"{seed_line(text)}\n"
            "---END USER NKEY SEED---"
        )

        credentials = load_credentials(self.write(minimal))

        self.assertEqual(credentials.public_key, SYS_USER)

    def test_unframed_seed_line(self) -> None:
        text = read_fixture(SYS_CREDS)
        unframed = (
            f"-----BEGIN NATS USER JWT-----\n{jwt_line(text)}\n------END NATS USER JWT------\n\n{seed_line(text)}\n"
        )

        credentials = load_credentials(self.write(unframed))

        self.assertEqual(credentials.seed, seed_line(text).encode())

    def test_missing_file(self) -> None:
        path = os.path.join(self.make_directory(), "missing", "absent.creds")

        self.assert_error(path, "file not found")

    def test_directory_unreadable(self) -> None:
        directory = self.make_directory()

        self.assert_error(directory, "cannot be read")

    def test_no_jwt_block(self) -> None:
        text = read_fixture(SYS_CREDS).replace(jwt_line(read_fixture(SYS_CREDS)), "")
        text = text.replace("BEGIN NATS USER JWT", "BEGIN SOMETHING").replace("END NATS USER JWT", "END SOMETHING")

        self.assert_error(self.write(text), 'no "BEGIN NATS USER JWT" block found')

    def test_no_seed_block(self) -> None:
        text = read_fixture(SYS_CREDS)
        without_seed = text[: text.index("-----BEGIN USER NKEY SEED")]

        message = self.assert_error(self.write(without_seed), 'no "BEGIN USER NKEY SEED" block found')
        self.assertNotIn(seed_line(text), message)

    def test_bad_seed_crc(self) -> None:
        text = read_fixture(SYS_CREDS)
        seed = seed_line(text)
        # Change one character of the key material, which keeps valid base32 but
        # breaks the CRC16 at the end.
        position = 10
        replacement = "A" if seed[position] != "A" else "B"
        damaged = seed[:position] + replacement + seed[position + 1 :]

        message = self.assert_error(self.write(text.replace(seed, damaged)), "invalid CRC16 checksum")
        self.assertNotIn(damaged, message)
        self.assertNotIn(seed, message)

    def test_seed_not_base32(self) -> None:
        text = read_fixture(SYS_CREDS)
        seed = seed_line(text)

        self.assert_error(self.write(text.replace(seed, "SU" + "1" * 56)), "not valid base32")

    def test_account_seed_rejected(self) -> None:
        text = read_fixture(SYS_CREDS)
        account_seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()

        message = self.assert_error(
            self.write(text.replace(seed_line(text), account_seed)),
            "type account, not a user",
        )
        self.assertNotIn(account_seed, message)

    def test_seed_not_matching_jwt(self) -> None:
        text = read_fixture(SYS_CREDS)
        other_seed = seed_line(read_fixture(BOB_CREDS))

        message = self.assert_error(
            self.write(text.replace(seed_line(text), other_seed)),
            f"the JWT was issued to {SYS_USER}",
        )
        self.assertNotIn(other_seed, message)

    def test_malformed_jwt(self) -> None:
        text = read_fixture(SYS_CREDS)

        self.assert_error(self.write(text.replace(jwt_line(text), "not-a-jwt")), "is not a JWT")

    def test_non_ascii_file(self) -> None:
        path = self.write("")
        with open(path, "wb") as creds_file:
            creds_file.write(b"\xff\xfe binary")

        self.assert_error(path, "non-ASCII")


class CredentialsFileTests(TestCase):
    def setUp(self) -> None:
        folder = tempfile.mkdtemp(prefix="nasd-creds-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        self.path = os.path.join(folder, "nasd.creds")
        shutil.copyfile(SYS_CREDS, self.path)

    def test_unchanged_file_not_reread(self) -> None:
        source = CredentialsFile(self.path)
        first = source.current()
        self.assertIs(source.current(), first)

    def test_replaced_file_reloaded(self) -> None:
        source = CredentialsFile(self.path)
        replacement = os.path.join(os.path.dirname(self.path), "new.creds")
        shutil.copyfile(SYSUSER_CREDS, replacement)
        os.replace(replacement, self.path)
        self.assertEqual(source.current().jwt, load_credentials(SYSUSER_CREDS).jwt)
        self.assertEqual(source.public_key, load_credentials(SYSUSER_CREDS).public_key)

    def test_broken_replacement_keeps_old(self) -> None:
        source = CredentialsFile(self.path)
        original = source.current()
        with open(self.path, "w") as file:
            file.write("not a creds file at all\n")
        self.assertIs(source.current(), original)
