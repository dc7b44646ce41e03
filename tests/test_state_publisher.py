"""node.state.StateService._publisher: an idle node's entries go out at once; a busy node's
share a gossip message, at most one every PUBLISH_SPACING_S."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import cbor2
import pytest
import trio
import trio.testing

from mossnode.node.state import PUBLISH_SPACING_S, PUBLISH_WINDOW_S, StateService


class FakePubsub:
    def __init__(self) -> None:
        self.sent: list[tuple[float, list[bytes]]] = []

    async def publish(self, topic: str, data: bytes) -> None:
        self.sent.append((trio.current_time(), cbor2.loads(data)))


def test_busy_publisher_bundles_entries_and_an_idle_one_does_not_wait() -> None:
    assert PUBLISH_SPACING_S > 10 * PUBLISH_WINDOW_S

    async def main() -> list[tuple[float, list[bytes]]]:
        pubsub = FakePubsub()
        svc: Any = SimpleNamespace(
            d=SimpleNamespace(pubsub=pubsub),
            topic="t",
            counters=Counter(),
            _to_publish=[],
            _publish_wanted=trio.Event(),
        )

        def written(entry: bytes) -> None:  # what the committer does for an own entry
            svc._to_publish.append(entry)
            svc._publish_wanted.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(StateService._publisher, svc)
            await trio.sleep(1.0)
            written(b"a")  # idle: out after the short window
            await trio.sleep(0.05)
            for e in (b"b", b"c", b"d"):  # busy: these wait for the spacing, then go together
                written(e)
                await trio.sleep(0.02)
            await trio.sleep(1.0)
            written(b"e")  # idle again
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
        return pubsub.sent

    sent = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [bundle for _, bundle in sent] == [[b"a"], [b"b", b"c", b"d"], [b"e"]]
    (t_a, _), (t_bcd, _), (t_e, _) = sent
    assert t_a == pytest.approx(1.0 + PUBLISH_WINDOW_S)
    assert t_bcd == pytest.approx(t_a + PUBLISH_SPACING_S)
    assert t_e == pytest.approx(1.0 + 0.05 + 3 * 0.02 + 1.0 + PUBLISH_WINDOW_S)
