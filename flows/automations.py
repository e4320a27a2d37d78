"""The Prefect automations of the pipeline, created or updated (by name) by `loom deploy`, which
runs `python -m flows.automations` after `prefect deploy --all`.

Unresponsive runs. A flow run whose process is killed outright — the OOM killer's SIGKILL, a
GPU node lost, a worker machine rebooted — reports no final state: the UI shows it Running for
good, and a `pipeline` or nightly run left so holds its deployment's concurrency slot (limit 1),
so every later run of it waits in the queue behind a dead one. The deployments' runs send a
heartbeat event every HEARTBEAT_S seconds (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` in prefect.yaml's
job variables; the stage runs that `dvc repro` starts inherit it), and this automation marks a run
Crashed when no heartbeat or final state follows its last heartbeat within MISSED_AFTER_S — the
remedy of Prefect's guide "How to detect and respond to zombie flows".
"""

from __future__ import annotations

import sys
from typing import List

HEARTBEAT_S = 60  # prefect.yaml's PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's minimum is 30)
MISSED_AFTER_S = 300  # five heartbeats missed: a run busy in a long step still beats (a thread of its own)
UNRESPONSIVE = "loomvideo: mark unresponsive runs crashed"


def unresponsive_runs(missed_after_s: float = MISSED_AFTER_S, name: str = UNRESPONSIVE):
    """The automation (a Prefect `AutomationCore`): a flow run that sent a heartbeat and then,
    for `missed_after_s` seconds, neither another one nor a final state, is set Crashed."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=name,
        description=f"A flow run whose heartbeats (every {HEARTBEAT_S} s) stopped for {missed_after_s:g} s without a "
                    "final state: its process was killed (OOM, a lost node). Marked Crashed, which frees its "
                    "deployment's concurrency slot. Created by `loom deploy` (flows/automations.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=missed_after_s,
        ),
        actions=[ChangeFlowRunState(
            state="CRASHED",
            message=f"no heartbeat for {missed_after_s:g} s: the run's process is gone (killed, or its machine lost)")],
    )


def ensure(automations) -> List[str]:
    """Create each automation on the server at PREFECT_API_URL, or update the one of its name
    (so that `loom deploy` run twice leaves one). Returns what was done, a line each."""
    from prefect.client.orchestration import get_client

    done = []
    with get_client(sync_client=True) as client:
        for automation in automations:
            existing = client.read_automations_by_name(name=automation.name)
            if existing:
                client.update_automation(automation_id=existing[0].id, automation=automation)
                for extra in existing[1:]:  # (left by an older create; one is enough)
                    client.delete_automation(extra.id)
                done.append(f"automation {automation.name!r}: updated")
            else:
                client.create_automation(automation=automation)
                done.append(f"automation {automation.name!r}: created")
    return done


def main() -> int:
    for line in ensure([unresponsive_runs()]):
        print(f"deploy: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
