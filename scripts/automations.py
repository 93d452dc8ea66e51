"""The project's Prefect automations as code: configs/prefect/automations.yaml, applied by name.

    python -m scripts.automations apply --platform sandbox [--set zombie_within_s=120] [--file F]
    python -m scripts.automations show  --platform sandbox      # the automations as they would be sent

`apply` creates each automation, or updates the one of the same name (so running it again changes
nothing), against the server PREFECT_API_URL names. A `notify` action becomes Prefect's
`send-notification` with the platform's webhook block `custom-webhook/<platform>` (`python -m blocks.load`
makes it); without that block `apply` stops and says so. Automations named `ai-platform-ops/...` that
the file no longer lists are deleted, so the server holds exactly the file's set.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FILE = REPO / "configs" / "prefect" / "automations.yaml"
PREFIX = "ai-platform-ops/"
_SETTING = re.compile(r"\$\{([a-z_][a-z0-9_]*)\}")


class AutomationsError(Exception):
    """The automations file, a setting or the server's state is not what `apply` needs."""


def load_file(path: Path = DEFAULT_FILE, overrides: dict[str, str] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """(settings, automations) from the file, settings overridden and `${name}` references resolved."""
    doc = yaml.safe_load(path.read_text())
    settings = dict(doc.get("settings") or {})
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise AutomationsError(f"unknown setting {key!r}: the file's settings are {sorted(settings)}")
        settings[key] = yaml.safe_load(value)
    if settings.get("zombie_within_s", 1) <= settings.get("heartbeat_s", 0):
        raise AutomationsError(f"zombie_within_s ({settings['zombie_within_s']}) must exceed heartbeat_s "
                               f"({settings['heartbeat_s']}): a healthy run would be marked Crashed")

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if isinstance(node, str):
            whole = _SETTING.fullmatch(node)
            if whole:
                return _setting(settings, whole.group(1))
            return _SETTING.sub(lambda m: str(_setting(settings, m.group(1))), node)
        return node

    automations = resolve(doc.get("automations") or [])
    for a in automations:
        if not str(a.get("name", "")).startswith(PREFIX):
            raise AutomationsError(f"automation {a.get('name')!r}: names start with {PREFIX!r} (apply owns those)")
    return settings, automations


def _setting(settings: dict[str, Any], name: str) -> Any:
    if name not in settings:
        raise AutomationsError(f"${{{name}}} is not a setting of the file (settings: {sorted(settings)})")
    return settings[name]


def build(automations: list[dict], notifier_id: str | None) -> list[Any]:
    """Prefect `AutomationCore` models, `notify` actions turned into `send-notification` with the block id."""
    from prefect.events.schemas.automations import AutomationCore

    out = []
    for spec in automations:
        actions = []
        for action in spec.get("actions", []):
            if action.get("type") == "notify":
                if notifier_id is None:
                    raise AutomationsError(f"{spec['name']} notifies, but the platform has no webhook block: set "
                                           "notifications.webhook_url in platform.yaml and run python -m blocks.load")
                action = {"type": "send-notification", "block_document_id": notifier_id,
                          "subject": action.get("subject", "Prefect automated notification"), "body": action["body"]}
            actions.append(action)
        out.append(AutomationCore.model_validate({**spec, "actions": actions}))
    return out


async def _notifier_id(client: Any, platform: str) -> str | None:
    from prefect.exceptions import ObjectNotFound

    try:
        doc = await client.read_block_document_by_name(name=platform, block_type_slug="custom-webhook")
    except ObjectNotFound:
        return None
    return str(doc.id)


async def apply(platform: str, path: Path = DEFAULT_FILE, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Create or update every automation of the file; delete `ai-platform-ops/` ones it no longer lists.
    Returns {name: "created" | "updated" | "unchanged" | "deleted"}."""
    from prefect.client.orchestration import get_client

    _, specs = load_file(path, overrides)
    result: dict[str, str] = {}
    async with get_client() as client:
        wanted = build(specs, await _notifier_id(client, platform))
        existing = {a.name: a for a in await client.read_automations() if a.name.startswith(PREFIX)}
        for automation in wanted:
            current = existing.pop(automation.name, None)
            if current is None:
                await client.create_automation(automation)
                result[automation.name] = "created"
            elif _same(current, automation):
                result[automation.name] = "unchanged"
            else:
                await client.update_automation(current.id, automation)
                result[automation.name] = "updated"
        for name, stale in existing.items():
            await client.delete_automation(stale.id)
            result[name] = "deleted"
    return result


def _same(current: Any, wanted: Any) -> bool:
    """Equal as the server keeps them: the trigger's id aside; sets (expect, after) compared as sets."""
    fields = set(type(wanted).model_fields)
    return (current.model_dump(include=fields, exclude={"trigger": {"id"}})
            == wanted.model_dump(include=fields, exclude={"trigger": {"id"}}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.automations", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["apply", "show"])
    parser.add_argument("--platform", required=True, help="the platform's name (its webhook block: custom-webhook/NAME)")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a setting")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        if args.command == "show":
            _, specs = load_file(args.file, overrides)
            for automation in build(specs, "00000000-0000-0000-0000-000000000000"):
                print(automation.model_dump_json(indent=2))
            return 0
        for name, outcome in asyncio.run(apply(args.platform, args.file, overrides)).items():
            print(f"{outcome:9} {name}")
    except AutomationsError as exc:
        print(f"automations: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
