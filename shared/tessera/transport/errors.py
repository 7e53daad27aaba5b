"""The transport's error kinds, all subclasses of :class:`tessera.errors.TransportError`.

How to recover from each:

- :class:`PublishRefused`: the broker closed the publishing channel (``ACCESS_REFUSED`` 403 for a missing
  permission or topic permission, ``PRECONDITION_FAILED`` 406 for a ``user_id`` that is not the
  authenticated user, ``NOT_FOUND`` 404 for a missing exchange). Retrying will not help: fix the
  provisioning (``tessera.transport.provision``) or the caller.
- :class:`PublishFailed`: the message was not confirmed: unroutable (no queue bound for the routing key,
  e.g. an organisation that was never declared), nacked by the broker on every attempt, or no confirm
  arrived before the publish deadline (the broker was unreachable the whole time). The message may or may
  not have reached a queue; publishing it again is safe because receivers tolerate duplicates.
- :class:`TransportUnavailable`: the endpoint could not connect at start (wrong credentials, missing
  vhost or permissions, or no broker before the start timeout). Check the URL and the provisioning.
- :class:`TransportClosed`: the endpoint was closed (by :meth:`close`, or its I/O thread stopped after a
  fatal error); create a new endpoint.
- :class:`ProvisioningError`: ``rabbitmqctl`` or the management API refused or failed; the message says
  which command. Provisioning is idempotent: fix the cause and run it again.
"""

from __future__ import annotations

from tessera.errors import TransportError

ACCESS_REFUSED = 403
NOT_FOUND = 404
PRECONDITION_FAILED = 406


class PublishRefused(TransportError):
    """The broker refused a publish by closing the channel (a permission or ``user_id`` violation)."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        super().__init__(f"broker refused the publish: {reply_code} {reply_text}")


class PublishFailed(TransportError):
    """A publish was not confirmed (unroutable, nacked, or timed out). ``undelivered`` names the
    organisations known not to have received it (their inbox is missing); the other recipients did receive
    it. ``unroutable``: the broker returned the message, no queue being bound for its routing key."""

    def __init__(self, reason: str, *, undelivered: tuple[str, ...] = (), unroutable: bool = False) -> None:
        self.reason = reason
        self.undelivered = undelivered
        self.unroutable = unroutable
        super().__init__(reason)


class TransportUnavailable(TransportError):
    """The endpoint could not establish its first connection."""


class TransportClosed(TransportError):
    """The endpoint is closed; no further publish or receive is possible."""


class ProvisioningError(TransportError):
    """A provisioning command failed (broker down, or not allowed to administer it)."""


__all__ = [
    "ACCESS_REFUSED",
    "NOT_FOUND",
    "PRECONDITION_FAILED",
    "ProvisioningError",
    "PublishFailed",
    "PublishRefused",
    "TransportClosed",
    "TransportError",
    "TransportUnavailable",
]
