"""The emulator's own pieces, in-process: selector parsing and a request log that stays bounded."""

from __future__ import annotations

import pytest

from sandbox.kube import REQUEST_LOG_KEEP, SandboxKubernetes, SelectorError, parse_field_selector, parse_label_selector


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
    from kmock._internal.apps import Server
    import aiohttp

    kube = SandboxKubernetes()
    async with kube, Server(kube) as server:
        kube.put_object("v1/nodes", None, "n1", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
        async with aiohttp.ClientSession() as session:
            for _ in range(REQUEST_LOG_KEEP * 3):
                async with session.get(str(server.url.with_path("/api/v1/nodes").with_query(limit="1"))) as r:
                    assert r.status == 200
    assert len(kube._requests) <= REQUEST_LOG_KEEP * 2
    assert kube.requests_served == REQUEST_LOG_KEEP * 3
