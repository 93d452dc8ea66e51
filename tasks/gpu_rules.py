"""The GPU alert rules, rendered from the platform config (pure: no Prefect, no network).

    python -m tasks.gpu_rules render configs/platform.example.yaml > configs/prometheus/gpu.rules.yml

The rules raise the `gpu-monitoring-sweep` flow's findings from Prometheus itself, so they fire while
Prefect is down. They read what the sweep reads (`thresholds.gpu`: exporter jobs, metric selector,
thresholds, window, critical XIDs, GPU resource names) so the two cannot drift; the checked-in
`configs/prometheus/gpu.rules.yml` is the render of `configs/platform.example.yaml` (a test compares
them), and `configs/prometheus/tests/gpu.rules.test.yml` unit-tests it with `promtool test rules`.

Every alert names the node. dcgm-exporter's series name the exporter, not the node: `Hostname` is
the exporter's host name (its pod name in a DaemonSet, the node's name with `hostNetwork`), and the
scrape target (`job`, `instance`) is the exporter pod's address. The recording rule
`dcgm_exporter_target:node` maps each scrape target of the exporter jobs to its node, trying in turn:

1. a `node` target label (relabelling `__meta_kubernetes_pod_node_name`, Prometheus docs,
   `kubernetes_sd_config`, role `pod`/`endpoints`);
2. the target's `namespace`/`pod` labels (the Prometheus operator adds them to every ServiceMonitor
   and PodMonitor target) joined with kube-state-metrics' `kube_pod_info{namespace,pod,node}`;
3. the target address' IP joined with `kube_pod_info{pod_ip}`;
4. `Hostname` as the exporter's pod name (`kube_pod_info{pod}` of a DaemonSet pod);
5. `Hostname` as the node's name, short or fully qualified (`kube_node_info{node}`, compared on the
   first DNS label);
6. otherwise the target keeps no `node`, and the alerts say "an unmapped node (exporter <instance>)"
   instead of dropping the alert.

kube-state-metrics' metrics and labels: docs/metrics/workload/pod-metrics.md (`kube_pod_info`,
`kube_pod_status_phase`, `kube_pod_container_resource_requests`,
`kube_pod_init_container_resource_requests`) and docs/metrics/cluster/node-metrics.md
(`kube_node_info`, `kube_node_status_capacity`, `kube_node_status_condition`,
`kube_node_spec_unschedulable`); resource names are sanitized into label values (`nvidia.com/gpu` ->
`nvidia_com_gpu`, every character outside `[a-zA-Z0-9_]` becomes `_`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from blocks.config import CRITICAL_XIDS, parse_duration
from tasks.prometheus import SWEEP_RULES_GROUP, _sel, jobs_regex, query_args, sweep_queries, sweep_recording_rules

NODE_RECORD = "dcgm_exporter_target:node"
GPU_KEY = "instance, Hostname, gpu, UUID"  # one GPU of one exporter (job dropped: two jobs, one GPU)


@dataclass(frozen=True)
class RuleSettings:
    """What the rules read from `thresholds.gpu` (defaults: `blocks.config.GPUThresholds`')."""

    exporter_jobs: tuple[str, ...] = ("nvidia-dcgm-exporter", "dcgm-exporter")
    metric_selector: str = ""
    window: str = "15m"
    xid_resolution: str = "1m"
    stale_after: str = "2m"
    temp_c: float = 85.0
    memory_temp_c: float = 95.0
    idle_util_pct: float = 5.0
    critical_xids: tuple[int, ...] = CRITICAL_XIDS
    whole_gpu_resources: tuple[str, ...] = ("nvidia.com/gpu",)
    shared_gpu_resources: tuple[str, ...] = ()
    gpu_resource_prefixes: tuple[str, ...] = ("nvidia.com/mig-",)

    @classmethod
    def from_config(cls, cfg: Any) -> RuleSettings:
        """From a `blocks.config.PlatformConfig` (or its `thresholds.gpu`)."""
        gpu = cfg.thresholds.gpu if hasattr(cfg, "thresholds") else cfg
        return cls(exporter_jobs=tuple(gpu.exporter_jobs), metric_selector=gpu.metric_selector,
                   window=gpu.window, xid_resolution=gpu.xid_resolution, stale_after=gpu.stale_after,
                   temp_c=float(gpu.temp_c), memory_temp_c=float(gpu.memory_temp_c),
                   idle_util_pct=float(gpu.idle_util_pct), critical_xids=tuple(sorted(set(gpu.critical_xids))),
                   whole_gpu_resources=tuple(gpu.whole_gpu_resources),
                   shared_gpu_resources=tuple(gpu.shared_gpu_resources),
                   gpu_resource_prefixes=tuple(gpu.gpu_resource_prefixes))


def ksm_resource(name: str) -> str:
    """A Kubernetes resource name as kube-state-metrics writes it in its `resource` label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _num(x: float) -> str:
    return f"{x:g}"


def _resources_regex(names: tuple[str, ...], prefixes: tuple[str, ...] = ()) -> str:
    alts = [ksm_resource(n) for n in names]  # only [a-zA-Z0-9_]: nothing to escape
    alts += [ksm_resource(p) + ".+" for p in prefixes]
    return "|".join(alts)


class _Block(str):
    """A string YAML writes as a `|` block."""


def _block_repr(dumper: yaml.SafeDumper, value: _Block) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Block, _block_repr)


def _node_of(labels: str = "instance") -> str:
    """`node` for an annotation, or what the alert knows when the target could not be mapped."""
    return ("{{ with $labels.node }}{{ . }}{{ else }}an unmapped node (exporter {{ $labels." + labels
            + " }}){{ end }}")


def rule_groups(s: RuleSettings) -> list[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """The rule groups as (group name, [(comment, rule)])."""
    for v in (s.window, s.xid_resolution, s.stale_after):
        parse_duration(v)
    jobs = jobs_regex(s.exporter_jobs)
    job = f'job=~"{jobs}"'
    dcgm = _sel(s.metric_selector, job)  # {job=~"...",<metric selector>}
    up = f"up{{{job}}}"
    w, r, stale = s.window, s.xid_resolution, s.stale_after
    stale_s = parse_duration(stale)

    def on_node(inner: str, by: str) -> str:
        """`inner` (aggregated by job, instance and more) with its node, duplicates of two jobs merged."""
        return (f"max by (node, {by}) (\n  ({inner})\n  * on (job, instance) group_left (node) {NODE_RECORD}\n)")

    record = "\n".join([
        "topk by (job, instance) (1,",
        "    # 1. a `node` target label",
        f'    group by (job, instance, node) ({up[:-1]}, node!=""}})',
        "  or on (job, instance)",
        "    # 2. the target's pod (Prometheus operator target labels)",
        "    group by (job, instance, node) (",
        f'      {up[:-1]}, pod!=""}}',
        '      * on (namespace, pod) group_left (node) topk by (namespace, pod) (1, kube_pod_info{node!=""}))',
        "  or on (job, instance)",
        "    # 3. the target address is the exporter pod's IP",
        "    group by (job, instance, node) (",
        f'      label_replace({up}, "pod_ip", "$1", "instance", `\\[?(.+?)\\]?:[0-9]+`)',
        '      * on (pod_ip) group_left (node) topk by (pod_ip) (1, kube_pod_info{pod_ip!="", node!=""}))',
        "  or on (job, instance)",
        "    # 4. Hostname is the exporter's pod name",
        "    group by (job, instance, node) (",
        (f'      label_replace(group by (job, instance, Hostname) (DCGM_FI_DEV_GPU_TEMP{dcgm}), "pod", "$1", '
        '"Hostname", "(.+)")'),
        '      * on (pod) group_left (node) topk by (pod) (1, kube_pod_info{created_by_kind="DaemonSet", node!=""}))',
        "  or on (job, instance)",
        "    # 5. Hostname is the node's name, short or fully qualified",
        "    group by (job, instance, node) (",
        (f'      label_replace(group by (job, instance, Hostname) (DCGM_FI_DEV_GPU_TEMP{dcgm}), "host", "$1", '
        '"Hostname", "([^.]+).*")'),
        ('      * on (host) group_left (node) topk by (host) (1, label_replace(group by (node) (kube_node_info), '
        '"host", "$1", "node", "([^.]+).*")))'),
        "  or on (job, instance)",
        "    # 6. unmapped: the target without a node",
        f"    group by (job, instance) ({up})",
        ")",
    ])

    xid_alts = " or ".join(f"DCGM_FI_DEV_XID_ERRORS{dcgm} == {x}" for x in s.critical_xids)
    xid_re = "|".join(str(x) for x in s.critical_xids)
    counter = _sel(s.metric_selector, job, f'xid=~"{xid_re}"')
    xid_inner = "\n  ".join([
        "(",
        "    # every critical value the last-value gauge held in the window, one series per XID",
        f'    max_over_time((count_values by (job, {GPU_KEY}) ("xid", {xid_alts}))[{w}:{r}])',
        "  or",
        "    # dcgm-exporter's per-XID count over its --xid-count-window-size (a gauge; absent by default)",
        f"    max by (job, {GPU_KEY}, xid) (max_over_time(DCGM_EXP_XID_ERRORS_COUNT{counter}[{w}])) > 0",
        ")",
    ])
    gpu_by = f"max by (job, {GPU_KEY})"
    renamed = _sel(s.metric_selector, job, 'exported_pod!=""')
    own = _sel(s.metric_selector, job, 'pod!=""', 'exported_pod=""')
    holder = (
        f'label_replace(label_replace(DCGM_FI_DEV_GPU_UTIL{renamed}, '
        '"holder_pod", "$1", "exported_pod", "(.+)"), "holder_namespace", "$1", "exported_namespace", "(.*)")\n'
        "    or\n"
        f"    label_replace(label_replace(DCGM_FI_DEV_GPU_UTIL{own}"
        f" unless on (job, instance, pod) {up}, "
        '"holder_pod", "$1", "pod", "(.+)"), "holder_namespace", "$1", "namespace", "(.*)")'
    )
    whole = _resources_regex(s.whole_gpu_resources)
    held_re = _resources_regex(s.whole_gpu_resources + s.shared_gpu_resources, s.gpu_resource_prefixes)
    held = "\n".join([
        "sum by (node) (",
        "  (",
        f'      kube_pod_container_resource_requests{{resource=~"{held_re}"}}',
        f'    or kube_pod_init_container_resource_requests{{resource=~"{held_re}"}}',
        "  )",
        ('  * on (namespace, pod) group_left () (max by (namespace, pod) (kube_pod_status_phase{phase=~"Pending|Running"})'
        " == 1)"),
        ") > 0",
    ])
    capacity = f'sum by (node) (kube_node_status_capacity{{resource=~"{whole}"}})'

    def alert(name: str, expr: str, severity: str, finding: str, summary: str, action: str,
              for_: str | None = None) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": name, "expr": _Block(expr.strip() + "\n")}
        if for_:
            rule["for"] = for_
        rule["labels"] = {"severity": severity, "finding": finding}
        rule["annotations"] = {"summary": summary, "action": action}
        return rule

    node = _node_of()
    gpu_rules = [
        ("Each dcgm-exporter scrape target's node (see tasks/gpu_rules.py): the join every alert uses.",
         {"record": NODE_RECORD, "expr": _Block(record + "\n")}),
        (("Critical XIDs (thresholds.gpu.critical_xids). DCGM_FI_DEV_XID_ERRORS holds the *last* XID seen\n"
         "until the exporter restarts (NVIDIA/dcgm-exporter issues 95 and 500), so a critical value that is\n"
         "overwritten by another XID is read from the window: one alert per critical XID seen in it."),
         alert("GPUCriticalXID", on_node(xid_inner, f"{GPU_KEY}, xid"), "critical", "critical-xid",
               f"GPU {{{{ $labels.gpu }}}} on {node}: critical XID {{{{ $labels.xid }}}} in the last {w}",
               "Cordon and drain the node, reset the GPU or reboot; RMA {{ $labels.UUID }} if it returns.")),
        (("Row remapping (DCGM field docs): a remap failure means the GPU needs service; a pending remap\n"
         "needs a GPU reset. Uncorrectable remapped rows alone are history (the count stays after a\n"
         "successful remap), shown by the sweep as info, never alerted."),
         alert("GPURowRemapFailure", on_node(f"{gpu_by} (DCGM_FI_DEV_ROW_REMAP_FAILURE{dcgm}) > 0", GPU_KEY),
               "critical", "row-remap", f"GPU {{{{ $labels.gpu }}}} on {node}: row remapping failed",
               "Cordon and drain the node; the GPU needs replacing ({{ $labels.UUID }}).")),
        ("", alert("GPURowRemapPending", on_node(f"{gpu_by} (DCGM_FI_DEV_ROW_REMAP_PENDING{dcgm}) > 0", GPU_KEY),
                   "warning", "row-remap-pending", f"GPU {{{{ $labels.gpu }}}} on {node}: a row remap is pending",
                   "Drain the node and reset the GPU to apply the remap.")),
        (("GPUs the node has (kube-state-metrics' capacity of thresholds.gpu.whole_gpu_resources) against\n"
         "GPUs its exporter reports now: fires for a GPU gone since the exporter started and stays while it\n"
         "is gone. Nodes whose exporter reports nothing are DCGMExporterDown/Stale/Missing instead. Where\n"
         "time-slicing or MIG's single strategy multiplies nvidia.com/gpu, list a resource that counts\n"
         "physical GPUs in whole_gpu_resources."),
         alert("GPUMissing", "\n".join([
             f"{capacity}",
             "- on (node)",
             "count by (node) (group by (node, gpu) (",
             f"  DCGM_FI_DEV_GPU_TEMP{dcgm} * on (job, instance) group_left (node) {NODE_RECORD}",
             "))",
             "> 0",
         ]), "critical", "gpu-missing",
             "{{ $value }} GPU(s) of node {{ $labels.node }} are not reported by dcgm-exporter",
             "Check dmesg for XID 79 and the slots' PCIe/power; cordon, drain and reboot the node.", stale)),
        ("", alert("GPUTemperatureHigh",
                   on_node(f"{gpu_by} (max_over_time(DCGM_FI_DEV_GPU_TEMP{dcgm}[{w}]))", GPU_KEY)
                   + f" > {_num(s.temp_c)}", "warning", "gpu-hot",
                   f"GPU {{{{ $labels.gpu }}}} on {node} reached {{{{ $value }}}} C",
                   "Check the node's cooling; drain it if the temperature keeps rising.")),
        ("", alert("GPUMemoryTemperatureHigh",
                   on_node(f"{gpu_by} (max_over_time(DCGM_FI_DEV_MEMORY_TEMP{dcgm}[{w}]))", GPU_KEY)
                   + f" > {_num(s.memory_temp_c)}", "warning", "memory-hot",
                   f"GPU {{{{ $labels.gpu }}}} memory on {node} reached {{{{ $value }}}} C",
                   "Check the node's cooling; hot HBM throttles and raises ECC error rates.")),
        (("Held by a pod and under thresholds.gpu.idle_util_pct for the whole window. The holder is\n"
         "`exported_pod`/`exported_namespace` where the scrape renamed the exporter's labels (honor_labels:\n"
         "false, Prometheus docs scrape_config), else `pod`/`namespace`, never the exporter's own pod\n"
         "(the target's `pod` label)."),
         alert("GPUIdleButHeld",
               on_node(f"max by (job, {GPU_KEY}, holder_namespace, holder_pod) (\n    {holder}\n  )",
                       f"{GPU_KEY}, holder_namespace, holder_pod") + f" < {_num(s.idle_util_pct)}",
               "warning", "idle-but-held",
               f"GPU {{{{ $labels.gpu }}}} on {node} is held by {{{{ $labels.holder_namespace }}}}/"
               "{{ $labels.holder_pod }} and idle",
               "Ask the pod's owner to release the GPU.", w)),
        (("Unknown is not healthy: an exporter that cannot be scraped hides its node's GPUs\n"
         "(thresholds.gpu.exporter_jobs)."),
         alert("DCGMExporterDown",
               f"max by (node, job, instance) ({up} * on (job, instance) group_left (node) {NODE_RECORD}) == 0",
               "warning", "exporter-down", f"dcgm-exporter {{{{ $labels.instance }}}} on {node} is down: "
               "its GPUs are unknown", "Restart the dcgm-exporter pod and read its logs.", stale)),
        ((f"A target whose last scrape is older than thresholds.gpu.stale_after ({stale}): scraped late, or\n"
         "gone from service discovery (its `up` is then marked stale and vanishes, so `up == 0` never fires;\n"
         f"its last sample is found over the window, {w}). Past the window, DCGMExporterMissing takes over."),
         alert("DCGMExporterStale", "\n".join([
             "((",
             f"    time() - max by (job, instance) (timestamp({up}))",
             "  or on (job, instance)",
             f"    time() - max by (job, instance) (max_over_time(timestamp({up})[{w}:{r}]))",
             f") > {stale_s})",
             f"* on (job, instance) group_left (node) topk by (job, instance) (1, last_over_time({NODE_RECORD}[{w}]))",
         ]), "warning", "exporter-stale",
             f"dcgm-exporter {{{{ $labels.instance }}}} on {node} last scraped {{{{ $value | humanizeDuration }}}} ago",
             "Check the scrape target and the exporter pod.")),
        (("A node with GPUs (kube-state-metrics' capacity) that no exporter target maps to: the exporter\n"
         "is not scheduled there, or its target is not scraped."),
         alert("DCGMExporterMissing", f"{capacity} > 0\nunless on (node) {NODE_RECORD}", "warning", "no-exporter",
               "Node {{ $labels.node }} has GPUs but no dcgm-exporter target reports them",
               "Check the dcgm-exporter DaemonSet's pod on the node (node selector, taints) and the scrape "
               "config.", w)),
    ]
    kube_rules = [
        (("GPU holders: thresholds.gpu.whole_gpu_resources, shared_gpu_resources and gpu_resource_prefixes\n"
         "(MIG, time-slicing, HAMi), requested by containers or init containers of pending or running pods."),
         alert("GPUNodeNotReadyWithGPUsHeld", "\n".join([
             'max by (node) (kube_node_status_condition{condition="Ready",status="true"}) == 0',
             "and on (node)",
             held,
         ]), "critical", "node-not-ready", "Node {{ $labels.node }} is NotReady while pods hold its GPUs",
             "Check the kubelet; pods holding GPUs there are stranded.", "2m")),
        ("", alert("GPUNodeCordonedWithGPUsHeld", "\n".join([
            "max by (node) (kube_node_spec_unschedulable) == 1",
            "and on (node)",
            held,
        ]), "warning", "cordoned-with-gpus-held", "Node {{ $labels.node }} is cordoned while pods still hold its GPUs",
            "Drain the node or uncordon it if the maintenance is over.", "30m")),
    ]
    return [("gpu-health", gpu_rules), ("gpu-kubernetes", kube_rules)]


HEADER = """\
# GENERATED by `python -m tasks.gpu_rules render CONFIG` from the platform config's thresholds.gpu
# (this file: configs/platform.example.yaml). Do not edit: change the config and render again.
# GPU health alerts: the `gpu-monitoring-sweep` flow's findings, raised by Prometheus itself (they
# fire while Prefect is down). Metric names and labels: dcgm-exporter's defaults
# (contracts/dcgm-exporter-default-counters.csv) and kube-state-metrics' (docs/metrics/). How each
# alert names its node: tasks/gpu_rules.py. Unit tests: configs/prometheus/tests/gpu.rules.test.yml.
"""


def render(settings: RuleSettings) -> str:
    """The rule file's text."""
    out = [HEADER.rstrip("\n"), "groups:"]
    for name, rules in rule_groups(settings):
        out.append(f"  - name: {name}")
        out.append("    rules:")
        for comment, rule in rules:
            if comment:
                out.extend("      # " + line if line else "      #" for line in comment.splitlines())
            text = yaml.dump([rule], Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
            out.extend("      " + line if line else line for line in text.splitlines())
            out.append("")
        out.pop()
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def render_config(path: str) -> str:
    from blocks.config import load_platform_config

    return render(RuleSettings.from_config(load_platform_config(path)))


# --- the sweep's recording rules (optional: they make a sweep at 10,000 nodes cheap) ---------------

SWEEP_HEADER = """\
# GENERATED by `python -m tasks.gpu_rules render-sweep CONFIG` from the platform config's thresholds.gpu
# (this file: configs/platform.example.yaml). Do not edit: change the config and render again.
# The gpu-monitoring-sweep flow's four fleet-wide queries, recorded at each evaluation of the group, so a
# sweep reads one instant vector of recorded series instead of evaluating its 15-minute windows over
# every GPU series. Each rule records exactly the query the sweep would run (`sweep_query` is the hash of
# its expression): the sweep uses them only when all are loaded with the hashes of its own queries,
# healthy and fresh, and otherwise runs the raw queries (its report says which). Cost: Prometheus
# evaluates the four queries every evaluation interval (about 1 s of CPU per 10,000 GPU series and query).
"""


def render_sweep(settings: Any, interval: str | None = None) -> str:
    """The sweep's recording rules (`tasks.prometheus.sweep_recording_rules`) as a rule file, for a
    `tasks.gpu_model.SweepSettings`: exactly the queries a sweep with those settings runs (`query_args`);
    `interval`: the group's evaluation interval (default: Prometheus' global `evaluation_interval`)."""
    rules = sweep_recording_rules(sweep_queries(settings.thresholds.window, **query_args(settings)))
    group: dict[str, Any] = {"name": SWEEP_RULES_GROUP}
    if interval:
        parse_duration(interval)
        group["interval"] = interval
    group["rules"] = [{"record": name, "expr": _Block(expr.replace(" or label_replace(", "\nor label_replace(")
                                                      + "\n"), "labels": {"sweep_query": h}}
                      for name, expr, h in rules]
    text = yaml.dump({"groups": [group]}, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return SWEEP_HEADER + text


def render_sweep_config(path: str, interval: str | None = None) -> str:
    from blocks.config import load_platform_config
    from tasks.gpu_model import SweepSettings

    return render_sweep(SweepSettings.from_gpu(load_platform_config(path).thresholds.gpu), interval)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or argv[0] not in ("render", "render-sweep") or (argv[0] == "render" and len(argv) == 3):
        print("usage: python -m tasks.gpu_rules render CONFIG > gpu.rules.yml\n"
              "       python -m tasks.gpu_rules render-sweep CONFIG [INTERVAL] > gpu-sweep.rules.yml", file=sys.stderr)
        return 2
    try:
        text = render_config(argv[1]) if argv[0] == "render" else render_sweep_config(argv[1], *argv[2:])
    except (OSError, ValueError) as exc:
        print(f"cannot render the GPU rules: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
