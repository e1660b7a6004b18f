"""Create or update, by name, the automations in a YAML file (deployments/automations.yaml), so running it
again after an edit leaves one copy of each. With PREFECT_API_URL set:
    python infra/apply_automations.py deployments/automations.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml


def apply_automations(path: Path) -> list[str]:
    """Validate every automation in `path` first (nothing is applied if one is wrong), then create the new
    ones and update those whose name exists; returns a line per automation."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    automations = [AutomationCore.model_validate(spec) for spec in yaml.safe_load(path.read_text())["automations"]]
    done = []
    with get_client(sync_client=True) as client:
        for automation in automations:
            existing = client.read_automations_by_name(automation.name)
            for extra in existing[1:]:  # copies left by `prefect automation create`
                client.delete_automation(extra.id)
            if existing:
                client.update_automation(existing[0].id, automation)
                done.append(f"updated {automation.name} ({existing[0].id})")
            else:
                done.append(f"created {automation.name} ({client.create_automation(automation)})")
    return done


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print("\n".join(apply_automations(Path(sys.argv[1]))))
