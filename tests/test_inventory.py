"""Cluster inventory: the pure summary, and the flow against the sandbox with its artifacts."""

from __future__ import annotations

from tasks.kubernetes import gpu_requests, node_info, pod_info, summarize_inventory


def _node(name, gpus=8, ready="True", unschedulable=False):
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "H100"} if gpus else {}},
        "spec": {"unschedulable": unschedulable} if unschedulable else {},
        "status": {"capacity": {"nvidia.com/gpu": str(gpus)} if gpus else {},
                   "allocatable": {"nvidia.com/gpu": str(gpus)} if gpus else {},
                   "conditions": [{"type": "Ready", "status": ready}],
                   "nodeInfo": {"kubeletVersion": "v1.29.5"}},
    }


def _pod(name, node, limits, phase="Running", ns="ml"):
    return {"metadata": {"name": name, "namespace": ns,
                         "ownerReferences": [{"kind": "Workflow", "name": "rl-prod-abc"}]},
            "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"limits": limits}}]},
            "status": {"phase": phase}}


def test_gpu_requests_cover_whole_gpus_and_shares():
    assert gpu_requests(_pod("a", "n", {"nvidia.com/gpu": "2"})) == {"nvidia.com/gpu": 2}
    assert gpu_requests(_pod("a", "n", {"aliyun.com/gpu-mem": 44, "cpu": "14"})) == {"aliyun.com/gpu-mem": 44}
    assert gpu_requests(_pod("a", "n", {"nvidia.com/gpumem": "20000", "nvidia.com/gpu": 1})) == {
        "nvidia.com/gpumem": 20000, "nvidia.com/gpu": 1}
    assert gpu_requests(_pod("a", "n", {"cpu": "1"})) == {}


def test_summary_counts_allocation_readiness_and_cordons():
    nodes = [node_info(_node("g1")), node_info(_node("g2", ready="Unknown")),
             node_info(_node("g3", unschedulable=True)), node_info(_node("cp", gpus=0))]
    pods = [pod_info(_pod("p1", "g1", {"nvidia.com/gpu": "8"})),
            pod_info(_pod("p2", "g2", {"nvidia.com/gpu": "2"})),
            pod_info(_pod("done", "g3", {"nvidia.com/gpu": "8"}, phase="Succeeded")),
            pod_info(_pod("share", "g3", {"aliyun.com/gpu-mem": "44"}))]
    inv = summarize_inventory(nodes, pods)
    assert inv.gpu_nodes == 3 and inv.gpus_total == 24 and inv.gpus_allocated == 10
    assert inv.not_ready == ["g2"] and inv.cordoned == ["g3"]
    g3 = [n for n in inv.nodes if n.name == "g3"][0]
    assert g3.gpu_pods == ["ml/share"] and g3.gpus_allocated == 0  # a share holds no whole GPU
    assert pods[0].owner == "Workflow/rl-prod-abc"


def test_blocks_load_is_idempotent(sandbox_platform, sandbox):
    from blocks.config import load_platform_config
    from blocks.load import load_blocks
    from blocks.platform import Platform

    first = load_blocks(load_platform_config(sandbox.platform_yaml))
    second = load_blocks(load_platform_config(sandbox.platform_yaml))
    assert first.saved == second.saved and second.removed == []
    assert "platform-settings/sandbox" in first.saved and "kubernetes-cluster-config/sandbox-sandbox" in first.saved
    platform = Platform(sandbox_platform)
    assert platform.config.cluster().name == "sandbox"
    assert platform.prometheus().url == sandbox.urls["prometheus"]


def test_inventory_flow_reports_the_sandbox(sandbox_platform, clean_sandbox):
    from prefect.client.orchestration import get_client

    from flows.cluster_inventory import cluster_inventory

    clean_sandbox.fault("node-not-ready", node="gpu-node-0003")
    state = cluster_inventory(platform=sandbox_platform, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["nodes"] == 20 and result["gpu_nodes"] == 16 and result["gpus"] == 128
    assert result["not_ready"] == ["gpu-node-0003"]
    # the seed gives GPU node i the workload kind i % 10; whole GPUs are held on kinds 0-3 (one 8-GPU
    # job), 4-5 (two 4-GPU jobs), 6 (two 1-GPU notebooks) and 8 (one 2-GPU server), none on 7 (a share)
    # or 9: 16 nodes are kinds 0-9 then 0-5, so 8 nodes x 8 + 4 nodes x 8 + 2 + 2
    assert result["gpus_allocated"] == 8 * 8 + 4 * 8 + 2 + 2 == 100

    async def artifacts():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))

    import asyncio

    found = asyncio.run(artifacts())
    kinds = {a.type for a in found}
    assert kinds == {"markdown", "table"}
    md = [a for a in found if a.type == "markdown"][0].data
    assert "**GPUs:** 128 total" in md and "gpu-node-0003" in md
