"""What `loom deploy` keeps of the deployments already on the server: whether each is paused and
whether each of its schedules is active.

`prefect deploy --all` writes every deployment as prefect.yaml says: not paused, its schedules as
the template sets them (the nightlies': active with a model registry). A deployment paused in the
UI, or a nightly schedule switched off during an incident (or on, without a registry), would be
switched back by every deploy — a retrain on the GPU pool at 01:00 that someone had stopped. So
`loom deploy` saves these switches before (`python -m flows.deploy_states save FILE`) and puts them
back after (`… restore FILE`), saying what it kept. A deployment is the same one when its id is
(`prefect deploy` updates a deployment in place); a schedule when its cron and timezone are. A new
deployment or schedule takes prefect.yaml's setting — and so do the nightly schedules when that
setting itself changed since the last `loom deploy` (a model registry configured or removed: the
Prefect variable NIGHTLY_VARIABLE remembers what the last deploy applied).

Prefect's scheduler may have read a deployment in the moment between the deploy and the restore:
a run it creates then survives the restore's deletion of auto-scheduled runs. So what is kept
paused is paused again after one scheduler loop (which deletes such runs again).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

NIGHTLIES = ("nightly-retrain", "nightly-eval")  # their schedules' `active` is "{{ $LOOM_NIGHTLY_ACTIVE }}" (prefect.yaml)
NIGHTLY_VARIABLE = "loomvideo_nightly_active"  # the LOOM_NIGHTLY_ACTIVE the last `loom deploy` applied
SCHEDULER_LOOP_S = 6.0  # Prefect's scheduler looks at recently updated deployments every 5 s


def _schedule_key(s) -> str:
    inner = s.schedule
    return json.dumps({"cron": getattr(inner, "cron", None), "interval": str(getattr(inner, "interval", None)),
                       "rrule": getattr(inner, "rrule", None), "timezone": getattr(inner, "timezone", None)},
                      sort_keys=True)


def save() -> dict:
    """{"deployments": {deployment id: {"name", "paused", "schedules": {schedule key: active}}},
    "nightly_active": what the last `loom deploy` applied (None: unknown)} of the server at
    PREFECT_API_URL."""
    from prefect.client.orchestration import get_client
    from prefect.variables import Variable

    deployments: Dict[str, dict] = {}
    with get_client(sync_client=True) as client:
        while True:  # (the server answers at most 200 a call)
            page = client.read_deployments(offset=len(deployments), limit=200)
            deployments.update({str(d.id): {"name": d.name, "paused": bool(d.paused),
                                            "schedules": {_schedule_key(s): bool(s.active) for s in d.schedules or []}}
                                for d in page})
            if len(page) < 200:
                break
    return {"deployments": deployments, "nightly_active": Variable.get(NIGHTLY_VARIABLE, default=None)}


def restore(saved: dict, nightly_active: Optional[str] = None, deployed: bool = True) -> List[str]:
    """Put back what `save` saw where the deploy changed it; returns what was kept, a line each.
    `nightly_active`: the LOOM_NIGHTLY_ACTIVE this deploy applied, remembered for the next — only
    when it `deployed` (a deploy that failed before it reached the nightlies applied nothing: had
    the value been remembered, the next deploy would not see the registry's change and keep the
    nightlies' old schedules for good)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.variables import Variable

    switched = saved.get("nightly_active") not in (None, nightly_active)  # a registry came or went
    done, again = [], []
    with get_client(sync_client=True) as client:
        for deployment_id, before in saved["deployments"].items():
            try:
                now = client.read_deployment(deployment_id)
            except ObjectNotFound:  # deleted meanwhile
                continue
            for s in now.schedules or []:
                active = before["schedules"].get(_schedule_key(s))
                if switched and now.name in NIGHTLIES:
                    done.append(f"{now.name}: its schedule {'active' if s.active else 'paused'}, as prefect.yaml says "
                                "(the model registry changed since the last deploy)")
                elif active is not None and active != bool(s.active):
                    client.update_deployment_schedule(now.id, s.id, active=active, parameters=s.parameters)
                    done.append(f"{now.name}: its schedule kept {'active' if active else 'paused'}, as it was on the "
                                f"server (prefect.yaml would make it {'active' if s.active else 'paused'})")
                    if not active:
                        again.append(lambda d=now.id, i=s.id, p=s.parameters: client.update_deployment_schedule(
                            d, i, active=False, parameters=p))
            if before["paused"] and not now.paused:
                client.pause_deployment(now.id)
                done.append(f"{now.name}: kept paused, as it was on the server (resume it in the UI)")
                again.append(lambda d=now.id: client.pause_deployment(d))
        if again:  # runs the scheduler made from what it read between the deploy and the restore
            time.sleep(SCHEDULER_LOOP_S)
            for call in again:
                call()
    if nightly_active is not None and deployed:
        Variable.set(NIGHTLY_VARIABLE, nightly_active, overwrite=True)
    return done


USAGE = "usage: python -m flows.deploy_states save FILE | restore FILE [--deploy-failed]"


def main(argv: List[str]) -> int:
    if not (argv[:1] == ["save"] and len(argv) == 2 or argv[:1] == ["restore"] and len(argv) == 2
            or argv[:1] == ["restore"] and argv[2:] == ["--deploy-failed"]):
        print(USAGE, file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "save":
        path.write_text(json.dumps(save(), indent=1, sort_keys=True))
        return 0
    for line in restore(json.loads(path.read_text()), os.environ.get("LOOM_NIGHTLY_ACTIVE"),
                        deployed="--deploy-failed" not in argv):
        print(f"deploy: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
