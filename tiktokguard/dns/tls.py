"""TLS for the encrypted listeners (DoT, RFC 7858; DoH, RFC 8484): one server context, loaded
from the PEM files of the config, re-loaded in place on SIGHUP (new handshakes get the new
certificate; connections already open keep theirs)."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(certificate: Path, private_key: Path) -> ssl.SSLContext:
    """TLS 1.2 at least, the certificate chain and key loaded. ssl.SSLError or OSError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    return context


def reload(context: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    """Load a renewed certificate into the context in force (a failure keeps the old one)."""
    context.load_cert_chain(certificate, private_key)


__all__ = ["reload", "server_context"]
