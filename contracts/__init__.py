"""Published contracts of the systems the project talks to, kept in the repository.

See `contracts/README.md` for where each file came from. A missing contract is an error that says
which file and how to get it back, never a reason to skip a check.
"""

from __future__ import annotations

from pathlib import Path

CONTRACTS_DIR = Path(__file__).resolve().parent
ARGO_WORKFLOW_SCHEMA = "argo-workflows.schema.json"
DCGM_DEFAULT_COUNTERS = "dcgm-exporter-default-counters.csv"
ARGO_WORKFLOW_DEFINITION = "io.argoproj.workflow.v1alpha1.Workflow"


class MissingContract(FileNotFoundError):
    """A contract file the project ships is not where it should be."""


def contract_path(name: str) -> Path:
    """The path of a contract file shipped in `contracts/`; raises `MissingContract` if it is gone."""
    path = CONTRACTS_DIR / name
    if not path.is_file():
        raise MissingContract(
            f"contract {name!r} is missing from {CONTRACTS_DIR}: it is part of the repository "
            "(see contracts/README.md); restore it with `git checkout -- contracts/`")
    return path


def argo_workflow_validator():
    """A jsonschema validator for an Argo `Workflow` against Argo's published schema."""
    import json

    import jsonschema

    schema = json.loads(contract_path(ARGO_WORKFLOW_SCHEMA).read_text())
    root = {"$ref": f"#/definitions/{ARGO_WORKFLOW_DEFINITION}", "definitions": schema["definitions"]}
    return jsonschema.validators.validator_for(schema)(root)


def dcgm_default_counters() -> dict[str, str]:
    """dcgm-exporter's default counters as {metric name: Prometheus type}, from its published CSV."""
    out: dict[str, str] = {}
    for line in contract_path(DCGM_DEFAULT_COUNTERS).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, kind, *_ = (part.strip() for part in line.split(","))
        out[name] = kind
    return out
