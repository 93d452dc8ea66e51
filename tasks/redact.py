"""The one redaction of the project: secret values and credentials never reach a log, an artifact,
an exception message or a persisted task result.

SSH output, GitLab answers, Argo logs and training reports all go through `Redactor` (or the
`redact` shorthand). Tasks apply `Redactor.value` to what they return, since Prefect may persist
task results. A flow builds its redactor from `Platform.secrets()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

MASK = "***"
# Shorter values are not treated as secrets: masking "abc" everywhere would garble reports and
# protect nothing.
MIN_SECRET_LEN = 4

# Credentials of a known shape, whoever's they are: user:password@ in URLs, GitLab personal,
# project and runner tokens, GitHub tokens, Authorization / PRIVATE-TOKEN headers, AWS secret
# keys in `key=value` form.
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"([a-z][a-z0-9+.\-]*://)[^/\s:@]+:[^/\s@]+@"), rf"\1{MASK}:{MASK}@"),
    (re.compile(r"glpat-[A-Za-z0-9_\-]{8,}|glrt-[A-Za-z0-9_\-]{8,}|glptt-[A-Za-z0-9_\-]{8,}"
                r"|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}"), MASK),
    (re.compile(r"(?i)(authorization:\s*(?:bearer|basic)\s+|private-token:\s*|job-token:\s*)\S+"), rf"\1{MASK}"),
    (re.compile(r"(?i)(aws_secret_access_key\s*[=:]\s*)\S+"), rf"\1{MASK}"),
]


@dataclass(frozen=True)
class Redactor:
    """Masks the given secret values (longest first) and credentials of known shapes."""

    secrets: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, secrets: Iterable[str | None] = ()) -> Redactor:
        values = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LEN}
        return cls(tuple(sorted(values, key=len, reverse=True)))

    def text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def value(self, obj: Any) -> Any:
        """`obj` with every string inside it (dict keys and values, lists, tuples) redacted."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {self.value(k): self.value(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.value(v) for v in obj)
        return obj

    def error(self, exc: BaseException) -> str:
        """An exception as `Type: message`, redacted: what a report or a notice may show."""
        return self.text(f"{type(exc).__name__}: {exc}")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` without the given secret values or credentials of known shapes."""
    return Redactor.of(secrets).text(text)
