"""A stand-in `helm` (Helm 3 CLI) for the install-addons flow: it records every argv and keeps releases in
a state file, fails on request, and answers the few commands the flow uses the way helm does.

Run as `python -m sandbox.helm_standin ARGS...` (tests write a `helm` wrapper script that does so) with
`HELM_STANDIN_STATE=<dir>`: `<dir>/calls.jsonl` gets one JSON argv per call, `<dir>/releases.json` the
releases, `<dir>/fail.json` ({"release": "message"}) makes an upgrade of that release fail.

Behaviour modelled on helm v3 (helm/helm):
- `get values NAME -n NS -o yaml`: the user-supplied values (pkg/action/get_values.go returns
  `rel.Config` unless --all); an unknown release: "Error: release: not found", exit 1
  (pkg/storage/driver/driver.go ErrReleaseNotFound).
- `list -n NS --filter REGEX [--all] -o json`: name, namespace, revision (a string), updated, status,
  chart (`NAME-VERSION`), app_version (cmd/helm/list.go releaseElement). Without --all only deployed and
  failed releases show (pkg/action/list.go: the default state mask).
- `upgrade --install NAME CHART --repo URL --version V -n NS [--create-namespace] -f FILE --atomic
  --wait --timeout T`: a new revision, status deployed. A failure with --atomic rolls back (an upgrade: a
  rollback revision, the previous values) or uninstalls (a first install): "Error: UPGRADE FAILED: release
  NAME failed, and has been rolled back due to atomic being set: MSG" (pkg/action/upgrade.go
  failRelease), "Error: INSTALLATION FAILED: release NAME failed, and has been uninstalled due to atomic
  being set: MSG" (pkg/action/install.go). Without --atomic the release stays `failed`. A release in a
  pending-* state refuses: "another operation (install/upgrade/rollback) is in progress"
  (pkg/action/action.go errPending). The namespace must exist unless --create-namespace
  (namespaces created here are recorded in the state).
- `rollback NAME REVISION -n NS --wait`: a new revision with the chart and values of REVISION, status
  deployed, "Rollback was a success! Happy Helming!" (pkg/action/rollback.go: the target is copied into a
  new release with Version = current + 1); a revision not in the history: "Error: release has no N version".
- `uninstall NAME -n NS`: the release and its history gone, `release "NAME" uninstalled`
  (pkg/action/uninstall.go); an unknown release: "Error: uninstall: Release not loaded: NAME: release: not
  found".
- `version --short`: v3.16.2+gstandin.

Every revision a release had is kept (`history`), as helm keeps one Secret per revision
(pkg/storage/driver/secrets.go) up to --history-max.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

VERSION = "v3.16.2+gstandin"


def _state_dir() -> Path:
    d = Path(os.environ["HELM_STANDIN_STATE"])
    d.mkdir(parents=True, exist_ok=True)
    return d


def _load(d: Path) -> dict[str, Any]:
    p = d / "releases.json"
    state = json.loads(p.read_text()) if p.exists() else {"releases": {}, "namespaces": ["default", "kube-system"]}
    state.setdefault("history", {})
    return state


def _save(d: Path, state: dict[str, Any]) -> None:
    for key, rel in state["releases"].items():  # every revision is kept, as helm's storage does
        revs = state["history"].setdefault(key, [])
        if not revs or revs[-1]["revision"] != rel["revision"]:
            revs.append(dict(rel))
    for key in [k for k in state["history"] if k not in state["releases"]]:
        del state["history"][key]
    tmp = d / "releases.json.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(d / "releases.json")


def _opts(args: list[str]) -> tuple[list[str], dict[str, list[str]], set[str]]:
    """Positional args, options with values, flags (the subset of helm's flags the flow uses)."""
    with_value = {"-n", "--namespace", "-o", "--output", "--repo", "--version", "-f", "--values", "--timeout",
                  "--filter", "--kubeconfig", "--kube-context"}
    pos, opts, flags = [], {}, set()
    i = 0
    while i < len(args):
        a = args[i]
        if "=" in a and a.startswith("--") and a.split("=", 1)[0] in with_value:
            k, v = a.split("=", 1)
            opts.setdefault(k, []).append(v)
        elif a in with_value:
            opts.setdefault(a, []).append(args[i + 1])
            i += 1
        elif a.startswith("-"):
            flags.add(a)
        else:
            pos.append(a)
        i += 1
    return pos, opts, flags


def _one(opts: dict[str, list[str]], *names: str, default: str | None = None) -> str | None:
    for n in names:
        if n in opts:
            return opts[n][-1]
    return default


def _err(msg: str) -> int:
    print(f"Error: {msg}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    d = _state_dir()
    with (d / "calls.jsonl").open("a") as fh:
        fh.write(json.dumps(argv) + "\n")
    pos, opts, flags = _opts(argv)
    state = _load(d)
    ns = _one(opts, "-n", "--namespace", default="default")
    if pos[:1] == ["version"]:
        print(VERSION)
        return 0
    if pos[:2] == ["get", "values"]:
        rel = state["releases"].get(f"{ns}/{pos[2]}")
        if rel is None:
            return _err("release: not found")
        print(yaml.safe_dump(rel["values"], sort_keys=True) if rel["values"] else "null")
        return 0
    if pos[:1] == ["list"]:
        import re

        pattern = re.compile(_one(opts, "--filter", default="") or "")
        shown = [r for r in state["releases"].values() if r["namespace"] == ns and pattern.search(r["name"])
                 and ("--all" in flags or r["status"] in ("deployed", "failed"))]
        print(json.dumps([{"name": r["name"], "namespace": r["namespace"], "revision": str(r["revision"]),
                           "updated": r["updated"], "status": r["status"],
                           "chart": f"{r['chart']}-{r['version']}", "app_version": ""} for r in shown]))
        return 0
    if pos[:1] == ["upgrade"] and "--install" in flags and len(pos) == 3:
        name, chart = pos[1], pos[2]
        key = f"{ns}/{name}"
        if ns not in state["namespaces"]:
            if "--create-namespace" not in flags:
                return _err(f'create: failed to create: namespaces "{ns}" not found')
            state["namespaces"].append(ns)
        files = opts.get("-f", []) + opts.get("--values", [])
        values: dict[str, Any] = {}
        for f in files:
            values.update(yaml.safe_load(Path(f).read_text()) or {})
        prev = state["releases"].get(key)
        if prev is not None and prev["status"].startswith("pending-"):
            return _err("UPGRADE FAILED: another operation (install/upgrade/rollback) is in progress")
        fail = json.loads((d / "fail.json").read_text()) if (d / "fail.json").exists() else {}
        now = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())
        rev = (prev["revision"] if prev else 0) + 1
        new = {"name": name, "namespace": ns, "chart": chart.rsplit("/", 1)[-1],
               "version": _one(opts, "--version", default="latest"), "repo": _one(opts, "--repo"),
               "values": values, "revision": rev, "status": "deployed", "updated": now}
        if name in fail:
            atomic = "--atomic" in flags
            if prev is None or prev["status"] != "deployed":
                if atomic:
                    state["releases"].pop(key, None)
                    _save(d, state)
                    return _err(f"INSTALLATION FAILED: release {name} failed, and has been uninstalled due to "
                                f"atomic being set: {fail[name]}")
                state["releases"][key] = {**new, "status": "failed"}
                _save(d, state)
                return _err(f"INSTALLATION FAILED: {fail[name]}")
            if atomic:  # the failed revision, then a rollback revision with the previous values
                state["releases"][key] = {**prev, "revision": rev + 1, "status": "deployed", "updated": now}
                _save(d, state)
                return _err(f"UPGRADE FAILED: release {name} failed, and has been rolled back due to atomic "
                            f"being set: {fail[name]}")
            state["releases"][key] = {**new, "status": "failed"}
            _save(d, state)
            return _err(f"UPGRADE FAILED: {fail[name]}")
        state["releases"][key] = new
        _save(d, state)
        print(f'Release "{name}" has been upgraded. Happy Helming!' if prev else
              f'Release "{name}" does not exist. Installing it now.\nNAME: {name}\nSTATUS: deployed\nREVISION: {rev}')
        return 0
    if pos[:1] == ["rollback"] and len(pos) == 3:
        key = f"{ns}/{pos[1]}"
        cur = state["releases"].get(key)
        if cur is None:
            return _err("release: not found")
        target = next((r for r in state["history"].get(key, []) if str(r["revision"]) == pos[2]), None)
        if target is None:
            return _err(f"release has no {pos[2]} version")
        state["releases"][key] = {**target, "revision": cur["revision"] + 1, "status": "deployed",
                                  "updated": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())}
        _save(d, state)
        print("Rollback was a success! Happy Helming!")
        return 0
    if pos[:1] == ["uninstall"] and len(pos) == 2:
        if state["releases"].pop(f"{ns}/{pos[1]}", None) is None:
            return _err(f"uninstall: Release not loaded: {pos[1]}: release: not found")
        _save(d, state)
        print(f'release "{pos[1]}" uninstalled')
        return 0
    return _err(f"the helm stand-in does not model {argv!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
