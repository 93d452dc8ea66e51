"""The repository stands on its own: no file reads the reference folder beside the clone, or anything
else outside the repository."""

from __future__ import annotations

import re
import subprocess

import pytest

from contracts import (
    ARGO_WORKFLOW_SCHEMA,
    DCGM_DEFAULT_COUNTERS,
    MissingContract,
    argo_workflow_validator,
    contract_path,
    dcgm_default_counters,
)
from tests.conftest import FIXTURES, REPO

# What a reference to the repository's parent folder looks like in code, scripts and documents: the
# reference folder's relative path, three `.parent` steps from a module (beside the clone), the repo
# root's parent, and a path joined from the folder's quoted name. The words are assembled here so that
# this guard does not itself contain what it looks for.
_FOLDER = "sha" + "red"
_UP = r"\.parent"
_PARENT_REFS = [
    re.compile(r"\.\./" + _FOLDER + r"\b"),
    re.compile(_UP * 3),
    re.compile(r"\bREPO" + _UP + r"\b"),
    re.compile(r"\"" + _FOLDER + r"\"\s*/"),
    re.compile(r"['\"]\.\.['\"]\s*/\s*['\"]" + _FOLDER),
]
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".ini", ".json", ".txt", ""}


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f]


def test_no_file_refers_to_the_repository_parent():
    offenders = []
    for rel in _tracked_files():
        path = REPO / rel
        if rel.startswith("tests/fixtures/") or not path.is_file():
            continue
        if path.suffix not in _TEXT_SUFFIXES or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="replace")
        for pattern in _PARENT_REFS:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{rel}:{line}: {m.group(0)!r}")
    assert not offenders, "files refer to the repository's parent folder:\n" + "\n".join(offenders)


def test_the_guard_catches_a_reference():
    """The patterns above do match the forms the project once used (so the guard can fail)."""
    up3 = ".parent" * 3
    samples = [f'SCHEMA = Path(__file__).resolve(){up3} / "{_FOLDER}" / "contracts"',
               f"X = REPO{'.parent'} / '{_FOLDER}'", f"see ../{_FOLDER}/DESIGN.md"]
    for sample in samples:
        assert any(p.search(sample) for p in _PARENT_REFS), sample


def test_contracts_ship_with_the_repository():
    assert contract_path(ARGO_WORKFLOW_SCHEMA).is_relative_to(REPO)
    counters = dcgm_default_counters()
    assert counters["DCGM_FI_DEV_GPU_TEMP"] == "gauge"
    assert counters["DCGM_FI_DEV_XID_ERRORS"] == "gauge"
    assert counters["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == "counter"
    assert contract_path(DCGM_DEFAULT_COUNTERS).is_relative_to(REPO)


def test_argo_validator_refuses_an_invalid_workflow():
    validator = argo_workflow_validator()
    good = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "x"},
            "spec": {"entrypoint": "main", "templates": [{"name": "main", "container": {"image": "busybox"}}]}}
    assert list(validator.iter_errors(good)) == []
    bad = {**good, "spec": {"entrypoint": "main", "templates": "not-a-list"}}
    assert list(validator.iter_errors(bad)), "a workflow with templates as a string must not validate"


def test_missing_contract_is_a_clear_error():
    with pytest.raises(MissingContract, match=r"'no-such-contract.json' is missing .*git checkout"):
        contract_path("no-such-contract.json")


def test_argo_stand_in_fails_without_its_schema(monkeypatch, tmp_path):
    """Without the schema the Argo stand-in refuses to start; it never silently accepts everything."""
    import contracts
    from sandbox.argo import ArgoStandIn

    monkeypatch.setattr(contracts, "CONTRACTS_DIR", tmp_path)
    with pytest.raises(MissingContract):
        ArgoStandIn(token=None, tick=0.1)


def test_seed_fixtures_are_in_the_repository():
    names = {p.name for p in FIXTURES.iterdir()}
    assert {"argo-rl-prod.yml", "kubespray-inventory.ini", "kubespray-override.yml"} <= names
    assert FIXTURES.is_relative_to(REPO)
