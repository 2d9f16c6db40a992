"""MicroBatcher: batches of at most max_batch, a deadline from the oldest message, a bounded buffer."""

from __future__ import annotations

import asyncio
import time

import pytest

from streams.worker.batch_consumer import MicroBatcher
from streams.worker.pipeline import InputMessage


def messages(*offsets: int) -> list[InputMessage]:
    """Messages of one partition, at ``offsets`` (compared by value: a dataclass)."""
    return [InputMessage("t", 0, offset, None, b"{}") for offset in offsets]


def run(coro):
    return asyncio.run(coro)


def test_a_full_batch_is_taken_at_once_and_the_rest_waits_its_turn():
    async def scenario():
        batcher = MicroBatcher(max_batch=3, max_wait_s=10.0, max_buffered=6)
        await batcher.put(messages(1, 2, 3, 4))
        started = time.monotonic()
        first = await batcher.take()
        assert time.monotonic() - started < 0.5  # full: no waiting for the deadline
        return first, len(batcher)

    assert run(scenario()) == (messages(1, 2, 3), 1)


def test_a_partial_batch_goes_once_its_oldest_message_has_waited_max_wait():
    async def scenario():
        batcher = MicroBatcher(max_batch=100, max_wait_s=0.2, max_buffered=200)
        await batcher.put(messages(1))
        await asyncio.sleep(0.1)
        await batcher.put(messages(2))
        started = time.monotonic()
        batch = await batcher.take()
        return batch, time.monotonic() - started

    batch, waited_s = run(scenario())
    assert batch == messages(1, 2)
    assert 0.05 <= waited_s < 0.18, waited_s  # the deadline counts from message 1, not from the take


def test_messages_left_by_a_full_batch_keep_their_own_deadline():
    async def scenario():
        batcher = MicroBatcher(max_batch=2, max_wait_s=1.0, max_buffered=4)
        put_at = time.monotonic()
        await batcher.put(messages(1, 2, 3))
        await asyncio.sleep(0.5)
        first = await batcher.take()  # full: taken at once, message 3 stays behind
        second = await batcher.take()
        return first, second, time.monotonic() - put_at

    first, second, waited_s = run(scenario())
    assert (first, second) == (messages(1, 2), messages(3))
    # message 3 arrived with the others: its batch goes max_wait after that, not max_wait after the first take
    assert 0.95 <= waited_s < 1.3, waited_s


def test_a_take_on_an_empty_buffer_waits_for_messages():
    async def scenario():
        batcher = MicroBatcher(max_batch=2, max_wait_s=0.05, max_buffered=4)
        taker = asyncio.create_task(batcher.take())
        await asyncio.sleep(0.1)
        assert not taker.done()
        await batcher.put(messages(1, 2))
        return await asyncio.wait_for(taker, 1.0)

    assert run(scenario()) == messages(1, 2)


def test_put_waits_while_the_buffer_is_at_its_bound():
    async def scenario():
        batcher = MicroBatcher(max_batch=2, max_wait_s=0.01, max_buffered=2)
        await batcher.put(messages(1, 2))
        putter = asyncio.create_task(batcher.put(messages(3)))
        await asyncio.sleep(0.05)
        blocked = not putter.done()
        assert await batcher.take() == messages(1, 2)
        await asyncio.wait_for(putter, 1.0)
        return blocked, await batcher.take()

    assert run(scenario()) == (True, messages(3))


def test_clear_drops_the_buffer_and_a_put_waiting_across_it():
    """A rebalance stops the flow: nothing read before it may be scored after it."""

    async def scenario():
        batcher = MicroBatcher(max_batch=2, max_wait_s=0.01, max_buffered=2)
        await batcher.put(messages(1, 2))
        putter = asyncio.create_task(batcher.put(messages(3)))
        await asyncio.sleep(0.02)
        dropped = batcher.clear()
        await asyncio.wait_for(putter, 1.0)
        remaining = len(batcher)
        await batcher.put(messages(4))
        return dropped, remaining, await batcher.take()

    assert run(scenario()) == (2, 0, messages(4))


@pytest.mark.parametrize("max_batch, max_buffered", [(0, 10), (10, 5)])
def test_inconsistent_bounds_are_refused(max_batch, max_buffered):
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(max_batch, 0.05, max_buffered)
