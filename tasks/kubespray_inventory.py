"""Kubespray inventories: import one into the platform config's form, generate one back for kubespray.

`read_inventory(path)` parses with Ansible's own machinery (`InventoryManager` over a `DataLoader`, what
`ansible-inventory --list` uses), so every form Ansible accepts imports: the INI `inventory.ini` of the
guide, kubespray's YAML `hosts.yaml`, a folder of both. `to_kubespray_config` turns what it read into
the `clusters[].kubespray` section (host variables `ansible_host`, `ip`, `access_ip`, `etcd_member_name`
lifted, the groups' `node_taints` as `taints`); `generate_inventory` writes kubespray's YAML inventory
from that section. `inventory_view` is what a comparison of two inventories looks at: each host's
variables, each group's hosts (direct and through children), children and variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blocks.config import KubesprayConfig

_LIFTED = ("ansible_host", "ip", "access_ip", "etcd_member_name")
# Variables Ansible adds to every host it reads from a file: not the inventory's own.
_MAGIC = {"inventory_file", "inventory_dir"}
_IMPLICIT = {"all", "ungrouped"}


def plain(value: Any) -> Any:
    """Ansible 2.19's tagged values (`_AnsibleTaggedStr`, `_AnsibleTaggedList`, ...) as plain Python."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _isolated(name: str, source: str | Path) -> dict[str, Any]:
    """Run `name(source)` in a fresh Python: Ansible's collection loader installs import hooks once per
    process and refuses a process where another FileFinder hook was added (pytest, Prefect workers)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tasks.kubespray_inventory", name, str(Path(source).resolve())],
                          capture_output=True, text=True, timeout=120, check=False, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise ValueError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"{name} failed")
    return json.loads(proc.stdout)


def read_inventory(source: str | Path) -> dict[str, Any]:
    """`_read_inventory` in a fresh process (see `_isolated`)."""
    return _isolated("_read_inventory", source)


def inventory_view(source: str | Path) -> dict[str, Any]:
    """`_inventory_view` in a fresh process (see `_isolated`)."""
    return _isolated("_inventory_view", source)


def _read_inventory(source: str | Path) -> dict[str, Any]:
    """An inventory as Ansible reads it: {hosts: {name: vars}, groups: {name: {hosts, children, vars}}}.

    `hosts` of a group are its direct members; `all` and `ungrouped` are kept only when they carry vars.
    Raises ValueError when Ansible could not parse the source (it would otherwise warn and go on empty)."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    path = Path(source)
    if not path.exists():
        raise ValueError(f"no inventory at {path}")
    manager = InventoryManager(loader=DataLoader(), sources=[str(path)])
    if not manager.hosts and not [g for g in manager.groups if g not in _IMPLICIT]:
        raise ValueError(f"Ansible found no hosts and no groups in {path}: is it an INI or YAML inventory?")
    hosts = {name: {k: plain(v) for k, v in h.vars.items() if k not in _MAGIC}
             for name, h in sorted(manager.hosts.items())}
    groups: dict[str, Any] = {}
    for name, g in manager.groups.items():
        if name in _IMPLICIT and not g.vars:
            continue
        groups[name] = {"hosts": sorted(h.name for h in g.hosts) if name not in _IMPLICIT else [],
                        "children": sorted(c.name for c in g.child_groups if c.name != "ungrouped"),
                        "vars": plain(dict(g.vars))}
    return {"hosts": hosts, "groups": groups}


def to_kubespray_config(inventory: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """The platform config's `kubespray` section (as a mapping) for an inventory `read_inventory` read.

    `settings` are the section's other fields (checkout, version, overrides, ...). Validate the result with
    `KubesprayConfig.model_validate` (the config loader does)."""
    memberships: dict[str, list[str]] = {name: [] for name in inventory["hosts"]}
    for gname, g in inventory["groups"].items():
        for h in g["hosts"]:
            memberships[h].append(gname)
    hosts = []
    for name, hvars in inventory["hosts"].items():
        entry: dict[str, Any] = {"name": name}
        entry.update({k: hvars[k] for k in _LIFTED if k in hvars})
        entry["groups"] = sorted(memberships[name])
        rest = {k: v for k, v in hvars.items() if k not in _LIFTED}
        if rest:
            entry["vars"] = rest
        hosts.append(entry)
    groups: dict[str, Any] = {}
    for gname, g in inventory["groups"].items():
        gvars = dict(g["vars"])
        entry = {}
        if g["children"]:
            entry["children"] = list(g["children"])
        taints = gvars.pop("node_taints", None)
        if isinstance(taints, list) and all(isinstance(t, str) for t in taints):
            entry["taints"] = taints
        elif taints is not None:
            gvars["node_taints"] = taints
        if gvars:
            entry["vars"] = gvars
        if entry:  # an empty group (calico_rr with no hosts) is written by the generator anyway
            groups[gname] = entry
    return {**settings, "hosts": hosts, "groups": groups}


def import_inventory(source: str | Path, **settings: Any) -> KubesprayConfig:
    """Read an inventory (INI, YAML, a folder) and return it as a validated `KubesprayConfig`."""
    return KubesprayConfig.model_validate(to_kubespray_config(read_inventory(source), **settings))


def generate_inventory(cfg: KubesprayConfig, limit_vars: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Kubespray's YAML inventory (`inventory/sample/hosts.yaml` form) for the config's cluster.

    `limit_vars` adds connection variables per host (the flows add `ansible_port`, `ansible_user`, ...)."""
    all_hosts: dict[str, Any] = {}
    for h in cfg.hosts:
        hvars = {k: getattr(h, k) for k in _LIFTED if getattr(h, k) is not None}
        hvars.update(h.vars)
        hvars.update((limit_vars or {}).get(h.name, {}))
        all_hosts[h.name] = hvars or None
    children: dict[str, Any] = {}
    names = list(dict.fromkeys([g for g in ("kube_control_plane", "etcd", "kube_node", "calico_rr")]
                               + [g for h in cfg.hosts for g in h.groups] + list(cfg.groups)))
    for gname in names:
        if gname in _IMPLICIT:
            continue
        group: dict[str, Any] = {}
        members = [h.name for h in cfg.hosts if gname in h.groups]
        if members:
            group["hosts"] = {m: None for m in members}
        spec = cfg.groups.get(gname)
        if spec is not None:
            if spec.children:
                group["children"] = {c: {} for c in spec.children}
            gvars = dict(spec.vars)
            if spec.taints:
                gvars["node_taints"] = list(spec.taints)
            if gvars:
                group["vars"] = gvars
        children[gname] = group or {"hosts": {}}
    if "k8s_cluster" not in children:  # kubespray's sample: k8s_cluster is the control plane, nodes and rr
        children["k8s_cluster"] = {"children": {"kube_control_plane": {}, "kube_node": {}, "calico_rr": {}}}
    top: dict[str, Any] = {"hosts": all_hosts, "children": children}
    all_spec = cfg.groups.get("all")
    if all_spec is not None and all_spec.vars:
        top["vars"] = dict(all_spec.vars)
    return {"all": top}


def write_inventory(cfg: KubesprayConfig, path: Path, limit_vars: dict[str, dict[str, Any]] | None = None) -> Path:
    """`generate_inventory` written as YAML to `path` (mode 0600: it may name key files)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(generate_inventory(cfg, limit_vars), sort_keys=False, default_flow_style=False))
    path.chmod(0o600)
    return path


def _inventory_view(source: str | Path) -> dict[str, Any]:
    """What makes two inventories the same for kubespray: per host its variables and its effective groups,
    per group its effective hosts, children and variables (empty groups ignored when they carry nothing)."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    manager = InventoryManager(loader=DataLoader(), sources=[str(source)])
    hosts = {name: {"vars": {k: plain(v) for k, v in h.vars.items() if k not in _MAGIC},
                    "groups": sorted(g.name for g in h.get_groups() if g.name not in _IMPLICIT)}
             for name, h in manager.hosts.items()}
    groups = {}
    for name, g in manager.groups.items():
        if name in _IMPLICIT:
            continue
        entry = {"hosts": sorted(h.name for h in g.get_hosts()), "children": sorted(c.name for c in g.child_groups),
                 "vars": plain(dict(g.vars))}
        if entry["hosts"] or entry["children"] or entry["vars"] or name in ("kube_control_plane", "etcd",
                                                                            "kube_node", "calico_rr"):
            groups[name] = entry
    return {"hosts": hosts, "groups": groups}


if __name__ == "__main__":
    import json
    import sys

    fn = {"_read_inventory": _read_inventory, "_inventory_view": _inventory_view}[sys.argv[1]]
    try:
        print(json.dumps(fn(sys.argv[2])))
    except ValueError as exc:
        sys.exit(f"ValueError: {exc}")
