"""Replicas: spreading, failover and group checks against real services on loopback."""

import asyncio

import pytest

from controller.clients import STUBS
from controller.replicas import GroupError, NoReplica, Replicas
from services.launcher import free_port
from tests.support.rpc import score_texts
from tests.support.servers import ServerThread, service_config


def pool(role: str, target: str, **kwargs) -> Replicas:
    return Replicas(role, target, STUBS[role], timeout=30, retries=1, probe_seconds=0.2, wait_seconds=1.5, **kwargs)


def test_calls_fail_over_from_a_dead_replica_and_spread_over_the_rest(services):
    live = services["reward"].address
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here

    async def run():
        replicas = pool("reward", f"{dead},{live}")
        await replicas.start()
        replicas.down.clear()  # pretend both looked healthy: the first call to `dead` must fail over
        try:
            replies = await replicas.spread(lambda s: s.Score, [score_texts(["a b"], ["c"])] * 4)
            return replies, set(replicas.down)
        finally:
            await replicas.close()

    replies, down = asyncio.run(run())
    assert len(replies) == 4 and all(len(r.scores.raw) == 4 for r in replies)  # one float32 score each
    assert down == {dead}


def test_no_serving_replica_is_a_clear_error():
    async def run():
        replicas = pool("reward", f"127.0.0.1:{free_port()}")
        await replicas.start()
        try:
            await replicas.one(lambda s: s.Score, score_texts(["a"], ["b"]))
        finally:
            await replicas.close()

    with pytest.raises(NoReplica, match=r"^reward: no replica is serving after 2s \(services.restart_timeout_seconds"):
        asyncio.run(run())


def test_independent_processes_are_not_a_data_parallel_group(services):
    port = services["policy"].address.rsplit(":", 1)[1]

    async def run():
        replicas = pool("policy", f"127.0.0.1:{port},localhost:{port}")  # two addresses, one rank-0-of-1 process
        await replicas.start()
        try:
            await replicas.form_group()
        finally:
            await replicas.close()

    with pytest.raises(GroupError, match="rank 0 of 1"):
        asyncio.run(run())


def test_wait_ready_names_what_did_not_come_up():
    async def run():
        replicas = pool("value", f"127.0.0.1:{free_port()}")
        await replicas.start()
        try:
            await replicas.wait_ready(1.0, every=True)
        finally:
            await replicas.close()

    with pytest.raises(TimeoutError, match="value at 127.0.0.1:.*0 of 1 replica"):
        asyncio.run(run())


def test_a_dns_name_without_records_is_waited_for(monkeypatch):
    # A headless Service has no records before its first pod: the pool waits, then names what it waited for.
    async def run():
        replicas = pool("reward", "dns:///no-such-host.invalid:50053")
        await replicas.start()
        try:
            await replicas.wait_ready(1.0)
        finally:
            await replicas.close()

    with pytest.raises(TimeoutError, match=r"reward at dns:///no-such-host.invalid:50053: 0 of 0 replica.*none"):
        asyncio.run(run())


def test_a_call_waits_for_a_replica_that_comes_back(tiny_dirs):
    # One reward replica, restarting (as a rescheduled pod would): the call waits instead of failing the run.
    port = free_port()

    async def run():
        replicas = Replicas("reward", f"127.0.0.1:{port}", STUBS["reward"], timeout=30, retries=1,
                            probe_seconds=0.2, wait_seconds=120)
        await replicas.start()
        try:
            call = asyncio.create_task(replicas.one(lambda s: s.Score, score_texts(["a b"], ["c"])))
            await asyncio.sleep(1.0)
            assert not call.done()  # still waiting: nothing listens yet
            server = await asyncio.to_thread(
                ServerThread(service_config("reward", tiny_dirs["rm"], server={"port": port})).start)
            try:
                return await asyncio.wait_for(call, 120)
            finally:
                server.stop()
        finally:
            await replicas.close()

    reply = asyncio.run(run())
    assert len(reply.scores.raw) == 4
