"""The cluster definition: the guide's kubespray inventory imports as it is and generates back the same
hosts, groups and variables; both INI and YAML import; the config names wrong fields; the overrides parse."""

from __future__ import annotations

import pytest
import yaml

from blocks.config import ConfigError, KubesprayConfig, parse_platform_config
from tasks.kubespray_inventory import (
    import_inventory,
    inventory_view,
    read_inventory,
    write_inventory,
)
from tests.conftest import FIXTURES, REPO

SEED = FIXTURES / "kubespray-inventory.ini"
SETTINGS = {"checkout": "/opt/kubespray", "version": "v2.23.3"}


def test_guide_inventory_imports_as_it_is():
    cfg = import_inventory(SEED, **SETTINGS)
    by_name = {h.name: h for h in cfg.hosts}
    master, monitor = by_name["192-0-2-21.bj.master"], by_name["192-0-2-22.bj.monitor"]
    assert (master.ansible_host, master.ip, master.access_ip) == ("192.0.2.21",) * 3
    assert set(master.groups) == {"kube_control_plane", "etcd"}
    assert set(monitor.groups) == {"kube_node", "monitor_node"}
    assert cfg.groups["monitor_node"].taints == ["instance-type-is-monitor=:NoSchedule"]
    assert cfg.groups["gpu-node"].taints == ["disable-node-scheduler=:NoSchedule"]
    assert cfg.groups["k8s_cluster"].children == ["calico_rr", "kube_control_plane", "kube_node"]


def test_generated_inventory_round_trips(tmp_path):
    cfg = import_inventory(SEED, **SETTINGS)
    out = write_inventory(cfg, tmp_path / "hosts.yaml")
    assert inventory_view(out) == inventory_view(SEED)
    again = import_inventory(out, **SETTINGS)
    assert again.model_dump() == cfg.model_dump()
    view = inventory_view(out)
    assert view["groups"]["k8s_cluster"]["hosts"] == ["192-0-2-21.bj.master", "192-0-2-22.bj.monitor"]
    assert view["groups"]["monitor_node"]["vars"] == {"node_taints": ["instance-type-is-monitor=:NoSchedule"]}


def test_yaml_hosts_form_imports(tmp_path):
    # kubespray's inventory/sample hosts.yaml form, with an etcd_member_name and a host var of its own
    doc = {"all": {"hosts": {"node1": {"ansible_host": "10.0.0.1", "ip": "10.0.0.1", "etcd_member_name": "etcd1"},
                             "node2": {"ansible_host": "10.0.0.2", "ansible_port": 2222}},
                   "children": {"kube_control_plane": {"hosts": {"node1": None}},
                                "etcd": {"hosts": {"node1": None}},
                                "kube_node": {"hosts": {"node2": None}},
                                "k8s_cluster": {"children": {"kube_control_plane": None, "kube_node": None}}}}}
    (tmp_path / "hosts.yaml").write_text(yaml.safe_dump(doc))
    cfg = import_inventory(tmp_path / "hosts.yaml", **SETTINGS)
    node1, node2 = cfg.hosts
    assert node1.etcd_member_name == "etcd1" and node2.vars == {"ansible_port": 2222}
    out = write_inventory(cfg, tmp_path / "gen" / "hosts.yaml")
    assert inventory_view(out)["hosts"] == inventory_view(tmp_path / "hosts.yaml")["hosts"]


def test_unparseable_inventory_is_an_error(tmp_path):
    (tmp_path / "empty.ini").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no hosts"):
        read_inventory(tmp_path / "empty.ini")


def test_config_names_wrong_fields():
    base = {"name": "p", "clusters": [{"name": "c", "kubespray": {
        "checkout": "/k", "version": "2.23", "hosts": [{"name": "n1", "ansible_host": "10.0.0.1",
                                                        "groups": ["kube_control_plane", "etcd", "gpu"]}],
        "groups": {"gpu": {"taints": ["nvidia.com/gpu=present:NoSchedul"]}}}}]}
    with pytest.raises(ConfigError) as err:
        parse_platform_config(base)
    text = str(err.value)
    assert "clusters[0].kubespray.version" in text
    assert "clusters[0].kubespray.groups.gpu.taints" in text and "NoSchedul" in text
    with pytest.raises(Exception, match="no host is in etcd"):
        KubesprayConfig.model_validate({"checkout": "/k", "version": "v2.23.3",
                                        "hosts": [{"name": "n1", "ansible_host": "10.0.0.1",
                                                   "groups": ["kube_control_plane"]}]})


def test_overrides_carry_the_guides_tuning():
    doc = yaml.safe_load((REPO / "configs" / "kubespray" / "override.yml").read_text())
    guide = yaml.safe_load((FIXTURES / "kubespray-override.yml").read_text())
    for key in ("kube_kubeadm_apiserver_extra_args", "etcd_deployment_type", "etcd_events_cluster_enabled",
                "auto_renew_certificates", "kubernetes_audit", "kubelet_max_pods", "kubelet_config_extra_args"):
        assert doc[key] == guide[key], key
    assert doc["kubelet_node_config_extra_args"]["imageGCHighThresholdPercent"] == 65
