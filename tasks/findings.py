"""The one finding model: what every check found, how severe it is, and what to do next (pure).

Every analysis that judges the platform returns `Finding`s: the GPU sweep (`tasks.gpu_model.GPUFinding`,
with its kind, node, GPU and pod), etcd (`tasks.etcd_rules.health_findings`: the model itself, the check
as its title), the certificates (`tasks.tls_analysis.CertFinding`, with where it was found, its
fingerprint and days left); the platform health check (`tasks.health.Check.from_findings`) and the
notices read them through this model only.

**One severity order**: ok < info < warning < unknown < critical.

- `unknown` (a source that could not be read) ranks above `warning`: nobody knows what it hides, so it
  is never healthy and never counts as ok (DESIGN, "Unknown is not healthy"); a health check whose worst
  finding is unknown is unknown.
- `critical` ranks above `unknown`: a confirmed fault is more urgent than a blind spot (a GPU sweep with
  a critical finding is critical even when most GPUs are unknown).
- `info` is healthy: a component whose worst finding is info is ok (`Severity.status`).

No Prefect, no network: `to_dict()` is the stable plain rendering (the keys below, in that order),
`markdown_row()`/`markdown_table()` the report's, `line()`/`notice_text()` the webhook notice's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

COLUMNS = ("severity", "subject", "title", "summary", "evidence", "advice")


class Severity(StrEnum):
    """Ordered by `rank` (ok 0 .. critical 4); `<`, `max`, `sorted` use that order, never the text's.
    A member equals its text (`Severity.CRITICAL == "critical"`), so plain strings read back from an
    artifact or a Variable compare with it; `Severity.parse` reads them (anything else is unknown)."""

    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    UNKNOWN = "unknown"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def healthy(self) -> bool:
        """ok and info only: unknown is never healthy."""
        return self.rank <= _RANK[Severity.INFO]

    @property
    def status(self) -> Severity:
        """What a component whose worst finding has this severity shows: info is ok, the rest as they are."""
        return Severity.OK if self is Severity.INFO else self

    @classmethod
    def parse(cls, value: Any) -> Severity:
        """A severity from text (any case); what is not one is `unknown` (never mistaken for ok)."""
        if isinstance(value, Severity):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            return cls.UNKNOWN

    @classmethod
    def worst(cls, severities: Iterable[Any], default: Severity | str = "ok") -> Severity:
        """The highest-ranked of `severities` (strings are parsed), `default` when there are none."""
        return max((cls.parse(s) for s in severities), key=_RANK.__getitem__, default=cls.parse(default))

    def __lt__(self, other: Any) -> bool:
        return self.rank < Severity(other).rank if isinstance(other, str) else NotImplemented

    def __le__(self, other: Any) -> bool:
        return self.rank <= Severity(other).rank if isinstance(other, str) else NotImplemented

    def __gt__(self, other: Any) -> bool:
        return self.rank > Severity(other).rank if isinstance(other, str) else NotImplemented

    def __ge__(self, other: Any) -> bool:
        return self.rank >= Severity(other).rank if isinstance(other, str) else NotImplemented


_RANK: dict[Severity, int] = {s: i for i, s in enumerate(Severity)}


@dataclass(frozen=True, kw_only=True)
class Finding:
    """What one check found about one subject.

    severity: how bad (`Severity`); subject: what it is about (a node and GPU, an etcd cluster, a
    certificate, a renewal timer on a host); title: the short name of the check or kind of finding
    (`critical-xid`, `quota`, `expires-soon`); summary: one line saying what was found; evidence: the
    measured facts behind it (name -> value); advice: what to do next ("" when nothing is to be done).

    Domain subclasses (`GPUFinding`, `CertFinding`) add their own fields and derive subject, title or
    advice from them; the health check, the reports and the notices read only the fields here.
    """

    severity: Severity
    subject: str
    title: str
    summary: str = ""
    evidence: Mapping[str, Any] = field(default_factory=dict, hash=False)
    advice: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.severity, Severity):
            object.__setattr__(self, "severity", Severity(self.severity))  # a typo raises ValueError

    @property
    def sort_key(self) -> tuple[int, str, str]:
        """Worst first, then by title and subject."""
        return -self.severity.rank, self.title, self.subject

    def to_dict(self) -> dict[str, Any]:
        """The stable plain rendering: `COLUMNS`, evidence as `key=value; ...` text."""
        return {"severity": self.severity.value, "subject": self.subject, "title": self.title,
                "summary": self.summary, "evidence": format_evidence(self.evidence), "advice": self.advice}

    def markdown_row(self) -> str:
        """`| severity | subject | title | summary | evidence | advice |` (pipes and newlines escaped)."""
        return "| " + " | ".join(_md(v) for v in self.to_dict().values()) + " |"

    def line(self, *, subject: bool = True, advice: bool = True) -> str:
        """One line for a notice or a check's evidence: `critical quota (etcd-main): ... -> advice`."""
        text = f"{self.severity.value} {self.title}" + (f" ({self.subject})" if subject and self.subject else "")
        text += f": {self.summary}" if self.summary else ""
        return text + (f" -> {self.advice}" if advice and self.advice else "")


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first (the one `Severity` order), then by title and subject; stable otherwise."""
    return sorted(findings, key=lambda f: f.sort_key)


def counts(findings: Iterable[Finding], severities: Sequence[Severity] = tuple(reversed(Severity))) -> dict[str, int]:
    """How many findings of each severity (worst first), every severity in `severities` present."""
    out = {s.value: 0 for s in severities}
    for f in findings:
        out[f.severity.value] = out.get(f.severity.value, 0) + 1
    return out


def markdown_table(findings: Sequence[Finding], limit: int = 50) -> str:
    """The findings as a markdown table, worst first; at most `limit` rows (and how many were left out)."""
    if not findings:
        return "_no findings_\n"
    rows = sort_findings(findings)
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + [f.markdown_row() for f in rows[:limit]]
    if len(rows) > limit:
        out.append(f"\n_{len(rows) - limit} more findings_")
    return "\n".join(out) + "\n"


def notice_text(findings: Sequence[Finding], limit: int = 20) -> str:
    """The findings for a webhook notice: one `- line` each, worst first, at most `limit` (and how many more)."""
    rows = sort_findings(findings)
    lines = [f"- {f.line()}" for f in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"- (+{len(rows) - limit} more in the run's findings table)")
    return "\n".join(lines)


def format_evidence(evidence: Mapping[str, Any]) -> str:
    """`{"temp": 93.0, "xids": [79, 13]}` -> `temp=93; xids=79,13` (NaN spelled out)."""
    parts = []
    for key, value in evidence.items():
        if isinstance(value, float):
            value = "NaN" if math.isnan(value) else f"{value:g}"
        elif isinstance(value, (list, tuple, set, frozenset)):
            value = ",".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return "; ".join(parts)


def _md(value: Any) -> str:
    return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")
