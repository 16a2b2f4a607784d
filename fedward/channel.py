"""The cross-site channel: gRPC over mutual TLS under the consortium's authority, carrying JSON.

In cross-site mode each hospital runs its own service on its own machines. A caller gets through
only with a certificate the consortium's authority signed (checked in the TLS handshake), that
is within its validity and not revoked (checked on every call against the revocation list on the
hospital's own disk, re-read when it changes). The driver checks each service's certificate the
same way against its own list, and that it names the hospital it means to call. Messages are JSON
objects: nothing a caller sends is code, or is deserialized as code.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedward.certificates import Identity, PeerRefused
from fedward.errors import ConfigError

SERVICE = "fedward.Hospital"
MAX_MESSAGE_BYTES = 1024**3  # a masked update of 100 M parameters, as base64 JSON, fits
Method = Callable[[dict[str, Any], str], dict[str, Any]]  # (message, the caller's certified name) -> reply


def serve(identity: Identity, address: str, methods: Mapping[str, Method], workers: int = 4) -> tuple[grpc.Server, int]:
    """Start the hospital's service on `address` (host:port, port 0 for any); returns it and its port."""
    credentials = grpc.ssl_server_credentials(
        [(identity.key_file.read_bytes(), identity.certificate_file.read_bytes())],
        root_certificates=identity.authority_file.read_bytes(),
        require_client_auth=True,
    )
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(_admitted(identity, method), request_deserializer=_decode, response_serializer=_encode)
        for name, method in methods.items()
    }
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(ThreadPoolExecutor(workers), options=options)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_secure_port(address, credentials)
    if not port:
        raise ConfigError(f"cannot listen on {address}")
    server.start()
    return server, port


def connect(identity: Identity, target: str, server_name: str) -> grpc.Channel:
    """A channel to the service at `target` (host:port) whose certificate names `server_name`,
    presenting this party's own certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.authority_file.read_bytes(),
        private_key=identity.key_file.read_bytes(),
        certificate_chain=identity.certificate_file.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", server_name), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    return grpc.secure_channel(target, credentials, options=options)


def service_name(identity: Identity, target: str, server_name: str, timeout_s: float) -> str:
    """The name the certificate of the service at `target` vouches for now, checked against this
    party's own revocation list; PeerRefused naming why not. gRPC's handshake checks the authority
    and the validity, but Python's gRPC does not show the certificate it received, so it is read in
    a TLS handshake of its own, with the same authority, certificate and server name."""
    context = ssl.create_default_context(cafile=str(identity.authority_file))
    context.load_cert_chain(identity.certificate_file, identity.key_file)
    context.set_alpn_protocols(["h2"])
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw, context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise PeerRefused(f"no TLS handshake with the service at {target}: {e}") from None
    return identity.vouch(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))


def call(channel: grpc.Channel, method: str, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=_encode, response_deserializer=_decode)(message, timeout=timeout_s)


def _admitted(identity: Identity, method: Method):
    def handle(message: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
        try:
            caller = identity.vouch((context.auth_context().get("x509_pem_cert") or [b""])[0])
        except PeerRefused as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{identity.name} refuses the call: {e}")
        return method(message, caller)

    return handle


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, allow_nan=False).encode()


def _decode(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message
