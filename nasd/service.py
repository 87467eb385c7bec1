"""Assemble nasd from its configuration: trust anchors, store, HTTP listener and NATS publisher."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any, cast

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.server import Site

from nasd import __version__, logs
from nasd import tls as tls_module
from nasd.activations import open_activation_store
from nasd.config import Config, ServerTLSConfig, with_overrides
from nasd.creds import CredentialsFile, CredsError
from nasd.http import AccountServerAPI, BoundedRequest
from nasd.journal import JOURNAL_NAME, PendingJournal
from nasd.jwt import JWTError, Operator, Token, decode_account, decode_operator, read_decorated
from nasd.nats import ClaimUpdatePublisher, ClientTLSError, load_client_tls, parse_server_url
from nasd.nscstore import NscFolderError, NscStore, check_operator_folder
from nasd.replication import JWTMerger, PeerSync, PrimaryImport
from nasd.resolver import ResolverResponder
from nasd.signing import SigningService
from nasd.store import AccountStore, DirectoryStore, MemoryStore, StoreError, trusted_account_check
from nasd.tls import ServerTLSError

log = Logger(observer=logs.observer)


class StartupError(Exception):
    """A configured file or value that keeps nasd from starting."""


class AccountServerSite(Site):
    """A Site that writes access log lines only when debug logging is on.

    nats-servers fetch accounts on every first connection of a user, so access lines
    at info level would drown the lines that matter.
    """

    noisy = False
    access_log = False
    write_timeout: float | None = None

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)

    def buildProtocol(self, addr: Any) -> Any:
        """Build a channel that is aborted when a closing connection cannot send the
        rest of its response within the configured write timeout."""
        channel = super().buildProtocol(addr)
        if channel is not None and self.write_timeout:
            channel.abortTimeout = self.write_timeout
        return channel


class NasService(MultiService):
    """The running server: listens in ``privilegedStartService`` so the real port is known early."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        api: AccountServerAPI,
        publisher: ClaimUpdatePublisher | None,
        tls: CertificateOptions | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.api = api
        self.publisher = publisher
        self.tls = tls
        self.port: IListeningPort | None = None
        self.site = AccountServerSite(api.resource(), timeout=config.http.read_timeout or None)
        self.site.requestFactory = BoundedRequest
        self.site.displayTracebacks = False
        self.site.access_log = config.logging.debug
        self.site.write_timeout = config.http.write_timeout
        if publisher is not None:
            publisher.setServiceParent(self)

    def privilegedStartService(self) -> None:
        http = self.config.http
        try:
            if self.tls is None:
                self.port = self.reactor.listenTCP(http.port, self.site, interface=http.host)
            else:
                self.port = self.reactor.listenSSL(http.port, self.site, self.tls, interface=http.host)
        except Exception as error:
            raise SystemExit(f"nasd: cannot listen on {format_address(http.host, http.port)}: {error}") from None
        super().privilegedStartService()
        address = cast(IPv4Address | IPv6Address, self.port.getHost())
        protocol = "HTTP" if self.tls is None else "HTTPS"
        log.info(
            "listening for {protocol} on {address}",
            protocol=protocol,
            address=format_address(address.host, address.port),
        )
        advertised = http.host if http.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        log.info("configure the nats-server with:")
        log.info(
            "  resolver: URL({scheme}://{hostport}/jwt/v1/accounts/)",
            scheme=protocol.lower(),
            hostport=format_address(advertised, address.port),
        )
        if self.tls is not None:
            self._log_resolver_tls()
        if advertised != http.host:
            log.info("(nasd listens on every interface; use an address of this host that the nats-servers can reach)")

    def _log_resolver_tls(self) -> None:
        tls = self.config.http.tls
        if tls.verify:
            log.info(
                "  resolver_tls {{ ca_file: <the CA that signed {cert}>, "
                "cert_file: <a client certificate signed by {ca}>, key_file: <its key> }}",
                cert=tls.cert,
                ca=tls.ca,
            )
        else:
            log.info("  resolver_tls {{ ca_file: <the CA that signed {cert}> }}", cert=tls.cert)

    def startService(self) -> None:
        super().startService()
        self._list_store()

    def _list_store(self) -> None:
        store = self.api.store
        if not isinstance(store, DirectoryStore) or store.listed:
            return
        started = self.reactor.seconds()

        def report(count: int) -> None:
            seconds = self.reactor.seconds() - started
            log.info(
                "store: {count} account JWT(s) in {path} (listed in {seconds:.1f} s)",
                count=count,
                path=store.location,
                seconds=seconds,
            )

        def failed(failure: Failure) -> None:
            log.error("store: listing {path} failed: {error}", path=store.location, error=failure.getErrorMessage())

        # Only peers over NATS compare store hashes.
        store.list_in_background(compute_hash=self.publisher is not None).addCallbacks(report, failed)

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        log.info("stopping: no new connections, finishing {count} upload(s) in progress", count=len(self.api.in_flight))
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
        if self.api.in_flight:
            await DeferredList(list(self.api.in_flight), consumeErrors=True)
        await super().stopService()
        self._exit_cleanly()
        log.info("stopped")

    def _exit_cleanly(self) -> None:
        """Make twistd exit with status 0 after a shutdown requested by SIGTERM or SIGINT.

        twistd (seen in Twisted 26.10) kills itself again with the signal that stopped
        the reactor, so the exit status would be -15 or -2. nasd has finished its work
        by now, so it clears the recorded signal, a private attribute of the reactor.
        """
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None


def build_service(reactor: Any, config: Config) -> NasService:
    """Check every configured file and build the service; raise StartupError on a problem."""
    logs.set_level(config.logging.debug or config.logging.trace)
    log.info("starting nasd {version}", version=__version__)
    log.info("configuration file: {path}", path=config.config_file or "(none; built-in defaults)")
    for warning in config.warnings:
        log.warn("{path}: {warning}", path=config.config_file, warning=warning)
    for name in ("time", "colors", "pid"):
        if getattr(config.logging, name) != getattr(type(config.logging)(), name):
            log.warn("logging.{name} has no effect: twistd formats the log lines", name=name)

    tls = load_server_tls(config.http.tls)
    operator = load_nsc_operator(config) if config.store.nsc is not None else load_operator(config)
    system_account = load_system_account(config, operator)
    store = open_store(reactor, config, operator)
    journal = None
    if store.location is not None and not store.readonly:
        # A read-only or nsc folder belongs to someone else: nasd writes nothing into it.
        journal = PendingJournal(os.path.join(store.location, JOURNAL_NAME))
    publisher = build_publisher(reactor, config, journal, latest_jwt=lambda key: _stored_jwt(store, key))
    if journal is not None:
        requeue_pending(journal, store, publisher)

    activation_folder = store.location if isinstance(store, DirectoryStore) else None
    activations = open_activation_store(reactor, activation_folder, store.readonly)
    signer = build_signer(config, publisher, store)
    api = AccountServerAPI(
        reactor, store, operator, publisher, system_account, activations, signer, config.max_replication_pack
    )
    service = NasService(reactor, config, api, publisher, tls)
    watch_store(reactor, store, publisher, service)
    add_replication(reactor, config, store, operator, publisher, system_account, service)
    return service


def add_replication(
    reactor: Any,
    config: Config,
    store: AccountStore,
    operator: Operator | None,
    publisher: ClaimUpdatePublisher | None,
    system_account: Token | None,
    parent: MultiService,
) -> None:
    """Add the services that exchange account JWTs with other servers, as configured.

    With NATS, nasd responds to the resolver requests of nats-servers and peers. It also
    stores the claim updates of peers and compares its store with theirs, unless the
    store is read-only. With ``primary``, it imports the primary's JWTs at startup.
    """
    if config.max_replication_pack < 0:
        raise StartupError(
            f"maxreplicationpack must be 0 or more (0 turns the pack off), got {config.max_replication_pack}"
        )
    merger = JWTMerger(reactor, store, operator)
    merger.setServiceParent(parent)
    if publisher is not None:
        responder = ResolverResponder(reactor, publisher.connection, store, merger, publisher, system_account)
        responder.setServiceParent(parent)
        if store.readonly:
            log.info("peers: the store is read-only, so nasd takes no JWTs from peers")
        else:
            sync = PeerSync(reactor, publisher.connection, store, merger, config.nats.sync_interval, publisher)
            sync.setServiceParent(parent)

    if config.primary is not None:
        if store.readonly:
            raise StartupError("primary: a read-only store cannot import JWTs; remove primary or store.readonly")
        client = HTTPClient(Agent(reactor))
        importer = PrimaryImport(
            reactor, client, config.primary, config.max_replication_pack, config.replication_timeout, merger
        )
        importer.setServiceParent(parent)


def build_signer(config: Config, publisher: ClaimUpdatePublisher | None, store: AccountStore) -> SigningService | None:
    """Build the client of the signing service that signs self-signed account JWTs, if one is configured.

    It sends its requests on the publisher's NATS connection, so it needs nats.servers.
    """
    subject = config.sign_request_subject
    if subject is None:
        return None
    if publisher is None:
        raise StartupError(
            f"signrequestsubject {subject} needs a NATS connection to reach the signing service; set nats.servers"
        )
    if store.readonly:
        log.warn("signrequestsubject has no effect: the store is read-only, so every upload is rejected")
    log.info(
        "signing service: self-signed account JWTs are sent to {subject}, with a timeout of {timeout:g} s",
        subject=subject,
        timeout=config.sign_request_timeout,
    )
    connection = publisher.connection
    return SigningService(lambda: connection, subject, config.sign_request_timeout)


def load_server_tls(tls: ServerTLSConfig) -> CertificateOptions | None:
    """Load the HTTPS settings, or return None without HTTPS; raise StartupError naming the file."""
    try:
        return tls_module.load_server_tls(tls)
    except ServerTLSError as error:
        raise StartupError(str(error)) from None


def load_operator(config: Config) -> Operator | None:
    if config.operator is None:
        log.warn("no operator is configured: every upload will be rejected; set operator (or operatorjwtpath)")
        return None
    source = "the inline operator JWT" if config.operator_is_inline else config.operator
    try:
        text = config.operator if config.operator_is_inline else _read_text(config.operator)
        operator = Operator.from_token(decode_operator(read_decorated(text)))
    except (OSError, UnicodeDecodeError) as error:
        raise StartupError(f"cannot read the operator JWT {source}: {_reason(error)}") from None
    except JWTError as error:
        raise StartupError(f"the operator JWT {source} is invalid: {error}") from None
    log.info("operator {name} ({key}) from {source}", name=operator.name, key=operator.key, source=source)
    if operator.signing_keys:
        log.info("operator signing keys: {keys}", keys=", ".join(sorted(operator.signing_keys)))
    return operator


def load_system_account(config: Config, operator: Operator | None) -> Token | None:
    expected = {
        name: key
        for name, key in (
            ("the configured system_account", config.system_account),
            ("the operator's system_account", operator.system_account if operator else None),
        )
        if key
    }
    token = None
    if config.system_account_jwt_path is not None:
        path = config.system_account_jwt_path
        try:
            token = decode_account(read_decorated(_read_text(path)))
        except (OSError, UnicodeDecodeError) as error:
            raise StartupError(f"cannot read the system account JWT {path}: {_reason(error)}") from None
        except JWTError as error:
            raise StartupError(f"the system account JWT {path} is invalid: {error}") from None
        if operator is not None and not operator.trusts(token.issuer):
            raise StartupError(
                f"the system account JWT {path} is not signed by operator {operator.name} or its signing keys"
            )
        expected[f"the subject of {path}"] = token.subject

    if len(set(expected.values())) > 1:
        listing = "; ".join(f"{name} is {key}" for name, key in expected.items())
        raise StartupError(f"the system account is configured inconsistently: {listing}")
    if expected:
        key = next(iter(expected.values()))
        log.info(
            "system account {key}{source}",
            key=key,
            source=f" (JWT from {config.system_account_jwt_path})" if token else "",
        )
    else:
        log.info("no system account is configured")
    return token


def open_store(reactor: Any, config: Config, operator: Operator | None = None) -> AccountStore:
    """Open the configured store; a read-only or nsc store serves only JWTs that *operator* trusts."""
    if config.store.nsc is not None:
        if operator is None:
            raise StartupError("store.nsc: the operator of the nsc folder is needed to verify its accounts")
        return open_nsc_store(reactor, config.store.nsc, operator)
    if config.store.dir is None:
        log.warn("store: in memory only; nothing survives a restart (set store.dir to keep JWTs on disk)")
        return MemoryStore()
    check = None
    if config.store.readonly:
        # nasd did not write the files of a read-only store, so each one is verified when read.
        if operator is None:
            raise StartupError(
                "store.readonly: a read-only store serves only account JWTs signed by the operator, "
                "so it needs operator (the operator JWT file)"
            )
        check = trusted_account_check(operator, reactor)
    store = DirectoryStore(
        reactor, config.store.dir, shard=config.store.shard, readonly=config.store.readonly, check=check
    )
    try:
        store.open(list_keys=False)
    except (OSError, StoreError) as error:
        raise StartupError(f"cannot open the store folder {config.store.dir}: {_reason(error)}") from None
    layout = "sharded" if config.store.shard else "flat"
    mode = ", read-only" if config.store.readonly else ""
    log.info("store: {layout} directory {path}{mode}", layout=layout, path=store.location, mode=mode)
    return store


def load_nsc_operator(config: Config) -> Operator:
    """Load the operator JWT of the nsc folder in store.nsc; a configured operator must have the same key.

    When both are set, the configured operator JWT is used, as nats-servers are
    usually configured with the same file.
    """
    assert config.store.nsc is not None
    try:
        folder = check_operator_folder(config.store.nsc)
    except NscFolderError as error:
        raise StartupError(str(error)) from None
    configured = load_operator(config) if config.operator is not None else None
    operator = load_operator(with_overrides(config, operator=folder.operator_jwt))
    assert operator is not None
    if configured is None:
        return operator
    if configured.key != operator.key:
        raise StartupError(
            f"the configured operator {configured.name} ({configured.key}) is not the operator of the nsc folder "
            f"{folder.path}, which is {operator.name} ({operator.key}); correct operator or remove it"
        )
    return configured


def open_nsc_store(reactor: Any, path: str, operator: Operator) -> NscStore:
    try:
        store = NscStore(check_operator_folder(path), trusted_account_check(operator, reactor))
        store.open()
    except NscFolderError as error:
        raise StartupError(str(error)) from None
    except OSError as error:
        raise StartupError(f"cannot read the nsc operator folder {path}: {_reason(error)}") from None
    log.info(
        "store: nsc operator folder {path} (operator {name}), {count} account(s)",
        path=store.folder.path,
        name=operator.name,
        count=len(store),
    )
    return store


def watch_store(
    reactor: Any, store: AccountStore, publisher: ClaimUpdatePublisher | None, parent: MultiService
) -> None:
    """Watch the files of a read-only or nsc store, so that a changed account file is served
    and published at once. nasd writes the files of other stores itself."""
    if not (isinstance(store, NscStore) or (isinstance(store, DirectoryStore) and store.readonly)):
        return
    try:
        from nasd.watch import watcher_for
    except ImportError as error:
        log.warn(
            "store: changes in {path} are not watched, because inotify is not available ({error}); "
            "restart nasd to serve changed account files",
            path=store.location,
            error=error,
        )
        return
    watcher = watcher_for(reactor, store, publisher)
    if watcher is not None:
        watcher.setServiceParent(parent)


def requeue_pending(journal: PendingJournal, store: AccountStore, publisher: ClaimUpdatePublisher | None) -> None:
    """Queue again the claim updates that NATS had not confirmed when nasd last stopped."""
    keys = journal.load()
    if not keys:
        return
    if publisher is None:
        log.warn(
            "{count} claim update(s) recorded in {path} were never published, and NATS is not configured",
            count=len(keys),
            path=journal.path,
        )
        return
    queued = 0
    for key in keys:
        entry = store.get(key)
        if entry is not None:
            publisher.publish_account_update(key, entry.raw)
            queued += 1
    log.info("queued {count} claim update(s) left unpublished at the last stop", count=queued)


def build_publisher(
    reactor: Any,
    config: Config,
    journal: PendingJournal | None = None,
    latest_jwt: Callable[[str], bytes | None] | None = None,
) -> ClaimUpdatePublisher | None:
    nats = config.nats
    if not nats.servers:
        log.info("NATS: not configured; claim updates will not be published")
        return None
    for url in nats.servers:
        try:
            parse_server_url(url)
        except ValueError as error:
            raise StartupError(f"nats.servers: {error}") from None
    credentials = None
    if nats.user_credentials is not None:
        try:
            credentials = CredentialsFile(nats.user_credentials)
        except CredsError as error:
            raise StartupError(str(error)) from None
    else:
        log.warn(
            "NATS: no usercredentials configured; nats-server only accepts claim updates from a system account user"
        )
    try:
        tls = load_client_tls(nats.tls)
    except ClientTLSError as error:
        raise StartupError(str(error)) from None
    log.info(
        "NATS: servers {servers}, creds {creds}",
        servers=", ".join(nats.servers),
        creds=nats.user_credentials or "(none)",
    )
    if tls is not None:
        log.info(
            "NATS: TLS required, servers verified with {root}, client certificate {cert}",
            root=nats.tls.root or "the system's trust store",
            cert=nats.tls.cert or "(none)",
        )
    return ClaimUpdatePublisher(
        reactor,
        servers=nats.servers,
        credentials=credentials,
        connect_timeout=nats.connect_timeout,
        reconnect_wait=nats.reconnect_wait,
        max_reconnects=nats.max_reconnects,
        trace=config.logging.trace,
        journal=journal,
        tls=tls,
        latest_jwt=latest_jwt,
    )


def _stored_jwt(store: AccountStore, key: str) -> bytes | None:
    entry = store.get(key)
    return entry.raw if entry is not None else None


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
