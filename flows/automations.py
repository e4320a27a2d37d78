"""The Prefect automations of the pipeline, created or updated (by name) by `loom deploy`, which
runs `python -m flows.automations` after `prefect deploy --all`.

Unresponsive runs. A flow run whose process is killed outright — the OOM killer's SIGKILL, a
GPU node lost, a worker machine rebooted — reports no final state: the UI shows it Running for
good, and a work pool counts Running runs against its concurrency limit, so a dead run on the
paper profile's GPU pool (limit 1) would queue every later GPU run behind it. (A deployment's own
concurrency slot is a lease that the server frees when the process stops renewing it.) Every flow
run sends a heartbeat event, every HEARTBEAT_S seconds by Prefect's default
(`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`), from a thread of its own, so a run busy in a long step still
beats; this automation marks a run Crashed when no further event of it follows a heartbeat within
MISSED_AFTER_S — the remedy of Prefect's guide "How to detect and respond to zombie flows". It
watches every flow run on the server (a stage run by hand too). Crashed does not stop a process: a
run cut off from the server for longer than that, yet alive, is marked Crashed all the same.
"""

from __future__ import annotations

import sys
from typing import List

HEARTBEAT_S = 180  # Prefect's default PREFECT_FLOWS_HEARTBEAT_FREQUENCY (3.9; its minimum is 30)
MISSED_AFTER_S = 600  # more than three heartbeats missed: a late one on a loaded machine is not a dead run
UNRESPONSIVE = "loomvideo: mark unresponsive runs crashed"


def unresponsive_runs(missed_after_s: float = MISSED_AFTER_S, name: str = UNRESPONSIVE):
    """The automation (a Prefect `AutomationCore`): a flow run that sent a heartbeat and then,
    for `missed_after_s` seconds, neither another one nor a final state, is set Crashed."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=name,
        description=f"A flow run whose heartbeats (every {HEARTBEAT_S} s by default) stopped for {missed_after_s:g} s "
                    "without a final state: its process was killed (OOM, a lost node). Marked Crashed, so that it "
                    "no longer counts against its work pool's concurrency limit. Created by `loom deploy` "
                    "(flows/automations.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},  # another heartbeat, or any state change: a final one included
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
                # (the update keeps `enabled` as it is: one switched off in the UI stays off, and is named so)
                client.update_automation(automation_id=existing[0].id, automation=automation)
                for extra in existing[1:]:  # (left by an older create; one is enough)
                    client.delete_automation(extra.id)
                done.append(f"automation {automation.name!r}: updated"
                            + ("" if existing[0].enabled else " (left disabled, as it was switched off)"))
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
