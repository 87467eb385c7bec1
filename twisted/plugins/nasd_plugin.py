"""Declare the ``twistd nas`` subcommand; the service itself lives in :mod:`nasd.tap`."""

from twisted.application.service import ServiceMaker

nas = ServiceMaker(
    "nasd",
    "nasd.tap",
    "NATS account server: serves account JWTs to nats-server's URL resolver",
    "nas",
)
