"""Credentials per platform (issue 21): every block document the loader writes is named `<platform>-...`,
`Platform.kubernetes` reads only its own platform's document and only when the config says kubeconfig,
and `python -m blocks.load` removes this platform's stale documents (never another platform's)."""

from __future__ import annotations

import itertools

import pytest
import yaml

pytestmark = pytest.mark.prefect

_TAGS = itertools.count()


def _kubeconfig(path, server: str, token: str):
    """A kubeconfig naming one cluster at `server` with an admin token (no server needs to listen)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gpu",
        "clusters": [{"name": "gpu", "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "gpu", "context": {"cluster": "gpu", "user": "admin"}}]}))
    return path


def _config(tmp_path, name: str, clusters: list[dict]):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "clusters": clusters}))
    return path


def _load(path, *extra: str) -> tuple[int, str, str]:
    """`python -m blocks.load [extra] path` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from blocks.load import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*extra, str(path)])
    return rc, out.getvalue(), err.getvalue()


def _kube_docs() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {d.name for d in client.read_block_documents_by_type("kubernetes-cluster-config", limit=200)}


def _bearer(api) -> str:
    """The Authorization header the client would send."""
    return api.configuration.auth_settings().get("BearerToken", {}).get("value", "")


@pytest.fixture
def two_platforms(prefect_server, tmp_path):
    """Platforms `<tag>-a` and `<tag>-b`, each with a cluster `gpu` at its own loopback URL, both loaded."""
    tag = f"creds{next(_TAGS)}"
    a, b = f"{tag}-a", f"{tag}-b"
    kc_a = _kubeconfig(tmp_path / "a.kubeconfig", "http://127.0.0.1:7001", "admin-token-a")
    kc_b = _kubeconfig(tmp_path / "b.kubeconfig", "http://127.0.0.2:7002", "admin-token-b")
    for name, kc in ((a, kc_a), (b, kc_b)):
        rc, out, err = _load(_config(tmp_path, name, [{"name": "gpu", "kubeconfig": str(kc), "context": "gpu"}]))
        assert rc == 0, err
        assert f"saved kubernetes-cluster-config/{name}-gpu" in out
    kc_a.unlink()  # from here on only the blocks can give the credentials
    kc_b.unlink()
    return a, b


@pytest.fixture
def in_cluster(monkeypatch, tmp_path):
    """The process looks like a pod: the service account's token and CA, the API's address in the environment."""
    import kubernetes.config.incluster_config as incluster

    token, ca = tmp_path / "sa-token", tmp_path / "sa-ca.crt"
    token.write_text("service-account-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.3")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "7003")
    return "https://127.0.0.3:7003"


def test_two_platforms_with_a_cluster_of_one_name_each_get_their_own_credentials(two_platforms):
    from blocks.platform import Platform

    a, b = two_platforms
    assert {f"{a}-gpu", f"{b}-gpu"} <= _kube_docs()
    api_a, api_b = Platform(a).kubernetes("gpu"), Platform(b).kubernetes("gpu")
    assert api_a.configuration.host == "http://127.0.0.1:7001"
    assert api_b.configuration.host == "http://127.0.0.2:7002"
    assert _bearer(api_a) == "Bearer admin-token-a" and _bearer(api_b) == "Bearer admin-token-b"


def test_removing_a_cluster_removes_its_block_and_leaves_the_other_platforms(two_platforms, tmp_path, in_cluster):
    from prefect_kubernetes.credentials import KubernetesClusterConfig

    from blocks.platform import Platform

    a, b = two_platforms
    rc, out, err = _load(_config(tmp_path, a, [{"name": "cpu"}]))  # `gpu` removed; `cpu` is in-cluster
    assert rc == 0, err
    assert f"removed kubernetes-cluster-config/{a}-gpu (stale" in out
    assert f"{b}-gpu" not in out
    docs = _kube_docs()
    assert f"{a}-gpu" not in docs and f"{b}-gpu" in docs
    with pytest.raises(ValueError):
        KubernetesClusterConfig.load(f"{a}-gpu", _sync=True)
    assert Platform(b).kubernetes("gpu").configuration.host == "http://127.0.0.2:7002"
    with pytest.raises(KeyError, match="no cluster named 'gpu'"):
        Platform(a).kubernetes("gpu")
    assert Platform(a).kubernetes("cpu").configuration.host == in_cluster
    rc, out, _ = _load(_config(tmp_path, a, [{"name": "cpu"}]))
    assert rc == 0 and "removed" not in out  # idempotent: nothing stale the second time


def test_switching_to_in_cluster_removes_the_admin_block_and_never_uses_it(two_platforms, tmp_path, in_cluster):
    from prefect_kubernetes.credentials import KubernetesClusterConfig

    from blocks.platform import Platform

    a, b = two_platforms
    admin = KubernetesClusterConfig.load(f"{a}-gpu", _sync=True)
    rc, out, err = _load(_config(tmp_path, a, [{"name": "gpu"}]))  # same cluster, now the service account
    assert rc == 0, err
    assert f"removed kubernetes-cluster-config/{a}-gpu" in out
    assert f"{a}-gpu" not in _kube_docs() and f"{b}-gpu" in _kube_docs()
    api = Platform(a).kubernetes("gpu")
    assert api.configuration.host == in_cluster and _bearer(api).lower() == "bearer service-account-token"

    # The config is the truth: an admin block put back by hand (or by an older loader) is not read.
    admin.save(f"{a}-gpu", overwrite=True)
    api = Platform(a).kubernetes("gpu")
    assert api.configuration.host == in_cluster and "admin-token" not in _bearer(api)


def test_keep_stale_refuses_and_writes_nothing(two_platforms, tmp_path):
    from blocks.platform import Platform

    a, _ = two_platforms
    rc, out, err = _load(_config(tmp_path, a, [{"name": "gpu"}]), "--keep-stale")
    assert rc == 3 and out == ""
    assert f"stale kubernetes-cluster-config/{a}-gpu" in err and "run without --keep-stale" in err
    assert f"{a}-gpu" in _kube_docs()
    assert Platform(a).config.cluster("gpu").kubeconfig is not None  # the settings were not replaced either
    assert Platform(a).kubernetes("gpu").configuration.host == "http://127.0.0.1:7001"


def test_a_longer_platform_name_keeps_its_documents_and_a_name_clash_is_refused(prefect_server, tmp_path):
    from blocks.platform import Platform

    p = f"creds{next(_TAGS)}"
    q = f"{p}-gpu"  # platform `<p>-gpu`: its cluster `c` is `<p>-gpu-c`, a name that starts with `<p>-`
    kc_p = _kubeconfig(tmp_path / "p.kubeconfig", "http://127.0.0.1:7004", "admin-token-p")
    kc_q = _kubeconfig(tmp_path / "q.kubeconfig", "http://127.0.0.2:7005", "admin-token-q")
    assert _load(_config(tmp_path, p, [{"name": "gpu", "kubeconfig": str(kc_p)}]))[0] == 0
    assert _load(_config(tmp_path, q, [{"name": "c", "kubeconfig": str(kc_q)}]))[0] == 0

    rc, out, err = _load(_config(tmp_path, p, [{"name": "gpu"}]))
    assert rc == 0, err
    assert f"removed kubernetes-cluster-config/{p}-gpu " in out
    assert f"left kubernetes-cluster-config/{q}-c (named like platform {q!r}'s" in out
    assert f"{q}-c" in _kube_docs()
    assert Platform(q).kubernetes("c").configuration.host == "http://127.0.0.2:7005"

    # Platform `<p>` with a cluster `gpu-c` would write `<p>-gpu-c`, platform `<p>-gpu`'s: refused, nothing written.
    rc, out, err = _load(_config(tmp_path, p, [{"name": "gpu-c", "kubeconfig": str(kc_p)}]))
    assert rc == 2 and out == ""
    assert f"platform {p!r} and platform {q!r}" in err and f"kubernetes-cluster-config/{q}-c" in err
    assert Platform(q).kubernetes("c").configuration.host == "http://127.0.0.2:7005"
    assert [c.name for c in Platform(p).config.clusters] == ["gpu"]


def test_a_kubeconfig_cluster_without_its_block_reads_only_its_own_file(prefect_server, tmp_path):
    """A block not saved yet: the config's own kubeconfig file, never another platform's `gpu` block."""
    from blocks.config import parse_platform_config
    from blocks.connections import PlatformSettings
    from blocks.platform import Platform

    tag = f"creds{next(_TAGS)}"
    other = _kubeconfig(tmp_path / "other.kubeconfig", "http://127.0.0.2:7006", "admin-token-other")
    assert _load(_config(tmp_path, f"{tag}-b", [{"name": "gpu", "kubeconfig": str(other)}]))[0] == 0
    own = _kubeconfig(tmp_path / "own.kubeconfig", "http://127.0.0.1:7007", "admin-token-own")
    cfg = parse_platform_config({"name": f"{tag}-a", "clusters": [{"name": "gpu", "kubeconfig": str(own)}]})
    PlatformSettings(config=cfg.model_dump(mode="json", exclude_none=True)).save(f"{tag}-a", overwrite=True)
    assert Platform(f"{tag}-a").kubernetes("gpu").configuration.host == "http://127.0.0.1:7007"
    own.unlink()
    with pytest.raises(LookupError, match=rf"no kubernetes-cluster-config block named '{tag}-a-gpu' and no "
                                          "kubeconfig file"):
        Platform(f"{tag}-a").kubernetes("gpu")


def test_document_names_carry_the_platform_and_a_clash_within_one_config_is_refused():
    from blocks.config import parse_platform_config
    from blocks.load import BlockNameClash, block_name, document_names

    assert block_name("Main", "GPU_1", "Node.A") == "main-gpu-1-node-a"
    a = document_names(parse_platform_config({"name": "a", "clusters": [{"name": "gpu", "kubeconfig": "/k"}]}))
    b = document_names(parse_platform_config({"name": "b", "clusters": [{"name": "gpu", "kubeconfig": "/k"}]}))
    assert "kubernetes-cluster-config/a-gpu" in a and "kubernetes-cluster-config/b-gpu" in b
    assert not set(a) & set(b)
    twins = {"name": "a", "clusters": [{"name": "gpu", "control_plane": [{"host": "10.0.0.1", "name": "Node.A"},
                                                                        {"host": "10.0.0.2", "name": "node-a"}]}]}
    with pytest.raises(BlockNameClash, match=r"two documents named \['cluster-ssh-host/a-gpu-node-a'\]"):
        document_names(parse_platform_config(twins))


def test_a_block_under_a_bare_cluster_name_is_reported_not_read_not_removed(two_platforms, tmp_path):
    from prefect_kubernetes.credentials import KubernetesClusterConfig

    from blocks.platform import Platform

    a, b = two_platforms
    tag = a.rsplit("-", 1)[0]
    old = f"{tag}-old"  # a cluster whose block an older loader saved under the bare cluster name
    KubernetesClusterConfig.load(f"{a}-gpu", _sync=True).save(old, overwrite=True)
    kc = _kubeconfig(tmp_path / "a2.kubeconfig", "http://127.0.0.1:7008", "admin-token-a2")
    # cluster `<tag>-b-gpu` of platform a: its bare name is platform b's `gpu` block, which is b's, not a relic
    rc, out, err = _load(_config(tmp_path, a, [{"name": old, "kubeconfig": str(kc)},
                                              {"name": f"{tag}-b-gpu", "kubeconfig": str(kc)}]))
    assert rc == 0, err
    assert f"left kubernetes-cluster-config/{old} (a bare cluster name" in out
    assert f"kubernetes-cluster-config/{b}-gpu " not in out and f"kubernetes-cluster-config/{b}-gpu\n" not in out
    assert {old, f"{a}-{old}", f"{b}-gpu"} <= _kube_docs()
    assert Platform(a).kubernetes(old).configuration.host == "http://127.0.0.1:7008"
