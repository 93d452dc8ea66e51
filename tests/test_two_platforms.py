"""Two platforms on one Prefect server, each with a cluster named `sandbox` (issue 21, item 7): the session's
sandbox (20 nodes) and a second, smaller one (its Kubernetes API emulator only, 4 nodes) loaded as platform
`twin`. Each flow reaches only its own cluster: the inventory counts its own nodes, the operations' target
identity (the kube-system namespace UID) is its own, and the blocks of one never answer for the other."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import run_flow_sync


@pytest.fixture(scope="module")
def twin(sandbox, sandbox_platform, tmp_path_factory):
    from blocks.config import load_platform_config
    from blocks.load import load_blocks
    from sandbox.platform import Sandbox, start_core

    sb = Sandbox(state_dir=tmp_path_factory.mktemp("twin"), nodes=4).up(components=[start_core])
    try:
        data = yaml.safe_load(sb.platform_yaml.read_text())
        data["name"] = "twin"
        assert [c["name"] for c in data["clusters"]] == ["sandbox"], "the twin's cluster has the same name"
        path = sb.state_dir / "twin.yaml"
        path.write_text(yaml.safe_dump(data))
        load_blocks(load_platform_config(path))
        yield sb
    finally:
        sb.down()


def test_each_platforms_inventory_reads_its_own_cluster_of_the_same_name(sandbox, sandbox_platform, twin):
    from flows.cluster_inventory import cluster_inventory

    mine = run_flow_sync(cluster_inventory, platform=sandbox_platform, cluster="sandbox")
    other = run_flow_sync(cluster_inventory, platform="twin", cluster="sandbox")
    assert mine.is_completed() and other.is_completed()
    assert mine.result()["nodes"] == 20 and other.result()["nodes"] == 4
    # loading the twin after the sandbox overwrote nothing of the sandbox's: read it once more
    assert run_flow_sync(cluster_inventory, platform=sandbox_platform, cluster="sandbox").result()["nodes"] == 20


def test_each_platform_names_its_own_cluster_identity(sandbox, sandbox_platform, twin):
    from blocks.platform import Platform
    from tasks.kubernetes import cluster_identity

    ours = cluster_identity(Platform(sandbox_platform).kubernetes("sandbox"))
    theirs = cluster_identity(Platform("twin").kubernetes("sandbox"))
    assert ours and theirs and ours != theirs
    # the identity is read from each cluster's API, not derived from the names both share
    assert Platform(sandbox_platform).kubernetes("sandbox").configuration.host == sandbox.urls["kube"]
    assert Platform("twin").kubernetes("sandbox").configuration.host == twin.urls["kube"]
