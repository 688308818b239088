"""Pipelined LDAP add requests on an ldap3 connection's own socket.

Why: ldap3 builds every request through pyasn1 (about 1.5 ms of CPU per add here) and then
waits for the answer before sending the next, so a bulk onboarding of thousands of officials
spends most of its time either encoding or idle. An AddRequest is a small, fixed BER shape
(RFC 4511 §4.7), so it is encoded here directly, a window of them is kept in flight, and the
answers are matched by message id (slapd may answer out of order). Framing and decoding of
the answers reuse ldap3's own fast decoder.

Only plain or TLS-wrapped sockets bound with a simple bind are supported (no SASL security
layer); :func:`supported` says whether a connection qualifies, and callers fall back to
ordinary ``Connection.add`` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPSocketReceiveError
from ldap3.utils.asn1 import decode_message_fast, ldap_result_to_dict_fast

ADD_RESPONSE = 9  # [APPLICATION 9]
WINDOW = 32  # requests in flight; a few hundred bytes each, far below socket buffers


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _len(len(body)) + body


def _octets(value: Any) -> bytes:
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return _tlv(0x04, raw)


def _integer(n: int) -> bytes:
    return _tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True))


def encode_add(message_id: int, dn: str, object_classes: Sequence[str],
               attributes: Mapping[str, Any]) -> bytes:
    """One LDAPMessage carrying an AddRequest; a value may be a string, bytes or a list."""
    attrs = [("objectClass", list(object_classes)), *attributes.items()]
    parts = []
    for name, value in attrs:
        values = value if isinstance(value, list | tuple) else [value]
        parts.append(_tlv(0x30, _octets(name) + _tlv(0x31, b"".join(map(_octets, values)))))
    op = _tlv(0x68, _octets(dn) + _tlv(0x30, b"".join(parts)))  # [APPLICATION 8] constructed
    return _tlv(0x30, _integer(message_id) + op)


def supported(conn: ldap3.Connection) -> bool:
    return (conn.strategy_type == ldap3.SYNC and conn.bound and not conn.closed
            and conn.sasl_mechanism is None and conn.socket is not None)


def add_many(conn: ldap3.Connection,
             requests: Iterable[tuple[str, Sequence[str], Mapping[str, Any]]]
             ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Send the adds with up to :data:`WINDOW` in flight; yields ``(index, result)`` as the
    answers arrive, ``result`` as ldap3 gives it (``result``, ``description``, ``message``).
    A socket failure raises ldap3's exception; requests not yet answered are then unknown."""
    pending: dict[int, int] = {}  # message id -> index
    sock = conn.socket
    strategy = conn.strategy

    def drain(until: int) -> Iterator[tuple[int, dict[str, Any]]]:
        while len(pending) > until:
            messages = strategy.receiving()
            if not messages:  # the server closed the connection
                raise LDAPSocketReceiveError("connection closed with adds in flight")
            for raw in messages:
                msg = decode_message_fast(raw)
                index = pending.pop(int(msg["messageID"]), None)
                if index is None or msg["protocolOp"] != ADD_RESPONSE:
                    continue  # a notice of disconnection comes with id 0; the recv will fail
                yield index, ldap_result_to_dict_fast(msg["payload"])

    for index, (dn, classes, attrs) in enumerate(requests):
        mid = conn.server.next_message_id()
        sock.sendall(encode_add(mid, dn, classes, attrs))
        pending[mid] = index
        yield from drain(WINDOW - 1)
    yield from drain(0)
