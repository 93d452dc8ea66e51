"""The flows' image (Dockerfile) and its build context (.dockerignore), checked statically (no docker here):
a pinned base, the project installed from pyproject.toml, the binaries the flows call on a worker, a
non-root user matching the work pool's security context, and no local state or secrets in the context."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib

from scripts.work_pools import POD_SECURITY
from tests.conftest import REPO


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


INSTR = _instructions()


def _args() -> dict[str, str]:
    return {k: v for kind, rest in INSTR if kind == "ARG" for k, _, v in [rest.partition("=")]}


def _env() -> dict[str, str]:
    env = {}
    for kind, rest in INSTR:
        if kind == "ENV":
            env.update(dict(part.split("=", 1) for part in shlex.split(rest)))
    return env


def test_base_image_is_pinned():
    (base,) = [rest for kind, rest in INSTR if kind == "FROM"]
    ref = _args().get(base.strip("${}"), base) if base.startswith("$") else base
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", ref), ref
    assert "latest" not in ref


def test_runs_as_the_non_root_user_the_pool_expects():
    users = [rest for kind, rest in INSTR if kind == "USER"]
    assert users, "no USER: the flows would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid not in ("0", "root") and int(uid) == POD_SECURITY["runAsUser"] and int(gid) == POD_SECURITY["runAsGroup"]
    last_user = max(i for i, (kind, _) in enumerate(INSTR) if kind == "USER")
    assert all(kind != "RUN" for kind, _ in INSTR[last_user:]), "nothing runs as root after USER"


def test_project_installed_from_pyproject_with_the_binaries_flows_need():
    runs = " ".join(rest for kind, rest in INSTR if kind == "RUN")
    copies = [rest.split() for kind, rest in INSTR if kind == "COPY"]
    assert ["pyproject.toml", "README.md", "./"] in copies
    assert "pip install --no-deps -e ." in runs and "pip install -r /tmp/requirements.txt" in runs
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("ansible-core") for d in deps) and any(d.startswith("ansible-runner") for d in deps)
    assert any(d.startswith("prefect-kubernetes") for d in deps)
    assert "openssh-client" in runs
    args = _args()
    for tool, version in (("kubectl", "KUBECTL_VERSION"), ("helm", "HELM_VERSION")):
        assert re.fullmatch(r"v\d+\.\d+\.\d+", args[version]), f"{tool} is not pinned"
        assert f"/usr/local/bin/{tool}" in runs
    assert runs.count("sha256sum --check") == 2, "each downloaded binary is checked against its published sum"
    # every package the flows import is in the image, at the path prefect.yaml's pull step uses
    copied = {c[0] for c in copies}
    assert {"flows", "tasks", "blocks", "contracts", "configs", "prefect.yaml"} <= copied
    assert all((REPO / c).exists() for c in copied)
    env = _env()
    workdir = [rest for kind, rest in INSTR if kind == "WORKDIR"][-1]
    assert env["AI_PLATFORM_OPS_HOME"] == workdir
    # `make deploy POOL=platform-k8s` points prefect.yaml's pull step there
    assert f"$(filter platform-k8s,$(POOL)),{workdir}," in (REPO / "Makefile").read_text()
    assert env["PREFECT_HOME"].startswith("/home/flows/")


def test_no_secrets_or_local_state_in_the_image():
    for kind, rest in INSTR:
        if kind == "COPY":
            assert rest.split()[0] not in (".", "./"), "COPY . copies whatever the context holds"
            assert not any(bad in rest for bad in (".state", ".demo", ".venv", "sandbox", "secret", ".key", ".pem"))
        if kind in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|PASSWORD|SECRET|PRIVATE)", rest, re.IGNORECASE), rest


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching, enough for these patterns: a match of the path or of any folder
    above it excludes it; `**/` matches any number of folders (docs.docker.com, ".dockerignore files")."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        for p in prefixes:
            if fnmatch.fnmatchcase(p, pattern) or (pattern.startswith("**/")
                                                   and fnmatch.fnmatchcase(p.split("/")[-1], pattern[3:])):
                return True
    return False


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for path in (".venv/bin/python", ".demo/prefect/prefect.db", "sandbox/.state/secrets.json", "sandbox/kube.py",
                 ".git/config", "tests/conftest.py", "flows/__pycache__/x.pyc", "configs/.state/x",
                 "configs/ssh/id_ed25519", "configs/tls/server.key", ".env"):
        assert _ignored(path, patterns), path
    for path in ("flows/gpu_monitoring_sweep.py", "tasks/kubernetes.py", "configs/helm/releases.yaml",
                 "contracts/README.md", "pyproject.toml", "prefect.yaml", "README.md"):
        assert not _ignored(path, patterns), path


def test_flow_runs_in_the_image_heartbeat_as_the_zombie_automation_expects():
    """A run in the image that beat at Prefect's default 180 s would be crashed as a zombie after 90 s."""
    import yaml

    settings = yaml.safe_load((REPO / "configs/prefect/automations.yaml").read_text())["settings"]
    assert int(_env()["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == settings["heartbeat_s"]
    assert settings["zombie_within_s"] > settings["heartbeat_s"]
