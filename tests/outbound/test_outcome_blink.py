"""A send Meta accepted is recorded even when the store blinks as the outcome is written:
left unrecorded, the message would be sent again once its lease lapsed."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from switchboard.v1 import common_pb2

from gateway.domain.errors import StoreUnavailable
from gateway.domain.store import Store, Tx
from gateway.services.outbound_worker import OutboundWorker
from gateway.store import open_store
from tests.outbound.conftest import Out
from tests.outbound.test_send_order import accepted


class _BlinksOnce:
    """The store, except that the first pipelined transaction (an outcome batch) fails as
    a lost connection would."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.blinked = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def transaction(self, *, pipelined: bool = False) -> AbstractAsyncContextManager[Tx]:
        if pipelined and not self.blinked:
            self.blinked = True
            raise StoreUnavailable("PostgreSQL is unavailable (OperationalError)")
        return self._store.transaction(pipelined=pipelined)


async def test_an_accepted_send_is_recorded_after_the_store_blinked(out: Out) -> None:
    await out.throttle()
    reply = await out.send(text="once")
    assert reply.message.status == common_pb2.MESSAGE_STATUS_QUEUED
    gateway = out.gateway.gateway
    worker = gateway.outbound_worker
    assert worker is not None
    await worker.aclose()
    async with open_store(gateway.config.database_url.reveal()) as store:
        flaky = _BlinksOnce(store)
        deliverer = out.other_deliverer(flaky)  # type: ignore[arg-type]
        attempts = OutboundWorker(store, deliverer, poll_s=0.01)
        try:
            out.advance(130)  # past the pause
            await attempts.start()
            await out.wait_status(reply.message.id, "MESSAGE_STATUS_SENT", timeout_s=10)
        finally:
            await attempts.aclose()
            await deliverer.aclose()
    assert flaky.blinked
    assert await accepted(out) == ["once"]
    stored = await out.get(reply.message.id)
    assert stored.external_id
