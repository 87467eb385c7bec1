"""Tests for turning a parsed configuration file into a typed Config."""

import os

import pytest

from nasd.config import Config, ConfigError, load, parse_duration
from tests.tokens import SYS


def _load(tmp_path, text: str, environ=None) -> Config:
    path = tmp_path / "nas.conf"
    path.write_text(text)
    return load(str(path), environ=environ or {})


def test_defaults_listen_on_loopback():
    config = Config()
    assert config.http.host == "127.0.0.1"
    assert config.http.port == 9090
    assert config.store.dir is None
    assert config.nats.max_reconnects == -1


def test_full_file(tmp_path):
    config = _load(
        tmp_path,
        """
        OperatorJWTPath: op.jwt
        systemaccountjwtpath = "sys/SYS.jwt"
        http { host: 0.0.0.0, port: 8080, ReadTimeout: 2000, writetimeout: "3s" }
        store: { dir: jwt, shard: true, readonly: false }
        nats {
          servers: ["nats://127.0.0.1:4222", "127.0.0.1:4223"]
          usercredentials: ~/sys.creds
          connecttimeout: 500ms
          reconnectwait: 250
          maxreconnects: 3
        }
        logging { debug: yes, trace: off }
        """,
    )
    assert config.operator == str(tmp_path / "op.jwt")
    assert config.system_account_jwt_path == str(tmp_path / "sys" / "SYS.jwt")
    assert config.http.host == "0.0.0.0"
    assert config.http.port == 8080
    assert config.http.read_timeout == 2.0
    assert config.http.write_timeout == 3.0
    assert config.store.dir == str(tmp_path / "jwt")
    assert config.store.shard is True
    assert config.nats.servers == ("nats://127.0.0.1:4222", "127.0.0.1:4223")
    assert config.nats.user_credentials == os.path.expanduser("~/sys.creds")
    assert config.nats.connect_timeout == 0.5
    assert config.nats.reconnect_wait == 0.25
    assert config.nats.max_reconnects == 3
    assert config.logging.debug is True
    assert config.logging.trace is False
    assert config.warnings == ()
    assert config.config_file == str(tmp_path / "nas.conf")


def test_nats_server_spellings(tmp_path):
    config = _load(tmp_path, f'operator: "./demo.jwt"\nsystem_account: {SYS}\n')
    assert config.operator == str(tmp_path / "demo.jwt")
    assert config.system_account == SYS


def test_inline_operator_jwt_kept(tmp_path):
    config = _load(tmp_path, "operator: eyJ0eXAi.abc.def\n")
    assert config.operator == "eyJ0eXAi.abc.def"
    assert config.operator_is_inline


def test_single_server_string(tmp_path):
    assert _load(tmp_path, "nats { servers: nats://127.0.0.1:4222 }").nats.servers == ("nats://127.0.0.1:4222",)


def test_unknown_keys_warned(tmp_path):
    config = _load(tmp_path, "colour: red\nhttp { prot: 1 }\n")
    assert "unknown configuration key 'colour' is ignored" in config.warnings
    assert "unknown configuration key 'http.prot' is ignored; did you mean 'port'?" in config.warnings


def test_misspelt_operator_suggested(tmp_path):
    config = _load(tmp_path, "opertor: op.jwt\n")
    assert config.warnings == ("unknown configuration key 'opertor' is ignored; did you mean 'operator'?",)


def test_environment_variable_reference(tmp_path):
    assert _load(tmp_path, "http { port: $NASD_PORT }", {"NASD_PORT": "7777"}).http.port == 7777


@pytest.mark.parametrize(
    "text, message",
    [
        ('http { port: "80" }', "http.port: expected an integer"),
        ("http { port: 70000 }", "between 0 and 65535"),
        ("store { shard: 1 }", "store.shard: expected true or false"),
        ("store { dir: [a] }", "store.dir: expected a string"),
        ("http: 9090", "http: expected a map"),
        ("nats { servers: [1] }", "nats.servers: expected a server URL"),
        ("nats { reconnectwait: soon }", "nats.reconnectwait: expected milliseconds"),
        ("nats { maxreconnects: 1.5 }", "nats.maxreconnects: expected an integer"),
        ("system_account: ABC", "system_account: 'ABC' is not a valid account public key"),
        ("store { readonly: true }", "a read-only store needs store.dir"),
    ],
)
def test_wrong_types_name_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_syntax_error_names_file_line_column(tmp_path):
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, 'http {\n  port: "open\n}\n')
    assert str(raised.value).startswith(f"{tmp_path / 'nas.conf'}:2:")


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration file .*missing.conf"):
        load(str(tmp_path / "missing.conf"))


def test_durations():
    assert parse_duration(1500, "k") == 1.5
    assert parse_duration("2m", "k") == 120.0
    assert parse_duration("250ms", "k") == 0.25
    with pytest.raises(ConfigError, match="negative"):
        parse_duration(-1, "k")
    with pytest.raises(ConfigError):
        parse_duration(True, "k")


@pytest.mark.parametrize("key", ["reconnectwait", "connecttimeout"])
def test_zero_nats_wait_rejected(tmp_path, key):
    with pytest.raises(ConfigError, match=f"nats.{key}: must be greater than zero"):
        _load(tmp_path, f"nats {{ {key}: 0 }}")


def test_tls_and_service_keys(tmp_path):
    config = _load(
        tmp_path,
        """
        http { tls { cert: c.pem, key: k.pem, ca: ca.pem, verify: true } }
        nats { tls { root: ca.pem } }
        store { nsc: ops/demo }
        signrequestsubject: nasd.sign
        signrequesttimeout: "2s"
        primary: "https://primary.example:9090"
        replicationtimeout: 3000
        maxreplicationpack: 500
        """,
    )
    assert config.http.tls.cert == str(tmp_path / "c.pem")
    assert config.http.tls.verify is True
    assert config.http.tls.enabled
    assert config.nats.tls.root == str(tmp_path / "ca.pem")
    assert config.nats.tls.enabled
    assert config.store.nsc == str(tmp_path / "ops" / "demo")
    assert config.sign_request_subject == "nasd.sign"
    assert config.sign_request_timeout == 2.0
    assert config.primary == "https://primary.example:9090"
    assert config.replication_timeout == 3.0
    assert config.max_replication_pack == 500


@pytest.mark.parametrize(
    "text, message",
    [
        ("store { nsc: a, dir: b }", "cannot both be set"),
        ("signrequestsubject: 'a.*'", "without wildcards"),
        ("primary: ftp://x", "http:// or https://"),
        ('http { tls { verify: "yes" } }', "http.tls.verify: expected true or false"),
    ],
)
def test_service_keys_rejected(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_sync_interval(tmp_path):
    assert Config().nats.sync_interval == 60.0
    assert _load(tmp_path, 'nats { syncinterval: "5s" }').nats.sync_interval == 5.0
    assert _load(tmp_path, "nats { syncinterval: 0 }").nats.sync_interval == 0.0
