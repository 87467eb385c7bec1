"""Command-line options and service assembly for ``twistd nas``."""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from nasd import __version__
from nasd import config as configuration
from nasd.config import Config, ConfigError


class Options(usage.Options):
    """Options of ``twistd nas``; each one overrides the same setting in the file."""

    synopsis = "[options]"
    longdesc = (
        "Run the nasd NATS account server. Settings come from the configuration file given "
        "with --config; the other options override the file."
    )
    optParameters = [
        ["config", "c", None, "Configuration file in nats-server syntax."],
        ["dir", None, None, "Folder to store account JWTs in (store.dir)."],
        ["nsc", None, None, "nsc operator folder to serve read-only (store.nsc); replaces --dir."],
        ["primary", None, None, "URL of an account server to import JWTs from at startup (primary)."],
        ["operator", None, None, "Operator JWT file, or the JWT itself (operator)."],
        ["nats", None, None, "NATS server URL(s) for claim updates, comma-separated (nats.servers)."],
        ["creds", None, None, "Creds file of a system account user (nats.usercredentials)."],
        ["hp", None, None, "HTTP listen address as host:port, e.g. 127.0.0.1:9090 (http.host, http.port)."],
    ]
    optFlags = [
        ["debug", "D", "Log debug messages (logging.debug)."],
        ["trace", "V", "Log every NATS protocol line at debug level (logging.trace)."],
        ["ro", None, "Serve the store without accepting uploads (store.readonly)."],
    ]

    def opt_version(self) -> None:
        """Print the nasd version and exit."""
        print(f"nasd {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["hp"] is not None:
            self["hp"] = parse_host_port(self["hp"])
        if self["nats"] is not None:
            servers = tuple(part.strip() for part in self["nats"].split(",") if part.strip())
            if not servers:
                raise usage.UsageError(f"--nats: expected one or more server URLs, got {self['nats']!r}")
            self["nats"] = servers
        if self["config"] is not None and not os.path.isfile(os.path.expanduser(self["config"])):
            raise usage.UsageError(f"--config: {self['config']} is not a file")
        if self["dir"] is not None and self["nsc"] is not None:
            raise usage.UsageError(
                "--dir and --nsc cannot be used together: serve either a store folder or an nsc folder"
            )
        if self["primary"] is not None and not re.match(r"^https?://[^/\s]+", self["primary"]):
            raise usage.UsageError(f"--primary: expected an http:// or https:// URL, got {self['primary']!r}")


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6, ``:port`` for every interface)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if match is None:
        raise usage.UsageError(f"--hp: expected host:port such as 127.0.0.1:9090, got {value!r}")
    host = match.group(1) if match.group(1) is not None else match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise usage.UsageError(f"--hp: the port must be between 0 and 65535, got {port}")
    return host, port


def build_config(options: Options | dict[str, Any]) -> Config:
    """Load the configuration file, if any, and apply the command-line overrides."""
    config = configuration.load(options["config"]) if options["config"] else Config()

    if options["dir"] is not None:
        folder = os.path.abspath(os.path.expanduser(options["dir"]))
        config = configuration.with_overrides(config, store={"dir": folder, "nsc": None})
    if options["nsc"] is not None:
        folder = os.path.abspath(os.path.expanduser(options["nsc"]))
        config = configuration.with_overrides(config, store={"nsc": folder, "dir": None})
    if options["ro"]:
        config = configuration.with_overrides(config, store={"readonly": True})
    if options["primary"] is not None:
        config = configuration.with_overrides(config, primary=options["primary"])

    if options["operator"] is not None:
        value = options["operator"]
        if not value.startswith("eyJ"):
            value = os.path.abspath(os.path.expanduser(value))
        config = configuration.with_overrides(config, operator=value)
    if options["nats"] is not None:
        config = configuration.with_overrides(config, nats={"servers": tuple(options["nats"])})
    if options["creds"] is not None:
        config = configuration.with_overrides(
            config, nats={"user_credentials": os.path.abspath(os.path.expanduser(options["creds"]))}
        )
    if options["hp"] is not None:
        host, port = options["hp"]
        config = configuration.with_overrides(config, http={"host": host, "port": port})

    if options["debug"]:
        config = configuration.with_overrides(config, logging={"debug": True})
    if options["trace"]:
        config = configuration.with_overrides(config, logging={"trace": True})

    configuration.check_store(config.store)
    return config


def makeService(options: Options) -> IService:
    """Build the nasd service; a configuration problem stops twistd with one clear line."""
    from twisted.internet import reactor

    from nasd.service import StartupError, build_service

    try:
        config = build_config(options)
        return build_service(reactor, config)
    except (ConfigError, StartupError) as error:
        raise SystemExit(f"nasd: {error}") from None
