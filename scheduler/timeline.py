"""Where fires wait between their hand-over and their decision, on the event loop.

- :class:`Timeline`: fires waiting for their release instant (epoch s), grouped by it, one loop
  timer per group: a burst due at one instant is one timer, not 10,000.
- :class:`Preparer`: fires handed over ahead of their time are encoded (message built, intent
  ready) in batches collected over PREPARE_EVERY_S, ENCODE_CHUNK fires per turn of the loop, so
  at the due instant only the decide call is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Protocol

from loguru import logger

from scheduler.fires import Fire, Limits
from scheduler.message import TaskMessage
from shared.clock import Clock
from shared.fleet import FireIntent

PREPARE_EVERY_S = 0.05
"""Fires handed over ahead of time are prepared in batches collected over this long: one task
per batch instead of one per fire."""
PREPARE_MARGIN_S = 0.25
"""A fire due sooner than this is prepared at once instead of waiting for its batch."""
ENCODE_CHUNK = 100
"""Fires encoded per turn of the event loop (about 2 ms of work). Encoding runs on the loop: it
costs ~15 µs a message from a template, less than handing it to a thread and waiting for the
GIL to come back."""


class Encoder(Protocol):
    """Turns task messages into (broker list key, payload); pure CPU, run on the loop in chunks."""

    def encode(self, messages: Sequence[TaskMessage]) -> list[tuple[str, str]]: ...


class Timeline:
    """Fires held until ``fire.release_ts``; ``release`` gets each group when its time comes."""

    def __init__(self, clock: Clock, release: Callable[[list[Fire]], None]) -> None:
        self.clock = clock
        self._release = release
        self._groups: dict[float, list[Fire]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}

    def __bool__(self) -> bool:
        return bool(self._groups)

    def held(self) -> list[Fire]:
        """The fires waiting for their release, soonest first (for operators and tests)."""
        return [fire for release_ts in sorted(self._groups) for fire in self._groups[release_ts]]

    def add(self, fire: Fire, now_ts: float) -> bool:
        """Hold ``fire`` until its release; False (not held) if it is due already."""
        release_ts = fire.release_ts
        delay_s = release_ts - now_ts
        if delay_s <= 0:
            return False
        group = self._groups.get(release_ts)
        if group is not None:
            group.append(fire)
            return True
        self._groups[release_ts] = [fire]
        self._timers[release_ts] = asyncio.get_running_loop().call_later(delay_s, self._on_timer, release_ts)
        return True

    def _on_timer(self, release_ts: float) -> None:
        # The loop's timers run on the monotonic clock; the fire's time is wall-clock time.
        early_s = release_ts - self.clock.time()
        if early_s > 0:
            self._timers[release_ts] = asyncio.get_running_loop().call_later(early_s, self._on_timer, release_ts)
            return
        del self._timers[release_ts]
        self._release(self._groups.pop(release_ts))

    def take(self, wanted: Callable[[Fire], bool]) -> Iterator[Fire]:
        """Take the held fires ``wanted`` says yes to out of the timeline."""
        for release_ts in list(self._groups):
            group = self._groups[release_ts]
            taken = [fire for fire in group if wanted(fire)]
            if not taken:
                continue
            kept = [fire for fire in group if not wanted(fire)]
            if kept:
                self._groups[release_ts] = kept
            else:
                del self._groups[release_ts]
                self._timers.pop(release_ts).cancel()
            yield from taken


class Preparer:
    """Encodes fires ahead of their release, then hands each to ``ready``."""

    def __init__(
        self,
        encoder: Encoder,
        limits: Limits,
        clock: Clock,
        ready: Callable[[Fire], None],
        *,
        batch_size: int,
    ) -> None:
        self.encoder = encoder
        self.limits = limits
        self.clock = clock
        self._ready = ready
        self.batch_size = batch_size
        self._waiting: list[Fire] = []
        self._timer: asyncio.Handle | None = None
        self.running = 0
        """Batches being encoded right now."""

    def __bool__(self) -> bool:
        return bool(self._waiting or self.running)

    def add(self, fire: Fire, now_ts: float) -> None:
        self._waiting.append(fire)
        loop = asyncio.get_running_loop()
        if len(self._waiting) >= self.batch_size or fire.release_ts - now_ts < PREPARE_MARGIN_S:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_soon(self._start)
        elif self._timer is None:
            self._timer = loop.call_later(PREPARE_EVERY_S, self._start)

    def take_waiting(self) -> list[Fire]:
        """Stop: the fires not yet being encoded (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        return waiting

    def _start(self) -> None:
        self._timer = None
        batch, self._waiting = self._waiting, []
        if batch:
            self.running += 1
            asyncio.get_running_loop().create_task(self._prepare(batch), name="chronoq-prepare")

    async def _prepare(self, fires: list[Fire]) -> None:
        try:
            for fire, intent in zip(fires, await self.encode(fires, self.clock.now()), strict=True):
                fire.prepared = intent
        except Exception as exc:  # a bad message: decided (and reported) unprepared, at its time
            logger.warning("preparing {} fires ahead of time failed: {}", len(fires), exc)
        finally:
            self.running -= 1
        for fire in fires:
            self._ready(fire)

    async def encode(self, fires: list[Fire], now: datetime) -> list[FireIntent]:
        """Each fire's message, encoded, as the ledger will decide it; ENCODE_CHUNK fires per
        turn of the loop, so fires due meanwhile are released between chunks."""
        intents: list[FireIntent] = []
        limits = self.limits
        for start in range(0, len(fires), ENCODE_CHUNK):
            if start:
                await asyncio.sleep(0)
            chunk = fires[start : start + ENCODE_CHUNK]
            expires = [fire.expires_s(now) for fire in chunk]
            messages = [f.message(now, limits, e) for f, e in zip(chunk, expires, strict=True)]
            encoded = self.encoder.encode(messages)
            intents += [f.intent(now, limits, p, e) for f, p, e in zip(chunk, encoded, expires, strict=True)]
        return intents
