"""Helm through its CLI: read a release (`helm list`, `helm get values`), install or upgrade it
(`helm upgrade --install --atomic --wait --version X`), and go back (`helm rollback NAME REVISION`, `helm
uninstall NAME` for a release that was new). The flow gives the binary, kubeconfig and context;
every text returned or raised is redacted."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import task

from tasks.helm_releases import AddonRelease
from tasks.redact import Redactor


class HelmError(RuntimeError):
    """A helm command failed: the message has the command (no values) and helm's error."""


@dataclass(frozen=True)
class HelmCli:
    binary: str = "helm"
    kubeconfig: Path | None = None
    context: str | None = None
    timeout_s: float = 120

    def argv(self, *args: str) -> list[str]:
        out = [self.binary, *args]
        if self.kubeconfig is not None:
            out += ["--kubeconfig", str(self.kubeconfig)]
        if self.context:
            out += ["--kube-context", self.context]
        return out

    def run(self, *args: str, timeout_s: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, check=False,
                              timeout=timeout_s or self.timeout_s, env={**os.environ, "HELM_NO_PLUGINS": "1"})


def _seconds(timeout: str) -> int:
    return int(timeout[:-1]) * {"s": 1, "m": 60, "h": 3600}[timeout[-1]]


@task(name="helm-read-release")
def read_release(helm: HelmCli, release: AddonRelease, redactor: Redactor) -> tuple[dict[str, Any] | None, dict | None]:
    """(its `helm list --all` entry or None, its user-supplied values or None)."""
    res = helm.run("list", "-n", release.namespace, "--filter", f"^{release.name}$", "--all", "-o", "json")
    if res.returncode != 0:
        raise HelmError(redactor.text(f"helm list -n {release.namespace}: {res.stderr.strip()}"))
    listed = next((r for r in json.loads(res.stdout or "[]") if r.get("name") == release.name), None)
    if listed is None:
        return None, None
    res = helm.run("get", "values", release.name, "-n", release.namespace, "-o", "yaml")
    if res.returncode != 0:
        raise HelmError(redactor.text(f"helm get values {release.name}: {res.stderr.strip()}"))
    values = yaml.safe_load(res.stdout)
    return listed, values if isinstance(values, dict) else {}


@task(name="helm-upgrade-install")
def upgrade_install(helm: HelmCli, release: AddonRelease, redactor: Redactor) -> str:
    """`helm upgrade --install` the release at its pinned version with its values file, atomically."""
    args = ["upgrade", "--install", release.name, release.chart, "--repo", release.repo, "--version", release.version,
            "--namespace", release.namespace, "--create-namespace", "-f", str(release.values),
            "--atomic", "--wait", "--timeout", release.timeout]
    res = helm.run(*args, timeout_s=_seconds(release.timeout) + 120)
    if res.returncode != 0:
        raise HelmError(redactor.text(f"helm upgrade --install {release.name} {release.chart} --version "
                                      f"{release.version}: {res.stderr.strip() or res.stdout.strip()}"))
    return redactor.text(res.stdout.strip())


@task(name="helm-rollback")
def rollback(helm: HelmCli, release: AddonRelease, revision: int, redactor: Redactor) -> str:
    """`helm rollback NAME REVISION --wait`, or `helm uninstall NAME` when `revision` is 0 (the release was
    new before the run being undone)."""
    args = (["uninstall", release.name, "--namespace", release.namespace, "--wait"] if revision == 0 else
            ["rollback", release.name, str(revision), "--namespace", release.namespace, "--wait",
             "--timeout", release.timeout])
    res = helm.run(*args, timeout_s=_seconds(release.timeout) + 120)
    if res.returncode != 0:
        raise HelmError(redactor.text(f"helm {' '.join(args[:3])}: {res.stderr.strip() or res.stdout.strip()}"))
    return redactor.text(res.stdout.strip())
