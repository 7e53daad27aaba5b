"""Typed errors, split by whose fault it is (after h11's Local/RemoteProtocolError).

- :class:`ProtocolError`: a *remote* party sent something wrong (malformed bytes, bad signature, wrong
  round, wrong phase, duplicate...). The message is dropped; the receiving state machine is unchanged and
  the round goes on where it can. Log it with its ``reason`` and carry on.
  :class:`Misbehaviour` is the kind that no honest party sends (it counts against the sender).
- :class:`LocalUsageError`: *this* process misused an API (called a method in the wrong state, passed a
  vector of the wrong length). A bug in the caller; fix the call.
- :class:`ConfigurationError`: a setting that cannot work (e.g. a bit budget that could overflow the ring).
  Raised at configuration time, before any round starts.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base class of every error Tessera raises on purpose."""


class ProtocolError(TesseraError):
    """A remote party sent something wrong; the message was rejected and nothing changed."""

    def __init__(self, reason: str, *, sender: int | str | None = None) -> None:
        self.reason = reason
        self.sender = sender
        super().__init__(reason if sender is None else f"{reason} (from {sender})")


class Misbehaviour(ProtocolError):
    """A remote party sent what no honest implementation sends: a bad signature, an invalid key, a malformed
    vector, shares nobody asked for. Unlike a late or repeated message (a plain :class:`ProtocolError`), it
    counts against the sender: the curator excludes a participant that keeps doing it."""


class LocalUsageError(TesseraError):
    """This process called an API wrongly (wrong state, wrong argument)."""


class ConfigurationError(TesseraError, ValueError):
    """A configuration value cannot work; raised before anything starts."""


class TransportError(TesseraError):
    """The message transport (RabbitMQ) failed: a refused or unconfirmed publish, a broker that cannot be
    reached, a closed endpoint. See ``tessera.transport.errors`` for the specific kinds."""


__all__ = [
    "ConfigurationError",
    "LocalUsageError",
    "Misbehaviour",
    "ProtocolError",
    "TesseraError",
    "TransportError",
]
