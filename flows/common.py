"""The stage pattern: every DVC stage's `cmd` is `python -m flows.<stage> [--profile P] [k=v …]`
(`python -m flows.train <stage> …` for the three training stages, one module), which runs that
stage's Prefect flow. This module gives each flow the same command line, the
config of a checkout (`repo_config`), and the deployments' pull step (`enter_checkout`)."""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from prefect import Flow, flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Failed
from prefect.utilities.hashing import file_hash

from loomcore.checkout_lock import PIPELINE_RUN_ENV, pipeline_tag
from loomcore.errors import InputError
from tasks.common import PARENT_TASK_RUN_ENV
from tasks.dvc import pipeline_lock


def stage_main(flows: Callable | Mapping[str, Callable], description: str, argv: list[str] | None = None,
               switches: Mapping[str, tuple[str, str]] | None = None) -> int:
    """Parse `--profile` and `key=value` overrides (and the stage, when the module runs several
    stages' flows: `flows` a {stage: flow} mapping), run the flow, exit non-zero on failure.
    `switches`: {"--flag": (the override it stands for, help)}."""
    many = isinstance(flows, Mapping)
    module = next(iter(flows.values())).__module__ if many else flows.__module__
    if module == "__main__":  # run as `python -m flows.x`: its module name, not "__main__"
        module = getattr(sys.modules["__main__"].__spec__, "name", module)
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if many:
        p.add_argument("stage", choices=list(flows), help="the stage to run")
    p.add_argument("--profile", default=None, help="profile (default: params.yaml's 'profile')")
    for flag, (override, text) in (switches or {}).items():
        p.add_argument(flag, action="append_const", const=override, dest="switched", help=f"{text} (= {override})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on top of params.yaml, e.g. seed=1 "
                   "(`loom config <section>` shows the keys and their values)")
    args = p.parse_intermixed_args(argv)  # `stage1 --profile tiny k=v`: overrides after an option too
    flow_fn = flows[args.stage] if many else flows
    from loomcore.config import REPO_ROOT, load_config
    from loomcore.errors import Repeats
    from tasks.proc import REPEATS_EXIT, StageTimeout

    overrides = args.overrides + (getattr(args, "switched", None) or [])
    here, root = Path.cwd().resolve(), REPO_ROOT.resolve()
    # its params name folders relative to the checkout: from outputs/, outputs/models/…, or from a folder
    # outside any checkout (no dvc.yaml: DVC runs a stage where its dvc.yaml is), they would land there
    if root in here.parents or (here != root and not (here / "dvc.yaml").is_file()):
        print(f"{module}: run it from the checkout's root ({root}), as DVC does: the paths in its params.yaml "
              f"are relative to it (here, {here}, models/ and data/ would be written under this folder)", file=sys.stderr)
        return 2
    try:  # a config it refuses: one line, before a Prefect server starts and a run records the traceback
        load_config(overrides, profile=args.profile)
    except InputError as e:
        print(f"{module}: {e}", file=sys.stderr)
        return 2
    try:
        run_stage_flow(flow_fn, profile=args.profile, overrides=overrides)
    except InputError as e:  # a config or input it refuses: the same again (a store's errors are retried:
        # botocore classes some throttling as a refusal)
        print(f"{module}: {e}", file=sys.stderr)
        return 2
    except (StageTimeout, Repeats) as e:  # its own time limit, a diverged training, NaN output: a retry repeats it
        print(f"{module}: {e}", file=sys.stderr)
        return REPEATS_EXIT
    return 0


STAGE_ARGS = """    profile: the profile, `tiny` or `paper` (default: params.yaml's `profile`).
    overrides: config overrides on top of it, `key=value` each (`loom config <section>` shows the keys)."""


def stage_flow(name: str) -> Callable[[Callable], Flow]:
    """`@flow(name=name, log_prints=True)` for a stage's flow, which

    - holds the checkout's pipeline lock when its deployment started it (the UI, the API), as
      `loom pipeline` and the pipeline and nightly flows do: a stage run from the UI while one of
      those, or a user's `dvc repro`, works in the same checkout would otherwise write the outs that
      run reads or writes (on the paper profile curate, base-models and export are on the CPU pool,
      beside the GPU pool's pipeline). It fails at once, naming the holder or the running `dvc`.
      Started any other way — by DVC, by hand (often with outs of its own: `eval.out_dir=…`), as
      nightly-eval's subflow — it takes none;
    - names its runs after the stage, however started (a deployment's run, by hand, under DVC), and
      labels a deployment's run as run_stage_flow labels the others (tags, the profile it runs);
    - reports its own module's hash as its version, as a plain `@flow` does (Prefect hashes the
      file of the function it wraps: here that would be this file's lock wrapper);
    - fails on a refused config (checked before its tasks run), or an input its flow refuses
      (loomcore.errors.InputError), with its message in one line as the command line prints it, not
      with a traceback through our code in the run's log (a deployment's process still logs
      Prefect's own few frames as it exits; an input a task without retries refuses, Prefect logs
      with the task's traceback); the caller still gets the InputError (stage_main: exit 2);
    - documents `profile` and `overrides` in its docstring's Args (STAGE_ARGS): the deployment's
      description and run form in the UI show them."""

    def decorate(flow_fn: Callable) -> Flow:
        doc = inspect.cleandoc(flow_fn.__doc__ or "")  # the UI's description and its parameters' help
        flow_fn.__doc__ = doc + ("\n" if "\nArgs:\n" in doc else "\n\nArgs:\n") + STAGE_ARGS

        @functools.wraps(flow_fn)
        def run(*args, **kwargs):
            from loomcore.config import load_config

            takes = inspect.signature(flow_fn)
            given = takes.bind(*args, **kwargs).arguments
            ctx = FlowRunContext.get()
            deployed = ctx is not None and ctx.flow_run is not None and ctx.flow_run.deployment_id is not None
            try:
                if deployed:  # the server made this run with the deployment's tags and parameters
                    # (`profile: null`): labelled as a run through DVC is (run_stage_flow), a refused one too
                    profile = run_profile(given.get("profile"), given.get("overrides") or ())
                    if profile and "profile" in takes.parameters:
                        given["profile"] = profile
                    label_this_run(run_labels(f"stage:{name}", profile), profile=profile)
                # a config it refuses, here: in a task without retries Prefect logs it with a traceback
                load_config(list(given.get("overrides") or ()), profile=given.get("profile"))
                if not deployed:
                    return flow_fn(*args, **kwargs)
                with pipeline_lock(Path.cwd(), dvc_running_is_busy=True):
                    return flow_fn(**given)
            except InputError as e:  # the run's final state: calling the flow raises `e` again (without
                # our frames: a deployment's process logs the exception it raises as it exits)
                get_run_logger().error("%s: %s", type(e).__name__, e)
                return Failed(message=f"{type(e).__name__}: {e}", data=e.with_traceback(None))

        return flow(name=name, flow_run_name=name, log_prints=True, version=file_hash(inspect.getsourcefile(flow_fn)))(run)

    return decorate


def run_stage_flow(flow_fn: Callable, **parameters):
    """Call a stage's flow. Started by DVC under the pipeline flow (PARENT_TASK_RUN_ENV holds the id of the
    pipeline's `dvc repro <stage>` task run), its flow run is created as a child of that task run —
    what Prefect does for a subflow called in-process — named after the stage and tagged, so the UI
    shows one run tree; otherwise (`make pipeline`'s stages, a stage by hand) a top-level flow run,
    named and tagged the same way. Both are tagged with the checkout they ran in — a UI showing
    several checkouts' runs (a team's server) tells them apart — and with the profile they run,
    which their parameters name too (the UI's Parameters tab used to say `profile: null` for
    "params.yaml's")."""
    parent = os.environ.get(PARENT_TASK_RUN_ENV)
    profile = run_profile(parameters.get("profile"), parameters.get("overrides") or ())
    if profile and "profile" in parameters:
        parameters["profile"] = profile
    labels = run_labels(f"stage:{flow_fn.name}", profile)
    if os.environ.get(PIPELINE_RUN_ENV):  # under `loom pipeline`
        labels.append(pipeline_tag(os.environ[PIPELINE_RUN_ENV]))
    if not parent:
        from prefect import tags

        with tags(*labels):
            return flow_fn(**parameters)
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(flow_fn, name=flow_fn.name, parameters=parameters, parent_task_run_id=UUID(parent),
                                     tags=[*labels, "pipeline"])
    return run_flow(flow_fn, flow_run=run, parameters=parameters)


def run_labels(kind: str, profile: str | None, root: Path | str = ".") -> list[str]:
    """A run's tags: `loomvideo`, what it runs (`stage:<name>`, `pipeline`, `nightly`), the
    profile and the checkout — a UI showing several checkouts' runs (a team's server) tells them apart."""
    return ["loomvideo", kind, *([f"profile:{profile}"] if profile else []), f"checkout:{Path(root).resolve()}"]


def label_this_run(tags: Sequence[str], **parameters) -> None:
    """Add `tags` to the running flow run and record `parameters` (those not None) in its Parameters
    tab: a deployment's run is made by the server, with the deployment's tags and defaults, before
    the flow knows its checkout or which profile `null` means."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    from prefect.client.orchestration import get_client

    given = {k: v for k, v in parameters.items() if v is not None and k in (ctx.flow_run.parameters or {})}
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, tags=list(dict.fromkeys([*ctx.flow_run.tags, *tags])),
                               parameters={**ctx.flow_run.parameters, **given} if given else None)


def run_profile(profile: str | None, overrides: Sequence[str], root: Path | str = ".") -> str | None:
    """The profile a run uses, as load_config picks it: `--profile`, else the last `profile=`
    override, else params.yaml's (`dvc exp run -S profile=paper` writes it there); None when none
    says, or params.yaml cannot be read (load_config then names what is missing or wrong)."""
    from loomcore.config import named_profiles, params_profile

    chosen = named_profiles(overrides)  # (as experiment_sets reads them: `params.yaml:profile=` too)
    if profile or chosen:
        return profile or chosen[-1]
    return params_profile(Path(root) / "params.yaml")


def repo_config(repo: str | Path = ".", overrides: Sequence[str] = (), profile: str | None = None,
                composed: bool = False):
    """The composed config of the checkout at `repo` (its params.yaml + conf/), as its stages see it
    (`composed`: as a DVC experiment composes it, conf/ for params.yaml's profile — load_config)."""
    from loomcore.config import load_config

    root = Path(repo)
    return load_config(list(overrides), profile=profile, params_path=root / "params.yaml", conf_dir=root / "conf",
                       composed=composed)


def params_drift(repo: str | Path = ".") -> list[str]:
    """Where the checkout's params.yaml differs from conf/'s composition for its profile (`loom
    params profile=<its profile>`), one "key = value (conf/: value)" each: what an earlier `dvc exp
    run -S …` / `loom pipeline k=v` left in the workspace, or `loom params k=v` wrote. A run without
    overrides reproduces params.yaml as it is, so the pipeline and the nightlies say so. [] when
    they agree (or there is no conf/)."""
    import yaml

    from loomcore.config import params_yaml

    root = Path(repo)
    if not (root / "conf").is_dir() or not (root / "params.yaml").is_file():
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    have = flat(yaml.safe_load((root / "params.yaml").read_text()))
    profile = [f"profile={have['profile']}"] if have.get("profile") else []  # `loom params profile=paper` is no drift
    want = flat(yaml.safe_load(params_yaml(root / "conf", profile)))
    return [f"{k} = {have.get(k, '(absent)')} (conf/: {want.get(k, '(absent)')})"
            for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]


def enter_checkout(directory: str) -> dict:
    """prefect.yaml's pull step: run the flow in the checkout `directory` (LOOM_REPO). Prefect renders
    an unset `{{ $LOOM_REPO }}` as an empty string; say so instead of failing in os.chdir('')."""
    if not directory:
        raise ValueError("LOOM_REPO is not set: set it, in the worker's environment (or where `prefect deploy` "
                         "runs), to the loomvideo checkout the flows run in (the folder with dvc.yaml)")
    root = Path(directory).expanduser().resolve()
    if not (root / "dvc.yaml").is_file():
        raise ValueError(f"LOOM_REPO={directory}: no dvc.yaml there; expected the loomvideo checkout")
    os.chdir(root)
    return {"directory": str(root)}
