"""A small NATS client on Twisted, and the service that publishes account claim updates
with it so that running nats-servers apply each account JWT that nasd stores.

From the wire up: ``NATSClientProtocol`` (protocol.py) is one connection.
``NATSClientFactory`` (connection.py) connects to the configured and discovered servers
in turn, and ``NATSConnection`` is the service that other parts of nasd use to publish,
subscribe and send requests. ``ClaimUpdatePublisher`` (publisher.py) publishes claim
updates over a ``NATSConnection``. TLS settings are in tls.py.
"""

from nasd.nats.connection import NATSClientFactory, NATSConnection, Subscription
from nasd.nats.protocol import (
    ACTIVATION_UPDATE_SUBJECT,
    CLAIMS_UPDATE_SUBJECT,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_PORT,
    MAX_CONTROL_LINE,
    MAX_INFO_LINE,
    NO_RESPONDERS_STATUS,
    ClientOptions,
    ClientReactor,
    MaxPayloadExceededError,
    Message,
    NATSClientProtocol,
    NATSConnectionClosedError,
    NATSError,
    NATSServerError,
    NoRespondersError,
    NotConnectedError,
    RequestTimeoutError,
    ServerAddress,
    parse_headers,
    parse_server,
    parse_server_url,
)
from nasd.nats.publisher import ClaimUpdateAcknowledgements, ClaimUpdatePublisher, count_acknowledgements
from nasd.nats.tls import ClientTLS, ClientTLSError, load_client_tls

__all__ = [
    "ACTIVATION_UPDATE_SUBJECT",
    "CLAIMS_UPDATE_SUBJECT",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_PORT",
    "MAX_CONTROL_LINE",
    "MAX_INFO_LINE",
    "NO_RESPONDERS_STATUS",
    "ClaimUpdateAcknowledgements",
    "ClaimUpdatePublisher",
    "ClientOptions",
    "ClientReactor",
    "ClientTLS",
    "ClientTLSError",
    "MaxPayloadExceededError",
    "Message",
    "NATSClientFactory",
    "NATSClientProtocol",
    "NATSConnection",
    "NATSConnectionClosedError",
    "NATSError",
    "NATSServerError",
    "NoRespondersError",
    "NotConnectedError",
    "RequestTimeoutError",
    "ServerAddress",
    "Subscription",
    "count_acknowledgements",
    "load_client_tls",
    "parse_headers",
    "parse_server",
    "parse_server_url",
]
