"""Remember which accounts have claim updates that NATS has not confirmed yet, across restarts.

The publisher keeps pending updates in memory. When NATS is unreachable, or nasd stops
with updates still pending, the account keys are written to a small file beside the
store, and the next start queues the stored JWTs of those accounts again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from twisted.logger import Logger

from nasd.keys import is_account_key
from nasd.logs import observer
from nasd.store import StoreError, write_durably

log = Logger(observer=observer)

JOURNAL_NAME = ".pending-updates"


class PendingJournal:
    """A file listing one account public key per line; no file means nothing is pending."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._recorded: frozenset[str] = frozenset()

    def load(self) -> list[str]:
        """Return the recorded account keys, skipping (and logging) lines that are not keys."""
        try:
            with open(self.path, encoding="ascii", errors="replace") as file:
                lines = [line.strip() for line in file]
        except FileNotFoundError:
            return []
        except OSError as error:
            log.error("cannot read the pending-update journal {path}: {error}", path=self.path, error=error)
            return []
        keys = [line for line in lines if is_account_key(line)]
        if len(keys) != len([line for line in lines if line]):
            log.warn("ignoring lines of {path} that are not account keys", path=self.path)
        self._recorded = frozenset(keys)
        return keys

    def record(self, accounts: Iterable[str]) -> None:
        """Replace the file with *accounts*, durably; an empty set removes the file.

        A failure is logged, not raised: the updates stay pending in memory either way.
        """
        keys = frozenset(accounts)
        if keys == self._recorded:
            return
        try:
            if keys:
                write_durably(self.path, "".join(key + "\n" for key in sorted(keys)).encode("ascii"))
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except (OSError, StoreError) as error:
            log.error("cannot write the pending-update journal {path}: {error}", path=self.path, error=error)
            return
        self._recorded = keys
