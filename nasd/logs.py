"""One log observer for every nasd module, so the configured level applies to all of them.

nasd modules create their loggers with ``Logger(observer=observer)``; events below the
configured level are dropped here, and the rest go on to twistd's own observers.
"""

from __future__ import annotations

from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogPublisher

levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [levels])


def set_level(debug: bool) -> None:
    """Show debug events from nasd when *debug* is true, and info and above otherwise."""
    levels.setLogLevelForNamespace("", LogLevel.debug if debug else LogLevel.info)
