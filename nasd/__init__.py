"""nasd: a NATS account server that serves and publishes operator-signed account JWTs."""

__version__ = "0.1.0"
