"""Tests for the twistd options and for assembling the service from a configuration."""

import os
import shutil
import tempfile

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

from nasd import tap
from nasd.config import Config, with_overrides
from nasd.service import NasService, StartupError, build_service
from tests.tokens import ACME, CREDS, STORE, SYS


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="nasd-tap-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def messages():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda level=None: [formatEvent(e) for e in events if level is None or e.get("log_level") == level]
    globalLogPublisher.removeObserver(events.append)


def _options(*arguments: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(arguments))
    return options


@pytest.mark.parametrize(
    "value, expected",
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("[::1]:8080", ("::1", 8080)),
        (":9090", ("", 9090)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_host_port_parsed(value, expected):
    assert tap.parse_host_port(value) == expected


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:x", "h:70000", "::1:9090", ""])
def test_host_port_rejected(value):
    with pytest.raises(usage.UsageError, match="--hp"):
        tap.parse_host_port(value)


def test_options_override_file(folder):
    path = os.path.join(folder, "nas.conf")
    with open(path, "w") as file:
        file.write("http { port: 1 }\nstore { dir: a, shard: true }\nnats { servers: nats://x:1 }\n")
    config = tap.build_config(
        _options(
            "-c",
            path,
            "--hp",
            "127.0.0.2:2",
            "--dir",
            folder,
            "--nats",
            "nats://a:1, nats://b:2",
            "--creds",
            "sys.creds",
            "-D",
            "-V",
        )
    )
    assert (config.http.host, config.http.port) == ("127.0.0.2", 2)
    assert config.store.dir == folder
    assert config.store.shard is True
    assert config.nats.servers == ("nats://a:1", "nats://b:2")
    assert config.nats.user_credentials == os.path.abspath("sys.creds")
    assert config.logging.debug is True
    assert config.logging.trace is True


def test_options_inline_operator_kept():
    assert tap.build_config(_options("--operator", "eyJabc.def.ghi")).operator == "eyJabc.def.ghi"


def test_missing_config_file_is_usage_error(folder):
    with pytest.raises(usage.UsageError, match="--config"):
        _options("-c", os.path.join(folder, "missing.conf"))


def test_empty_nats_option_rejected():
    with pytest.raises(usage.UsageError, match="--nats"):
        _options("--nats", " , ")


def test_bad_config_exits_with_message(folder):
    path = os.path.join(folder, "nas.conf")
    with open(path, "w") as file:
        file.write("http { port: true }\n")
    with pytest.raises(SystemExit) as raised:
        tap.makeService(_options("-c", path))
    assert str(raised.value) == "nasd: http.port: expected an integer, got True"


def _config(folder, **changes) -> Config:
    base = Config(operator=str(STORE / "demo.jwt"), http=Config().http)
    base = with_overrides(base, http={"port": 0}, store={"dir": os.path.join(folder, "jwt")})
    return with_overrides(base, **changes) if changes else base


def test_service_logs_resolver_line(folder, messages):
    reactor = MemoryReactorClock()
    service = build_service(reactor, _config(folder))
    assert isinstance(service, NasService)
    service.privilegedStartService()
    [(port, _, _, interface)] = reactor.tcpServers
    assert (port, interface) == (0, "127.0.0.1")
    logged = messages(LogLevel.info)
    assert "configure the nats-server with:" in logged
    assert any(
        line.startswith("  resolver: URL(http://127.0.0.1:") and line.endswith("/jwt/v1/accounts/)") for line in logged
    )
    assert any(line.startswith("operator demo (OBCQ") for line in logged)


def test_missing_operator_file_named(folder):
    with pytest.raises(StartupError, match="cannot read the operator JWT .*nope.jwt"):
        build_service(MemoryReactorClock(), _config(folder, operator=os.path.join(folder, "nope.jwt")))


def test_account_jwt_as_operator_rejected(folder):
    path = str(STORE / "accounts" / "ACME" / "ACME.jwt")
    with pytest.raises(StartupError, match="operator JWT .* is invalid: expected an operator JWT"):
        build_service(MemoryReactorClock(), _config(folder, operator=path))


def test_system_account_mismatch_stops(folder):
    with pytest.raises(StartupError, match=f"system account is configured inconsistently.*{ACME}.*{SYS}"):
        build_service(MemoryReactorClock(), _config(folder, system_account=ACME))


def test_system_account_jwt_mismatch_stops(folder):
    path = str(STORE / "accounts" / "ACME" / "ACME.jwt")
    with pytest.raises(StartupError, match="inconsistently"):
        build_service(MemoryReactorClock(), _config(folder, system_account_jwt_path=path))


def test_system_account_jwt_accepted(folder, messages):
    path = str(STORE / "accounts" / "SYS" / "SYS.jwt")
    build_service(MemoryReactorClock(), _config(folder, system_account_jwt_path=path, system_account=SYS))
    assert any(line.startswith(f"system account {SYS} (JWT from") for line in messages(LogLevel.info))


def test_missing_creds_named(folder):
    config = _config(
        folder, nats={"servers": ("nats://127.0.0.1:4222",), "user_credentials": os.path.join(folder, "x.creds")}
    )
    with pytest.raises(StartupError, match="x.creds"):
        build_service(MemoryReactorClock(), config)


def test_bad_nats_url_named(folder):
    config = _config(
        folder, nats={"servers": ("http://127.0.0.1:4222",), "user_credentials": str(CREDS / "SYS" / "sys.creds")}
    )
    with pytest.raises(StartupError, match="nats.servers: .*http://127.0.0.1:4222"):
        build_service(MemoryReactorClock(), config)


def test_store_folder_that_is_a_file(folder):
    path = os.path.join(folder, "file")
    with open(path, "w") as file:
        file.write("x")
    with pytest.raises(StartupError, match="cannot open the store folder"):
        build_service(MemoryReactorClock(), _config(folder, store={"dir": path}))


def test_memory_store_warns(folder, messages):
    build_service(MemoryReactorClock(), _config(folder, store={"dir": None}))
    assert any("nothing survives a restart" in line for line in messages(LogLevel.warn))


def test_no_operator_warns(folder, messages):
    build_service(MemoryReactorClock(), _config(folder, operator=None))
    assert any("no operator is configured" in line for line in messages(LogLevel.warn))


def test_site_applies_http_timeouts(folder):
    config = _config(folder, http={"read_timeout": 7.0, "write_timeout": 3.0})
    service = build_service(MemoryReactorClock(), config)
    channel = service.site.buildProtocol(None)
    assert service.site.timeOut == 7.0
    assert channel.abortTimeout == 3.0
    assert service.site.access_log is False


def test_version_option_prints_nasd_version(capsys):
    with pytest.raises(SystemExit) as raised:
        _options("--version")
    assert raised.value.code == 0
    assert capsys.readouterr().out.strip().startswith("nasd ")


def test_nsc_option_replaces_dir(folder):
    path = os.path.join(folder, "nas.conf")
    with open(path, "w") as file:
        file.write("store { dir: jwt }\n")
    config = tap.build_config(_options("-c", path, "--nsc", folder, "--ro"))
    assert config.store.nsc == folder
    assert config.store.dir is None
    assert config.store.readonly is True


def test_dir_and_nsc_together_rejected(folder):
    with pytest.raises(usage.UsageError, match="--dir and --nsc"):
        _options("--dir", folder, "--nsc", folder)


def test_primary_option_checked():
    with pytest.raises(usage.UsageError, match="--primary"):
        _options("--primary", "primary:9090")
    assert tap.build_config(_options("--primary", "http://127.0.0.1:9090")).primary == "http://127.0.0.1:9090"
