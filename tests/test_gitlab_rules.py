"""GitLab's backup rules as GitLab states them: ids, components, outputs, refusals, the drill
overlay. Pure: no Prefect, no network."""

from __future__ import annotations

import json

import pytest

from tasks.gitlab_rules import (
    BackupLog,
    DrillOverlay,
    HostFile,
    apply_drill_overlay,
    backup_id_from_archive,
    check_archive,
    check_failures,
    doctor_secrets_failures,
    gitlab_rb_setting,
    gitlab_removes,
    keep_time_warning,
    parse_backup_id,
    parse_backup_log,
    parse_ctl_status,
    parse_env_info,
    restore_refusals,
    services_still_up,
)

# Every form lib/backup/manager.rb `backup_file?` matches, the documentation's "-ce" examples, and
# what Gitlab::VERSION looks like on pre-release and release-candidate builds.
GITLAB_IDS = {
    "1495527122": (1495527122, None, None, None),
    "1495527068_2017_05_23": (1495527068, None, None, None),
    "1495527097_2017_05_23_9.3.0-pre": (1495527097, "9.3.0", "-pre", "ce"),
    "1701728344_2023_12_04_16.7.0-pre": (1701728344, "16.7.0", "-pre", "ce"),
    "1717000000_2024_05_29_17.0.0-rc1-ee": (1717000000, "17.0.0", "-rc1", "ee"),
    "1717000000_2024_05_29_17.0.0.rc2": (1717000000, "17.0.0", ".rc2", "ce"),
    "1717000000_2024_05_29_17.0.1-ee": (1717000000, "17.0.1", None, "ee"),
    "1493107454_2018_04_25_10.6.4-ce": (1493107454, "10.6.4", None, "ce"),  # docs: Backup archive process
    "11493107454_2018_04_25_10.6.4-ce": (11493107454, "10.6.4", None, "ce"),  # docs: Restore GitLab
}


@pytest.mark.parametrize("value", sorted(GITLAB_IDS))
def test_every_id_gitlab_writes_or_documents_is_accepted(value):
    b = parse_backup_id(value)
    assert b.kind == "timestamp" and (b.epoch, b.version, b.pre, b.edition) == GITLAB_IDS[value]
    assert backup_id_from_archive(f"{value}_gitlab_backup.tar") == b  # discovery, retention: the same parser


def test_versions_of_ids_compare_as_gitlab_spells_them():
    assert parse_backup_id("1717000000_2024_05_29_17.0.0-rc1-ee").gitlab_version == "17.0.0-rc1-ee"
    assert parse_backup_id("1493107454_2018_04_25_10.6.4-ce").gitlab_version == "10.6.4"
    assert parse_backup_id("1495527068_2017_05_23").gitlab_version is None


def test_custom_backup_names_follow_one_rule_and_bad_ids_show_the_expected_form():
    for name in ("pre-upgrade", "nightly_2024.05", "dump"):
        assert parse_backup_id(name).kind == "custom" and parse_backup_id(name).epoch is None
    with pytest.raises(ValueError, match="leave out '_gitlab_backup.tar'"):
        parse_backup_id("1717000000_2024_05_29_17.0.1-ee_gitlab_backup.tar")
    with pytest.raises(ValueError, match="starts like a timestamp id"):
        parse_backup_id("1717000000_2024_5_29")
    with pytest.raises(ValueError, match=r"expected <epoch> \| <epoch>_<YYYY_MM_DD>"):
        parse_backup_id("../../etc/passwd")


def test_gitlab_own_pruning_only_sees_its_own_names():
    assert gitlab_removes("1495527122_gitlab_backup.tar")
    assert gitlab_removes("1717000000_2024_05_29_17.0.1-ee_gitlab_backup.tar")
    assert not gitlab_removes("pre-upgrade_gitlab_backup.tar")
    assert not gitlab_removes("1493107454_2018_04_25_10.6.4-ce_gitlab_backup.tar")


INFO = ("---\n:backup_id: 1717000000_2024_05_29_17.0.1-ee\n:gitlab_version: 17.0.1-ee\n"
        ":installation_type: omnibus-gitlab\n:skipped: {skipped}\n")
FILES = ("uploads", "builds", "artifacts", "pages", "lfs", "terraform_state", "packages", "ci_secure_files")


def _members(*, repos=True, registry=False):
    out = [("backup_information.yml", 1), ("db/database.sql.gz", 1)] + [(f"{c}.tar.gz", 1) for c in FILES]
    if repos:
        out.append(("repositories/@hashed/aa/bb.bundle", 5))
    if registry:
        out.append(("registry.tar.gz", 1))
    return out


def _log(disabled=("registry",), skipped=(), done=None):
    done = done if done is not None else ["db", "repositories", *FILES]
    lines = [json.dumps({"severity": "INFO", "message": f"Dumping {h} ... done"})
             for h in [{"db": "database", "lfs": "lfs objects", "terraform_state": "terraform states",
                        "ci_secure_files": "ci secure files"}.get(c, c) for c in done]]
    lines += [json.dumps({"severity": "INFO", "message": "Dumping container registry images ... [DISABLED]"})
              for _ in disabled]
    lines += [f"2024-05-29 17:00:00 UTC -- Dumping {s} ... [SKIPPED]" for s in skipped]
    lines.append(json.dumps({"severity": "INFO", "message": "Backup 1717000000_2024_05_29_17.0.1-ee is done."}))
    return parse_backup_log(lines)


def test_a_disabled_registry_verifies_as_gitlab_reports_it():
    log = _log()
    assert log.disabled == ["registry"] and log.backup_id == "1717000000_2024_05_29_17.0.1-ee"
    check = check_archive(_members(), INFO.format(skipped=""), "17.0.1-ee", log)
    assert check.ok, check.problems
    assert check.disabled == ["registry"] and check.skipped == [] and "registry" not in check.components
    # without GitLab's log (no backup_json.log), a missing registry is noted, not failed
    fallback = check_archive(_members(), INFO.format(skipped=""), "17.0.1-ee")
    assert fallback.ok and "registry" in fallback.notes[0]


def test_a_gitlab_without_repositories_verifies_but_a_dumped_component_must_be_there():
    assert check_archive(_members(repos=False), INFO.format(skipped=""), "17.0.1-ee", _log()).ok
    members = [m for m in _members() if m[0] != "packages.tar.gz"]
    bad = check_archive(members, INFO.format(skipped=""), "17.0.1-ee", _log())
    assert not bad.ok and bad.problems == ["components GitLab's backup log reports as dumped are missing from the "
                                           "archive: packages"]
    # a manifest's components at restore time are the other declaration
    assert not check_archive(members, INFO.format(skipped=""), None, expected=["db", "packages"]).ok
    skipped = check_archive(members, INFO.format(skipped="packages"), None, expected=["db", "packages"])
    assert skipped.ok and skipped.skipped == ["packages"]


def test_gitlab_ctl_status_and_the_checks_that_exit_0():
    status = parse_ctl_status("run: gitaly: (pid 1) 5s; run: log: (pid 2) 5s\n"
                              "down: puma: 3s, normally up; run: log: (pid 3) 9s\n"
                              "run: sidekiq: (pid 4) 5s; run: log: (pid 5) 5s\n")
    assert status == {"gitaly": "run", "puma": "down", "sidekiq": "run"}
    assert services_still_up(status) == ["sidekiq"]
    assert services_still_up({"puma": "down"}) == []  # sidekiq disabled: not listed, not running
    check = ("Secrets file present and valid? ... yes\nSidekiq: ... Running? ... no\n  Try fixing it:\n"
             "Please fix the error above and rerun the checks.")
    assert check_failures(check) == ["Sidekiq: ... Running? ... no"]
    assert check_failures(check, allowed=("Sidekiq",)) == []
    assert check_failures("Checking GitLab App ... Finished") == []
    ok = "I, [x]  INFO -- : - Ci::Variable failures: 0\nI, [x]  INFO -- : Total: 0 row(s) affected\nDone!"
    assert doctor_secrets_failures(ok) == []
    assert doctor_secrets_failures(ok.replace("failures: 0", "failures: 3")) == ["Ci::Variable: 3 rows cannot be "
                                                                                 "decrypted"]
    assert doctor_secrets_failures("Checking encrypted values") == ["gitlab:doctor:secrets did not finish (no "
                                                                    "'Done!')"]


PROD_RB = """external_url 'https://gitlab.example.com'
gitlab_rails['smtp_enable'] = true
gitlab_rails['smtp_address'] = 'smtp.example.com'
gitlab_rails['backup_keep_time'] = 604800 # a week
# gitlab_rails['backup_keep_time'] = 1
"""


def test_backup_keep_time_is_read_and_warned_about():
    assert gitlab_rb_setting(PROD_RB, "gitlab_rails", "backup_keep_time") == "604800"
    assert gitlab_rb_setting(PROD_RB, "gitlab_rails", "smtp_address") == "smtp.example.com"
    assert "deletes local archives that retention keeps" in keep_time_warning(86400, keep_days=5)
    assert "even when no newer verified backup exists" in keep_time_warning(30 * 86400, keep_days=5)
    assert keep_time_warning(0, keep_days=5) is None


def test_drill_overlay_gives_scratch_its_own_identity_and_is_replaced_each_drill():
    scratch_rb = "external_url 'https://drill.example.com'\nnginx['listen_port'] = 8080\n"
    once = apply_drill_overlay(scratch_rb, DrillOverlay("https://drill.example.com"))
    twice = apply_drill_overlay(once, DrillOverlay("https://drill.example.com"))
    assert once == twice and once.count("BEGIN ai-platform-ops") == 1
    assert "nginx['listen_port'] = 8080" in once  # scratch's own settings are kept
    for key in ("smtp_enable", "incoming_email_enabled", "gitlab_email_enabled"):
        assert gitlab_rb_setting(once, "gitlab_rails", key) == "false"
    assert gitlab_rb_setting(once, "sidekiq", "enable") == "false"
    assert "gitlab_rails['object_store']['enabled'] = false" in once
    bucket = apply_drill_overlay(scratch_rb, DrillOverlay("https://drill.example.com", "drill-objects"))
    assert "['artifacts']['bucket'] = 'drill-objects'" in bucket
    with pytest.raises(ValueError):
        apply_drill_overlay(scratch_rb, DrillOverlay("https://x'; system('id')"))


def _files(**kw):
    base = {"role": "data", "name": "a_gitlab_backup.tar", "present": True, "matches": True, "offsite": True}
    return [HostFile(**{**base, **kw})]


def test_restore_refusals_are_decided_by_facts_not_by_text():
    ok = dict(ready=True, installed_version="17.0.1", installed_edition="ee", backup_version="17.0.1-ee",
              files=_files(), has_secrets=True, free_bytes=10, needed_bytes=5)
    assert restore_refusals(**ok) == []
    assert "not ready" in restore_refusals(**{**ok, "ready": False})[0]
    # a host a failed restore left with puma and sidekiq stopped can be restored (the way back); not one without
    # its database
    assert restore_refusals(**{**ok, "ready": False, "down": ["puma", "sidekiq"]}) == []
    assert "down: postgresql, puma" in restore_refusals(**{**ok, "ready": False, "down": ["postgresql", "puma"]})[0]
    assert "version is unknown" in restore_refusals(**{**ok, "installed_version": None})[0]
    assert "only restores onto the same version" in restore_refusals(**{**ok, "installed_version": "17.0.2"})[0]
    assert "no gitlab-secrets.json" in restore_refusals(**{**ok, "has_secrets": False})[0]
    assert "neither on the host nor off-site" in restore_refusals(
        **{**ok, "files": _files(present=False, matches=None, offsite=False)})[0]
    assert "does not match" in restore_refusals(**{**ok, "files": _files(matches=False)})[0]
    assert restore_refusals(**{**ok, "files": _files(present=False, matches=None)}) == []  # fetched from off-site
    assert "not enough free space" in restore_refusals(**{**ok, "free_bytes": 1})[0]


def test_backup_log_counts_progress_from_gitlab_output():
    log = _log(done=["db"], disabled=())
    assert isinstance(log, BackupLog) and log.finished_components == 1 and not log.archive_started


def test_the_installed_version_is_read_from_gitlab_env_info_while_the_api_is_down():
    info = ("System information\nSystem:\t\tUbuntu 22.04\nRuby Version:\t3.1.5p253\n\n"
            "GitLab information\nVersion:\t17.0.1-ee\nRevision:\t6f3a0b1c2d4\n\nGitLab Shell\nVersion:\t14.35.0\n")
    assert parse_env_info(info) == "17.0.1-ee"
    assert parse_env_info(info.replace("17.0.1-ee", "17.0.1")) == "17.0.1"
    assert parse_env_info("System information\nVersion:\t14.35.0\n") is None  # not GitLab's own version
    assert parse_env_info("rake aborted!\nPG::ConnectionBad") is None
