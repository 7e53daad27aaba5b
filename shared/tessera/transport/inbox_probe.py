"""Which of several inboxes exist, asked of the broker all at once.

After a multi-recipient publish (one body, the recipients' keys in ``BCC``) the curator checks each
recipient's inbox with a passive ``queue.declare`` (:mod:`tessera.transport.publisher` says why). AMQP
answers one synchronous method per channel at a time, and pika's blocking channel waits for each answer, so
ten recipients cost ten broker round trips in a row: most of a small secure-aggregation round. An
:class:`InboxProbe` keeps up to ``width`` channels and asks on all of them at once, through pika's
asynchronous channel under each blocking one (``channel._impl``, as :mod:`tessera.transport.confirms` does),
so a check costs about one round trip per ``width`` recipients.

A passive declare of a missing queue makes the broker close that channel with ``404 NOT_FOUND``: the probe
counts the queue missing, drops the channel, and goes on with the others (opening a new one, outside pika's
callbacks, if none is left). Any other close, or a lost connection, ends the check with the error.

Everything here runs on the endpoint's I/O thread. :meth:`InboxProbe.check` must be called from a callback
the connection dispatches (``add_callback_threadsafe``) or the I/O loop, not from inside a frame callback,
because opening a channel waits for the broker.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from tessera.transport.errors import NOT_FOUND

ProbeResult = list[str] | BaseException
"""The names (of those asked) that do not exist, in the order asked; or why the check could not finish."""


class InboxProbe:
    """Passive declares on up to ``width`` channels of one connection at once."""

    def __init__(self, connection: pika.BlockingConnection, *, width: int = 16) -> None:
        self._connection = connection
        self._width = width
        self._idle: list[BlockingChannel] = []
        self._runs: dict[int, _Run] = {}  # channel number → the check using it

    def check(self, names: Sequence[str], on_done: Callable[[ProbeResult], None]) -> None:
        """Start checking ``names``; ``on_done`` is called once, on the I/O thread, with the result."""
        run = _Run(self, list(dict.fromkeys(names)), on_done)
        if not run.names:
            on_done([])
            return
        run.resume()

    # ------------------------------------------------------------------ channels

    def _take(self, count: int) -> list[BlockingChannel]:
        """Up to ``count`` open channels (opening new ones waits for the broker)."""
        self._idle = [c for c in self._idle if c.is_open]
        taken = self._idle[:count]
        del self._idle[: len(taken)]
        while len(taken) < count:
            channel = self._connection.channel()
            channel._impl.add_on_close_callback(functools.partial(self._on_close, channel.channel_number))
            taken.append(channel)
        return taken

    def _give_back(self, channel: BlockingChannel) -> None:
        self._runs.pop(channel.channel_number, None)
        if channel.is_open and len(self._idle) < self._width:
            self._idle.append(channel)

    def _on_close(self, number: int, _impl: Any, reason: BaseException) -> None:
        run = self._runs.pop(number, None)
        self._idle = [c for c in self._idle if c.channel_number != number]
        if run is not None:
            run.channel_closed(number, reason)


class _Run:
    """One check: the names still to ask, the one asked on each channel, what was found missing."""

    def __init__(self, probe: InboxProbe, names: list[str], on_done: Callable[[ProbeResult], None]) -> None:
        self.probe = probe
        self.names = names
        self.pending: deque[str] = deque(names)
        self.asking: dict[int, tuple[BlockingChannel, str]] = {}
        self.missing: set[str] = set()
        self.on_done = on_done
        self.finished = False

    def resume(self) -> None:
        """Put channels to work on what is pending (outside pika's frame callbacks: it may open some)."""
        if self.finished:
            return
        wanted = min(self.probe._width, len(self.pending)) - len(self.asking)
        try:
            channels = self.probe._take(max(0, wanted))
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.finish(exc)
            return
        for channel in channels:
            self.ask(channel)
        self.finish_if_done()

    def ask(self, channel: BlockingChannel) -> None:
        if self.finished or not self.pending:
            self.probe._give_back(channel)
            return
        name = self.pending.popleft()
        number = channel.channel_number
        self.asking[number] = (channel, name)
        self.probe._runs[number] = self
        try:
            channel._impl.queue_declare(name, passive=True, callback=functools.partial(self.declared, number))
        except (pika.exceptions.AMQPError, OSError):
            # The channel closed before we could ask: ask again on another one.
            self.asking.pop(number, None)
            self.probe._runs.pop(number, None)
            self.pending.appendleft(name)
            self.schedule_resume()

    def declared(self, number: int, _frame: Any) -> None:
        entry = self.asking.pop(number, None)
        if entry is None:
            return
        self.ask(entry[0])
        self.finish_if_done()

    def channel_closed(self, number: int, reason: BaseException) -> None:
        entry = self.asking.pop(number, None)
        if entry is None:
            return
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == NOT_FOUND:
            self.missing.add(entry[1])
            if self.pending and not self.asking:
                self.schedule_resume()  # no channel left at work: open another, outside this callback
            self.finish_if_done()
        else:
            self.finish(reason)

    def schedule_resume(self) -> None:
        try:
            self.probe._connection.add_callback_threadsafe(self.resume)
        except (pika.exceptions.AMQPError, RuntimeError) as exc:
            self.finish(exc)

    def finish_if_done(self) -> None:
        if not self.pending and not self.asking:
            self.finish([n for n in self.names if n in self.missing])

    def finish(self, result: ProbeResult) -> None:
        if self.finished:
            return
        self.finished = True
        # Only after an error can channels still be asking: they are dropped, never reused, so that a late
        # 404 on one of them cannot be taken for another check's answer.
        for number in self.asking:
            self.probe._runs.pop(number, None)
        self.asking.clear()
        self.on_done(result)


__all__ = ["InboxProbe", "ProbeResult"]
