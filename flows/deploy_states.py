"""What `loom deploy` keeps of the deployments already on the server: whether each is paused and
whether each of its schedules is active.

`prefect deploy --all` writes every deployment as prefect.yaml says: not paused, its schedules as
the template sets them (the nightlies': active with a model registry). A deployment paused in the
UI, or a nightly schedule switched off during an incident (or on, without a registry), would be
switched back by every deploy — a retrain on the GPU pool at 01:00 that someone had stopped. So
`loom deploy` saves these switches before (`python -m flows.deploy_states save FILE`) and puts them
back after (`… restore FILE`), saying what it kept. A deployment is the same one when its id is
(`prefect deploy` updates a deployment in place); a schedule when its cron and timezone are. A new
deployment or schedule takes prefect.yaml's setting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List


def _schedule_key(s) -> str:
    inner = s.schedule
    return json.dumps({"cron": getattr(inner, "cron", None), "interval": str(getattr(inner, "interval", None)),
                       "rrule": getattr(inner, "rrule", None), "timezone": getattr(inner, "timezone", None)},
                      sort_keys=True)


def save() -> Dict[str, dict]:
    """{deployment id: {"name", "paused", "schedules": {schedule key: active}}} of the server at
    PREFECT_API_URL."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {str(d.id): {"name": d.name, "paused": bool(d.paused),
                            "schedules": {_schedule_key(s): bool(s.active) for s in d.schedules or []}}
                for d in client.read_deployments()}


def restore(saved: Dict[str, dict]) -> List[str]:
    """Put back what `save` saw where the deploy changed it; returns what was kept, a line each."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    done = []
    with get_client(sync_client=True) as client:
        for deployment_id, before in saved.items():
            try:
                now = client.read_deployment(deployment_id)
            except ObjectNotFound:  # deleted meanwhile
                continue
            for s in now.schedules or []:
                active = before["schedules"].get(_schedule_key(s))
                if active is not None and active != bool(s.active):
                    client.update_deployment_schedule(now.id, s.id, active=active)
                    done.append(f"{now.name}: its schedule kept {'active' if active else 'paused'}, as it was on the "
                                f"server (prefect.yaml would make it {'active' if s.active else 'paused'})")
            if before["paused"] and not now.paused:
                client.pause_deployment(now.id)
                done.append(f"{now.name}: kept paused, as it was on the server (resume it in the UI)")
    return done


def main(argv: List[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "restore"):
        print("usage: python -m flows.deploy_states save|restore FILE", file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "save":
        path.write_text(json.dumps(save(), indent=1, sort_keys=True))
        return 0
    for line in restore(json.loads(path.read_text())):
        print(f"deploy: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
