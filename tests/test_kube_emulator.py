"""The emulator's own pieces, in-process: selector parsing and a request log that stays bounded."""

from __future__ import annotations

import pytest

from sandbox.kube import (
    REQUEST_LOG_KEEP,
    SandboxKubernetes,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)


@pytest.mark.parametrize("selector, labels, expected", [
    ("a=b", {"a": "b"}, True),
    ("a==b", {"a": "c"}, False),
    ("a!=b", {}, True),
    ("a", {"a": ""}, True),
    ("!a", {"a": ""}, False),
    ("a in (x, y),b", {"a": "y", "b": "1"}, True),
    ("a notin (x,y)", {"a": "x"}, False),
    ("", {"anything": "1"}, True),
])
def test_label_selector(selector, labels, expected):
    assert parse_label_selector(selector)(labels) is expected


@pytest.mark.parametrize("bad", ["a in (b", "=b", "!a=b"])
def test_label_selector_errors(bad):
    with pytest.raises(SelectorError):
        parse_label_selector(bad)


def test_field_selector():
    pod = {"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}
    assert parse_field_selector("spec.nodeName=n1,status.phase!=Failed")(pod)
    assert not parse_field_selector("spec.nodeName==n2")(pod)
    assert parse_field_selector("spec.unschedulable=false")({"spec": {}})


async def test_request_log_stays_bounded():
    import aiohttp
    from kmock._internal.apps import Server

    kube = SandboxKubernetes()
    async with kube, Server(kube) as server:
        kube.put_object("v1/nodes", None, "n1", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
        async with aiohttp.ClientSession() as session:
            for _ in range(REQUEST_LOG_KEEP * 3):
                async with session.get(str(server.url.with_path("/api/v1/nodes").with_query(limit="1"))) as r:
                    assert r.status == 200
    assert len(kube._requests) <= REQUEST_LOG_KEEP * 2
    assert kube.requests_served == REQUEST_LOG_KEEP * 3


async def test_paged_lists_read_one_snapshot_and_see_every_write():
    """Pages of one list come from the snapshot it started at (the API server's continue semantics);
    a new list after a write (HTTP, seeding or a direct deletion) sees it."""
    import aiohttp
    from kmock._internal.apps import Server

    def node(name: str, **labels: str) -> dict:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}

    kube = SandboxKubernetes()
    async with kube, Server(kube) as server:
        for i in range(5):
            kube.put_object("v1/nodes", None, f"n{i}", node(f"n{i}", gpu="yes" if i % 2 == 0 else "no"))

        async def names(**query: str) -> tuple[list[str], str | None]:
            url = server.url.with_path("/api/v1/nodes").with_query(**query)
            async with aiohttp.ClientSession() as session, session.get(str(url)) as r:
                assert r.status == 200
                body = await r.json()
            return [o["metadata"]["name"] for o in body["items"]], body["metadata"].get("continue")

        first, token = await names(limit="2")
        assert first == ["n0", "n1"] and token
        kube.put_object("v1/nodes", None, "n00", node("n00"))  # sorts before n1: would shift the offsets
        rest, token2 = await names(limit="2", **{"continue": token})
        assert rest == ["n2", "n3"] and token2
        assert (await names(limit="10"))[0] == ["n0", "n00", "n1", "n2", "n3", "n4"]
        assert (await names(labelSelector="gpu=yes"))[0] == ["n0", "n2", "n4"]
        kube.patch_object("v1/nodes", None, "n2", {"metadata": {"labels": {"gpu": "no"}}})
        assert (await names(labelSelector="gpu=yes"))[0] == ["n0", "n4"]
        del kube.objects["v1/nodes", None, "n4"]
        assert (await names(labelSelector="gpu=yes"))[0] == ["n0"]

