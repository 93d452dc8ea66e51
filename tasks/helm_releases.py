"""The platform add-ons as data: `configs/helm/releases.yaml` validated, put in dependency order, and each
release's current state judged against its values file. Pure functions; no Prefect, no helm."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

REPO = Path(__file__).resolve().parent.parent
RELEASES_FILE = REPO / "configs" / "helm" / "releases.yaml"
_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a DNS-1123 label: what helm accepts as a release name
# keys that hold credentials: they belong in a Kubernetes secret, never in a values file
_SECRET_KEYS = re.compile(r"^(runnerToken|runnerRegistrationToken|adminPassword|password|token|secretKey|"
                          r"accessKey|clientSecret|apiKey)$", re.IGNORECASE)


class RequiredSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=_NAME)
    data_keys: list[str] = Field(default_factory=list, description="keys its data must hold")


class AddonRelease(BaseModel):
    """One Helm release: chart and pinned version, namespace, values file, what it is installed after."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=_NAME, max_length=53)
    chart: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")
    repo: str = Field(..., pattern=r"^(https?|oci)://\S+$")
    version: str = Field(..., pattern=r"^v?\d+\.\d+\.\d+([-+][0-9A-Za-z.\-]+)?$", description="pinned, exact")
    namespace: str = Field(..., pattern=_NAME)
    values: Path
    after: list[str] = Field(default_factory=list)
    timeout: str = Field("10m", pattern=r"^\d+[smh]$")
    secrets: list[RequiredSecret] = Field(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) else v


def secret_like_keys(doc: Any, path: str = "") -> list[str]:
    """Paths of keys in a values document that look like credentials and carry a non-empty value."""
    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            here = f"{path}.{k}" if path else str(k)
            if _SECRET_KEYS.match(str(k)) and isinstance(v, (str, int)) and str(v).strip():
                found.append(here)
            found += secret_like_keys(v, here)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += secret_like_keys(v, f"{path}[{i}]")
    return found


def load_values(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(Path(path).read_text())
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise TypeError(f"{path}: a values file must be a YAML mapping, got {type(doc).__name__}")
    return doc


def load_releases(path: Path = RELEASES_FILE) -> list[AddonRelease]:
    """The releases of `path`, values paths resolved against its folder; every problem named."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    base = Path(path).resolve().parent
    releases = []
    for i, raw in enumerate(doc.get("releases") or []):
        try:
            rel = AddonRelease.model_validate(raw)
        except ValueError as exc:  # pydantic ValidationError is a ValueError
            raise ValueError(f"{path}: releases[{i}] ({(raw or {}).get('name', '?')}): {exc}") from exc
        releases.append(rel.model_copy(update={"values": (base / rel.values).resolve()}))
    names = [r.name for r in releases]
    problems = [f"release {n} is listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for r in releases:
        problems += [f"release {r.name} is after unknown release {a}" for a in r.after if a not in names]
        if not r.values.is_file():
            problems.append(f"release {r.name}: values file {r.values} is missing")
            continue
        try:
            leaked = secret_like_keys(load_values(r.values))
        except (TypeError, yaml.YAMLError) as exc:
            problems.append(f"release {r.name}: {exc}")
            continue
        if leaked:
            problems.append(f"release {r.name}: credentials in {r.values.name} ({', '.join(leaked)}): put them in "
                            "a Kubernetes secret the chart reads")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    install_order(releases)  # raises on a cycle
    return releases


def install_order(releases: list[AddonRelease]) -> list[AddonRelease]:
    """Dependency order (each release after its `after`), otherwise the file's order; a cycle is an error."""
    done: list[AddonRelease] = []
    left = list(releases)
    while left:
        ready = [r for r in left if all(a in {d.name for d in done} for a in r.after)]
        if not ready:
            raise ValueError(f"the releases' `after` form a cycle among {[r.name for r in left]}")
        done.append(ready[0])
        left.remove(ready[0])
    return done


def values_diff(current: dict[str, Any] | None, wanted: dict[str, Any], name: str) -> str:
    """A unified diff of the deployed user values (`helm get values`) against the file's, as sorted YAML."""
    def dump(d: dict[str, Any] | None) -> list[str]:
        return yaml.safe_dump(d or {}, sort_keys=True, default_flow_style=False).splitlines(keepends=True)

    return "".join(difflib.unified_diff(dump(current), dump(wanted), f"{name} (deployed)", f"{name} (values file)"))


def judge(release: AddonRelease, listed: dict[str, Any] | None, current: dict[str, Any] | None,
          wanted: dict[str, Any]) -> tuple[str, str]:
    """What to do with a release: ("install"|"upgrade"|"skip"|"blocked", why). `listed`: its `helm list`
    entry (None: not installed); `current`: its user values."""
    if listed is None:
        return "install", "not installed"
    status = listed.get("status", "")
    if status.startswith("pending-"):
        return "blocked", f"release is {status}: another helm operation is in progress"
    deployed_chart = listed.get("chart", "")
    wanted_chart = f"{release.chart.rsplit('/', 1)[-1]}-{release.version}"
    reasons = []
    if deployed_chart != wanted_chart:
        reasons.append(f"chart {deployed_chart} -> {wanted_chart}")
    if (current or {}) != wanted:
        reasons.append("values differ")
    if status != "deployed":
        reasons.append(f"status {status}")
    return ("upgrade", "; ".join(reasons)) if reasons else ("skip", "unchanged")
