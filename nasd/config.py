"""Turn a parsed configuration file into one frozen, typed ``Config``.

Keys are matched case-insensitively. An unknown key is reported as a warning, a value
of the wrong type raises ConfigError naming the key, and relative paths are resolved
against the folder of the configuration file.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nasd import conf
from nasd.jwt import is_valid_subject
from nasd.keys import is_account_key


class ConfigError(ValueError):
    """A configuration value that nasd cannot use."""


@dataclass(frozen=True)
class ServerTLSConfig:
    """HTTPS settings: certificate and key files, and client certificate checking.

    With ``verify`` true, clients must present a certificate signed by the CA in ``ca``.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    verify: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.key is not None


@dataclass(frozen=True)
class ClientTLSConfig:
    """TLS settings for connections to NATS: a CA file to verify servers, and a client
    certificate and key. Any of them turns TLS on."""

    root: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def enabled(self) -> bool:
        return self.root is not None or self.cert is not None or self.key is not None


@dataclass(frozen=True)
class HTTPConfig:
    """The HTTP listen address and timeouts (in seconds)."""

    host: str = "127.0.0.1"
    port: int = 9090
    read_timeout: float = 5.0
    write_timeout: float = 5.0
    tls: ServerTLSConfig = field(default_factory=ServerTLSConfig)


@dataclass(frozen=True)
class StoreConfig:
    """The account JWT store: a folder, or memory only when ``dir`` is None."""

    dir: str | None = None
    readonly: bool = False
    shard: bool = False
    nsc: str | None = None


@dataclass(frozen=True)
class NATSConfig:
    """The NATS servers that receive claim updates; times are in seconds."""

    servers: tuple[str, ...] = ()
    user_credentials: str | None = None
    connect_timeout: float = 5.0
    reconnect_wait: float = 1.0
    max_reconnects: int = -1
    tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    # Seconds between pack requests that compare this store with its peers; 0 turns them off.
    sync_interval: float = 60.0


@dataclass(frozen=True)
class LoggingConfig:
    """Log options; ``trace`` adds every NATS protocol line at debug level."""

    time: bool = True
    debug: bool = False
    trace: bool = False
    colors: bool = True
    pid: bool = False


@dataclass(frozen=True)
class Config:
    """Everything nasd is configured with, after the command line overrides the file."""

    config_file: str | None = None
    operator: str | None = None
    system_account_jwt_path: str | None = None
    system_account: str | None = None
    http: HTTPConfig = field(default_factory=HTTPConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    nats: NATSConfig = field(default_factory=NATSConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sign_request_subject: str | None = None
    sign_request_timeout: float = 1.0
    primary: str | None = None
    replication_timeout: float = 5.0
    max_replication_pack: int = 10_000
    warnings: tuple[str, ...] = ()

    @property
    def operator_is_inline(self) -> bool:
        """Return whether ``operator`` contains the JWT itself rather than a file path."""
        return self.operator is not None and self.operator.startswith("eyJ")


def load(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and interpret the configuration file at *path*.

    Raises ConfigError for an unreadable file, a syntax error or an unusable value.
    """
    path = os.path.abspath(os.path.expanduser(path))
    try:
        parsed = conf.parse_file(path, environ=environ)
    except conf.ConfigSyntaxError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"cannot read the configuration file {path}: {error.strerror or error}") from None
    return from_mapping(parsed, os.path.dirname(path), config_file=path)


def from_mapping(data: Mapping[str, Any], base_dir: str, config_file: str | None = None) -> Config:
    """Build a Config from parsed configuration values, resolving paths against *base_dir*."""
    reader = _Reader(base_dir)
    root = reader.section(data, "", _ROOT_KEYS)

    operator = root.get("operatorjwtpath")
    inline_or_path = root.get("operator")
    if operator is not None and inline_or_path is not None:
        reader.warnings.append("both operatorjwtpath and operator are set; using operatorjwtpath")
    if operator is None and inline_or_path is not None:
        operator = inline_or_path if inline_or_path.startswith("eyJ") else reader.path(inline_or_path)

    system_account = root.get("system_account")
    if system_account is not None and not is_account_key(system_account):
        raise ConfigError(f"system_account: {system_account[:60]!r} is not a valid account public key")

    store = StoreConfig(**root.get("store", {}))
    check_store(store)
    http = root.get("http", {})
    nats = root.get("nats", {})

    return Config(
        config_file=config_file,
        operator=operator,
        system_account_jwt_path=root.get("systemaccountjwtpath"),
        system_account=system_account,
        http=HTTPConfig(**{**http, "tls": ServerTLSConfig(**http.get("tls", {}))}),
        store=store,
        nats=NATSConfig(**{**nats, "tls": ClientTLSConfig(**nats.get("tls", {}))}),
        logging=LoggingConfig(**root.get("logging", {})),
        sign_request_subject=root.get("signrequestsubject"),
        sign_request_timeout=root.get("signrequesttimeout", 1.0),
        primary=root.get("primary"),
        replication_timeout=root.get("replicationtimeout", 5.0),
        max_replication_pack=root.get("maxreplicationpack", 10_000),
        warnings=tuple(reader.warnings),
    )


def check_store(store: StoreConfig) -> None:
    """Reject store settings that contradict each other; raise ConfigError."""
    if store.nsc is not None and store.dir is not None:
        raise ConfigError(
            "store.nsc and store.dir cannot both be set: serve either an nsc operator folder or a store folder"
        )
    if store.readonly and store.dir is None and store.nsc is None:
        raise ConfigError("store.readonly: a read-only store needs store.dir, the folder to serve")


def with_overrides(config: Config, **changes: Any) -> Config:
    """Return *config* with nested changes such as ``http=dict(port=1)`` or ``operator=...``."""
    updated: dict[str, Any] = {}
    for name, value in changes.items():
        current = getattr(config, name)
        if isinstance(value, dict):
            updated[name] = replace(current, **value)
        else:
            updated[name] = value
    return replace(config, **updated)


def parse_duration(value: object, key: str) -> float:
    """Convert milliseconds (an integer) or a duration string such as "5s" into seconds."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected milliseconds or a duration such as "5s", got {value!r}')
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{key}: a duration cannot be negative, got {value!r}")
        return value / 1000.0
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", value)
        if match:
            number, unit = float(match.group(1)), match.group(2)
            return number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    raise ConfigError(f'{key}: expected milliseconds or a duration such as "5s" or "500ms", got {value!r}')


class _Reader:
    """Check and convert the values of one configuration file, collecting warnings."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir
        self.warnings: list[str] = []

    def section(self, data: Any, prefix: str, schema: Mapping[str, tuple[str, Callable[..., Any]]]) -> dict[str, Any]:
        """Convert the entries of one map; *schema* maps a lower-case key to (field, converter)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix.rstrip('.')}: expected a map such as {{ key: value }}, got {data!r}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = f"{prefix}{key}"
            entry = schema.get(key.lower())
            if entry is None:
                self.warnings.append(_unknown_key_warning(name, key, schema))
                continue
            field_name, convert = entry
            values[field_name] = convert(self, value, name)
        return values

    def path(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))


def _unknown_key_warning(name: str, key: str, schema: Mapping[str, Any]) -> str:
    warning = f"unknown configuration key {name!r} is ignored"
    close = difflib.get_close_matches(key.lower(), list(schema), n=1, cutoff=0.75)
    if close:
        warning += f"; did you mean {close[0]!r}?"
    return warning


def _string(reader: _Reader, value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _path(reader: _Reader, value: Any, key: str) -> str:
    return reader.path(_string(reader, value, key))


def _boolean(reader: _Reader, value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _integer(reader: _Reader, value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def _port(reader: _Reader, value: Any, key: str) -> int:
    port = _integer(reader, value, key)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: a port must be between 0 and 65535, got {port}")
    return port


def _duration(reader: _Reader, value: Any, key: str) -> float:
    return parse_duration(value, key)


def _positive_duration(reader: _Reader, value: Any, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be greater than zero, got {value!r}")
    return seconds


def _subject(reader: _Reader, value: Any, key: str) -> str:
    subject = _string(reader, value, key)
    if not is_valid_subject(subject, wildcards=False):
        raise ConfigError(f'{key}: expected a NATS subject without wildcards, such as "nasd.sign", got {value!r}')
    return subject


def _url(reader: _Reader, value: Any, key: str) -> str:
    url = _string(reader, value, key)
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    return url


def _servers(reader: _Reader, value: Any, key: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) and item for item in items):
        raise ConfigError(f"{key}: expected a server URL or a list of them, got {value!r}")
    return tuple(items)


def _map(schema: Mapping[str, tuple[str, Callable[..., Any]]]) -> Callable[[_Reader, Any, str], dict[str, Any]]:
    def convert(reader: _Reader, value: Any, key: str) -> dict[str, Any]:
        return reader.section(value, key + ".", schema)

    return convert


_SERVER_TLS_KEYS = {
    "cert": ("cert", _path),
    "key": ("key", _path),
    "ca": ("ca", _path),
    "verify": ("verify", _boolean),
}
_CLIENT_TLS_KEYS = {
    "root": ("root", _path),
    "cert": ("cert", _path),
    "key": ("key", _path),
}
_HTTP_KEYS = {
    "host": ("host", _string),
    "port": ("port", _port),
    "readtimeout": ("read_timeout", _duration),
    "writetimeout": ("write_timeout", _duration),
    "tls": ("tls", _map(_SERVER_TLS_KEYS)),
}
_STORE_KEYS = {
    "dir": ("dir", _path),
    "readonly": ("readonly", _boolean),
    "shard": ("shard", _boolean),
    "nsc": ("nsc", _path),
}
_NATS_KEYS = {
    "servers": ("servers", _servers),
    "usercredentials": ("user_credentials", _path),
    "connecttimeout": ("connect_timeout", _positive_duration),
    "reconnectwait": ("reconnect_wait", _positive_duration),
    "maxreconnects": ("max_reconnects", _integer),
    "tls": ("tls", _map(_CLIENT_TLS_KEYS)),
    "syncinterval": ("sync_interval", _duration),
}
_LOGGING_KEYS = {name: (name, _boolean) for name in ("time", "debug", "trace", "colors", "pid")}
_ROOT_KEYS = {
    "operatorjwtpath": ("operatorjwtpath", _path),
    "operator": ("operator", _string),
    "systemaccountjwtpath": ("systemaccountjwtpath", _path),
    "system_account": ("system_account", _string),
    "system": ("system_account", _string),
    "http": ("http", _map(_HTTP_KEYS)),
    "store": ("store", _map(_STORE_KEYS)),
    "nats": ("nats", _map(_NATS_KEYS)),
    "logging": ("logging", _map(_LOGGING_KEYS)),
    "signrequestsubject": ("signrequestsubject", _subject),
    "signrequesttimeout": ("signrequesttimeout", _positive_duration),
    "primary": ("primary", _url),
    "replicationtimeout": ("replicationtimeout", _positive_duration),
    "maxreplicationpack": ("maxreplicationpack", _integer),
}
