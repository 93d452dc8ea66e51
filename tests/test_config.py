"""The platform config: a good file loads; a bad one is refused naming the field and what was expected."""

from pathlib import Path

import pytest
import yaml

from blocks.config import ConfigError, SecretRef, load_platform_config, parse_platform_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "configs" / "platform.example.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_platform_config(data, "test.yaml")
    return info.value.problems


def test_example_config_is_valid():
    cfg = load_platform_config(EXAMPLE)
    assert cfg.name == "main"
    assert cfg.cluster().name == "gpu-prod"
    assert cfg.gitlab.ssh.port == 22
    assert cfg.thresholds.gpu.critical_xids == [48, 63, 64, 74, 79, 92, 94, 95]
    assert cfg.backup_store.kind == "s3"
    assert cfg.gitlab.token == SecretRef(env="GITLAB_TOKEN")


def test_wrong_port_names_field_and_expectation():
    data = example()
    data["gitlab"]["ssh"]["port"] = "abc"
    assert problems(data) == ["gitlab.ssh.port: expected an integer 1-65535, got 'abc'"]


def test_port_out_of_range():
    data = example()
    data["clusters"][0]["control_plane"][0]["port"] = 70000
    assert problems(data) == ["clusters[0].control_plane[0].port: expected an integer 1-65535, got 70000"]


def test_missing_required_field():
    data = example()
    del data["gitlab"]["api_url"]
    assert problems(data) == ["gitlab.api_url: required field is missing"]


def test_missing_clusters_and_several_errors_at_once():
    data = example()
    del data["clusters"]
    data["prometheus"]["url"] = "prometheus:9090"
    found = problems(data)
    assert "clusters: required field is missing" in found
    assert any(p.startswith("prometheus.url: expected an http(s) URL") and "'prometheus:9090'" in p for p in found)


def test_plain_secret_is_refused_and_never_echoed():
    data = example()
    data["gitlab"]["token"] = "glpat-SuperSecretValue123"
    found = problems(data)
    assert found == ["gitlab.token: expected a reference ({env: NAME} or {block: NAME}), not the secret itself"]


def test_unknown_field_is_refused():
    data = example()
    data["prometheus"]["ulr"] = "http://x:9090"
    assert problems(data) == [
        "prometheus.ulr: unknown field (check the spelling against configs/platform.example.yaml)"
    ]


def test_threshold_bounds_and_duration():
    data = example()
    data["thresholds"]["gpu"]["cordon_max_share"] = 1.5
    data["thresholds"]["gpu"]["window"] = "fifteen minutes"
    found = problems(data)
    assert "thresholds.gpu.cordon_max_share: expected a value <= 1, got 1.5" in found
    assert any(p.startswith("thresholds.gpu.window: expected a duration such as 30s") for p in found)


def test_backup_store_kind_needs_its_fields():
    data = example()
    data["backup_store"] = {"kind": "local"}
    assert problems(data) == ["backup_store: kind 'local' needs 'path': the directory to copy backups to"]
    data["backup_store"] = {"kind": "ftp", "path": "/x"}
    assert problems(data)[0].startswith("backup_store.kind: expected one of 'local' or 's3'")


def test_duplicate_cluster_names():
    data = example()
    data["clusters"].append(dict(data["clusters"][0]))
    assert problems(data) == ["clusters: cluster names must be unique, repeated: ['gpu-prod']"]


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_platform_config(bad)
    assert "not valid YAML at line" in str(info.value)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError) as info:
        load_platform_config(bad)
    assert "(top level): expected a mapping, got list" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_platform_config(tmp_path / "missing.yaml")
    assert "cannot read it" in str(info.value)


def test_secret_ref_resolution(monkeypatch):
    ref = SecretRef(env="OPS_TEST_SECRET")
    monkeypatch.delenv("OPS_TEST_SECRET", raising=False)
    with pytest.raises(LookupError, match="OPS_TEST_SECRET is not set"):
        ref.resolve()
    monkeypatch.setenv("OPS_TEST_SECRET", "s3cr3t-value")
    value = ref.resolve()
    assert value.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(value) and "s3cr3t" not in str(value)


def test_secret_ref_needs_exactly_one_source():
    data = example()
    data["gitlab"]["token"] = {"env": "A", "block": "b"}
    assert problems(data)[0].startswith("gitlab.token: expected exactly one of")


def test_cli_check_reports_field(tmp_path, capsys):
    from blocks.load import main

    data = example()
    data["gitlab"]["ssh"]["port"] = "abc"
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "gitlab.ssh.port: expected an integer 1-65535, got 'abc'" in err
    assert "Traceback" not in err
    assert main(["--check", str(EXAMPLE)]) == 0
