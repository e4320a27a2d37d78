"""`loom`: the command line of the LoomVideo pipeline.

Every subcommand reads the same config (params.yaml, composed from conf/ by `loom params` or by
`dvc exp run -S`, + key=value overrides) and calls into loomcore; heavy imports happen inside the
subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from loomcore.errors import InputError

OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.]*=")  # a key=value override (Hydra's +key=, ~key= too)

PIPELINE_STAGES = ("curate", "cache", "stage1", "stage2", "stage3", "rl", "evaluate", "export")

EPILOG = """examples:
  loom config                              # the composed tiny-profile config, as YAML
  loom config --profile paper stage3       # one section of the paper profile
  loom config stage1.steps=10 --check      # validate an override without printing
  loom params                              # write params.yaml again after editing conf/ (its profile kept)
  loom params --check                      # exit 1 if params.yaml is not conf/'s composition
  loom init-models --profile tiny          # build the tiny base models under models/tiny/
  loom init-models --profile paper         # check the real Wan2.2 / Qwen3-VL folders are complete
  loom import-release checkpoints/LoomVideo out/ --profile paper   # the authors' checkpoint → safetensors
  loom pipeline                            # run the whole DAG on the tiny profile (dvc repro)
  loom pipeline stage3.steps=300           # the DAG as an experiment (dvc exp run -S stage3.steps=300)
  loom deploy                              # prefect deploy --all with the profile's work pools
  loom plan --profile paper --gpus 4 8 16  # the GPU memory a training rank needs (FSDP2)
  loom node stage1 --node-rank 1 --profile paper orchestration.rdzv_endpoint=10.0.0.5:29400   # each other node of a multi-node stage
"""


def _add_config_args(p: argparse.ArgumentParser, params: bool = True) -> None:
    """--profile, --params (`params`: False where the command refuses any but the checkout's — kept
    for its one-line refusal, left out of its help) and the key=value overrides."""
    p.add_argument("--profile", help="profile name (conf/profile/<name>.yaml); default: params.yaml's 'profile' "
                   "(another profile is composed from conf/)")
    p.add_argument("--params", default=None,
                   help="params file (default: params.yaml at the repo root)" if params else argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stage1.steps=100")


def _params_path(args) -> Path:
    """params.yaml of the checkout the command runs in (`_run_in_checkout`; else this package's), or --params."""
    from loomcore.config import DEFAULT_PARAMS

    root = getattr(args, "checkout", None)
    return Path(args.params) if args.params else root / "params.yaml" if root else DEFAULT_PARAMS


def _load(args, composed: bool = False) -> "object":
    """_params_path + --profile and the overrides (`composed`: conf/'s composition for the profile,
    as a DVC experiment composes it, not params.yaml's values)."""
    from loomcore.config import DEFAULT_CONF_DIR, load_config

    root = getattr(args, "checkout", None)
    return load_config(args.overrides, profile=args.profile, params_path=_params_path(args), composed=composed,
                       conf_dir=root / "conf" if root and (root / "conf").is_dir() else DEFAULT_CONF_DIR)


def cmd_config(args) -> int:
    import yaml

    from loomcore.config import ConfigError

    section = None
    if args.overrides and "=" not in args.overrides[0]:
        section, args.overrides = args.overrides[0], args.overrides[1:]
    cfg = _load(args)
    d = cfg.to_dict()
    if section and section not in d:  # (with --check too: `stage1.steps 10 --check` is no check of 10)
        raise ConfigError(f"no section {section!r}; sections: {', '.join(d)}")
    if args.check:
        print(f"config OK (profile {cfg.profile}; {' + '.join(cfg.sources)}; fingerprint {cfg.fingerprint()})")
        return 0
    if section:
        d = {section: d[section]}
    sys.stdout.write(yaml.safe_dump(d, sort_keys=False, width=110))
    return 0


def cmd_params(args) -> int:
    from loomcore.config import (
        DEFAULT_CONF_DIR, DEFAULT_PARAMS, ConfigError, compose, load_config, named_profiles, params_profile, params_yaml,
    )

    root = getattr(args, "checkout", None)  # the checkout the command runs in (_run_in_checkout)
    if root and not (root / "conf").is_dir() and not (args.conf and args.out):  # another DVC project's folder
        raise ConfigError(f"{root} has dvc.yaml and params.yaml but no conf/: not a loomvideo checkout (its "
                          "params.yaml is not this composition's to write); give --conf and --out")
    out = Path(args.out) if args.out else (root / "params.yaml" if root else DEFAULT_PARAMS)
    conf = args.conf or (root / "conf" if root else DEFAULT_CONF_DIR)
    old = _generated_file(out, args.check, "params.yaml")
    bad = [o for o in args.overrides if not OVERRIDE.match(o)]
    if bad:  # (Hydra's own message for `=3` is a traceback)
        raise ConfigError(f"override {bad[0]!r}: expected key=value (e.g. stage1.steps=10)")
    overrides = list(args.overrides)
    if old is not None and not named_profiles(overrides):
        # composed (and checked) for its own profile: after `loom params profile=paper`, an edit of conf/
        # written again with `loom params` stays paper (it went back to conf/config.yaml's tiny)
        own = params_profile(out)  # (None where it does not parse: it differs, whatever the composition)
        overrides = ([f"profile={own}"] if own else []) + overrides
    # each override named with its reason, as `loom config` and `loom pipeline` name it (Hydra's own
    # error, cut to its first line, said "Could not override 'stage1.stepz'." and no why)
    def checked(keys: List[str]):
        named = named_profiles(keys)
        return load_config([k for k in keys if not named_profiles([k])], conf_dir=conf, composed=True,
                           profile=named[-1] if named else compose(conf)["profile"], params_path=DEFAULT_PARAMS)

    check_dvc_sets(overrides, checked)
    text = params_yaml(conf, overrides)
    with tempfile.TemporaryDirectory() as d:  # the composition must be a whole, valid config
        (Path(d) / "params.yaml").write_text(text)
        try:
            cfg = load_config(params_path=Path(d) / "params.yaml")
        except ConfigError as e:  # named as the user wrote it, not by the temporary file
            where = f"{conf}{''.join(' + ' + o for o in overrides)}"
            raise ConfigError(str(e).replace(str(Path(d) / "params.yaml"), where)) from None
    if args.check:
        if old == text:
            print(f"{out}: up to date with {conf} (profile {cfg.profile})")
            return 0
        again = [*(["--conf", args.conf] if args.conf else []), *(["--out", args.out] if args.out else []), *overrides]
        print(f"{out}: differs from the composition of {conf}"
              f"{' with ' + ' '.join(overrides) if overrides else ''}: run `loom params{''.join(' ' + a for a in again)}`",
              file=sys.stderr)
        return 1
    if old == text:
        print(f"{out}: unchanged (profile {cfg.profile})")
        return 0
    _replace_text(out, text)
    print(f"{out}: written (profile {cfg.profile}, fingerprint {cfg.fingerprint()})")
    return 0


def _generated_file(out: Path, check: bool, name: str) -> Optional[str]:
    """The file a generating command (`params`, `plots-template`) writes, or only checks: refused
    if a folder, or — when it will be written — if its folder cannot be made; its text now (None:
    absent; a file that is not text reads as text that differs)."""
    if out.is_dir():
        raise InputError(f"--out {out}: a folder; give the file to write ({name})")
    if not check:  # (a check writes nothing: a read-only checkout is checked as well)
        _check_folder_for(out.parent, f"--out {out}")
    return out.read_bytes().decode("utf-8", "replace") if out.is_file() else None


def _replace_text(out: Path, text: str) -> None:
    """Write a generated file whole or not at all (a temp file renamed over it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf8")
    os.replace(tmp, out)


def cmd_plots_template(args) -> int:
    from loomcore.config import REPO_ROOT
    from loomcore.plots_template import TEMPLATE_PATH, render_template

    out = Path(args.out) if args.out else (getattr(args, "checkout", None) or REPO_ROOT) / TEMPLATE_PATH
    old = _generated_file(out, args.check, "offline.html")
    text = render_template()
    if args.check:
        if old == text:
            print(f"{out}: up to date with the installed vl-convert-python")
            return 0
        print(f"{out}: {'missing' if old is None else 'differs from what the installed vl-convert-python builds'}: "
              f"run `loom plots-template{' --out ' + args.out if args.out else ''}`", file=sys.stderr)
        return 1
    if old != text:
        _replace_text(out, text)
    print(f"{out}: {'unchanged' if old == text else 'written'} ({len(text) // 1024} KiB)")
    return 0


def _refuse_unread(overrides: Sequence[str], read: Sequence[str], command: str, why: str = "") -> None:
    """Refuse an override of a key `command` does not read (`read`: keys or sections): accepted, it
    would change nothing and say nothing."""
    from loomcore.config import ConfigError

    key = lambda o: o.split("=", 1)[0].strip()  # noqa: E731
    ignored = [o for o in overrides if not any(key(o) == k or key(o).startswith(k + ".") for k in read)]
    if ignored:
        raise ConfigError(f"override {ignored[0]!r}: {command} reads only {', '.join(read)}{why}")


def cmd_init_models(args) -> int:
    from loomcore.codegraph import stage_params
    from loomcore.models.base_models import check_later_models, check_paper_models, init_models

    # the base_models stage's params, where it writes, S3, the later stages' model folders it checks
    # (stage1.steps=100 was accepted and changed nothing)
    _refuse_unread(args.overrides, (*stage_params("base_models"), "paths.models", "s3", "eval.vbench", "eval.judge",
                                    "rl.reward", "rl.pickscore"), "init-models")
    cfg = _load(args)
    if cfg.models.codec == "wan" and cfg.profile == "paper":
        failed = False
        for what, problems in (("the base models are", check_paper_models(cfg)),
                               ("the models evaluation and RL read are", check_later_models(cfg))):
            if problems:
                failed = True
                print(f"init-models (profile {cfg.profile}): {what} incomplete:", file=sys.stderr)
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
        if failed:
            return 1
        print(f"init-models (profile {cfg.profile}): OK — every configured model folder is complete (base models, "
              "VBench backbones, judge, reward)")
        return 0
    report = init_models(cfg, force=args.force)
    for name, info in report.items():
        print(f"  {name}: {info}")
    return 0


IMPORT_KEYS = ("profile", "dit", "mllm", "rope", "flow", "s3")  # what import-release reads (models.release.loomdit_kwargs)
PLAN_KEYS = ("profile", "dit", "mllm", "rope", "flow", "models.mllm", "train", "stage1", "stage2", "stage3")  # loom plan's


def cmd_import_release(args) -> int:
    from loomcore.models.release import import_release
    from loomcore.storage import S3Settings, is_s3, materialize

    _refuse_unread(args.overrides, IMPORT_KEYS, "loom import-release", " (the DiT's config and the store's)")
    cfg = _load(args)
    out_dir = Path(args.out_dir)
    try:
        _check_folder_for(out_dir, f"out_dir {out_dir}")  # e.g. out.safetensors given for the folder
        with _s3_errors(args.checkpoint):
            source = materialize(args.checkpoint, settings=S3Settings.from_config(cfg.s3)) if is_s3(args.checkpoint) \
                else Path(args.checkpoint)
        out = import_release(source, out_dir, cfg, weights=args.weights)
    except InputError as e:  # the file or folder given: a user's mistake, told in one line (exit 2)
        print(f"loom import-release: {e}", file=sys.stderr)
        return 2
    print(f"import-release: wrote {out_dir}: {out}")
    return 0


def _dvc_stages() -> List[str]:
    import yaml

    from loomcore.config import ConfigError

    path = Path("dvc.yaml")
    if not path.is_file():
        return []
    try:
        dag = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.resolve()}: not valid YAML ({' '.join(str(e).split())})") from None
    return list((dag.get("stages", {}) if isinstance(dag, dict) else {}) or {})


def check_dvc_sets(overrides: Sequence[str], compose: Callable[[List[str]], object]) -> object:
    """Check `dvc exp run -S` values as DVC applies them, through `compose` (the config composed
    with key=value overrides; a ConfigError names a bad one, as the user wrote it); returns what it
    returns. DVC composes `params.yaml:`-prefixed and bare values with Hydra (`++key=`, set or add,
    read here as `key=`). Refused, each a run that would fail or differ from what loom reports:
    `+key=` (DVC refuses to add a key that exists, and every valid key exists), `++profile=` (Hydra
    cannot force-add a config group), `~key` (the stages would read a params.yaml without it),
    another file's key (the DAG reads params.yaml alone), `./params.yaml:` (DVC edits the file in
    place then, outside Hydra, and its Hydra composition of params.yaml, which follows, drops the
    edit unless a Hydra override came first), a sweep `key=a,b` (one run has one value; DVC refuses
    it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from loomcore.config import ConfigError

    def as_written(call, *args):
        try:
            return call(*args)
        except ConfigError as e:  # named as the user wrote it
            message = str(e)
            for key, override in given.items():
                message = message.replace(repr(key), repr(override))
            raise ConfigError(message) from None

    parser = OverridesParser.create()
    keys, given = [], {}
    for override in overrides:
        body = re.sub(r"^params\.yaml:", "", override)
        key = body[2:] if body.startswith("++") else body[1:] if body.startswith("+") else body
        given[key] = override
        why = None
        if body.startswith("./params.yaml:"):
            why = f"DVC edits ./params.yaml in place, outside Hydra's composition: give {body[2:]!r}"
        elif re.match(r"^[\w./-]+\.\w+:", body):
            why = "the DAG reads params.yaml alone"
        elif body.startswith("~"):
            why = "a key deleted from params.yaml fails every stage that reads it"
        elif body.startswith("++profile="):
            why = f"Hydra cannot force-add the config group profile: give {body[2:]!r}"
        elif body.startswith("+") and not body.startswith("++"):
            as_written(compose, [key])  # (an unknown key: named as such)
            why = f"`+` adds a key, and {key.split('=', 1)[0]} exists (DVC refuses it): give {key!r}"
        else:
            try:
                sweep = parser.parse_overrides([key])[0].is_sweep_override()
            except HydraException as e:
                why = f"not a Hydra override DVC can apply ({' '.join(str(e).split())})"
                name, _, value = key.lstrip("+~").partition("=")  # (`params.yaml:` is off already)
                *parents, child = name.split(".")
                if parents and child[:1].isdigit() and not any(p[:1].isdigit() for p in parents):
                    parent = ".".join(parents)  # video.frames.480p=5: give the mapping it is in, whole
                    why = (f"Hydra's keys cannot begin with a digit ({child!r}): give {parent} whole, its other "
                           f"entries as they are, e.g. '{parent}={{{child}: {value}, …}}' (`loom config "
                           f"{parents[0]}` shows them)")
            else:
                why = "a sweep: one run takes one value (quote a value that holds a comma)" if sweep else None
        if why:
            raise ConfigError(f"override {override!r}: {why}")
        keys.append(key)
    return as_written(compose, keys)


def _dvc_target_stage(target: str) -> Optional[str]:
    """The stage a `dvc repro` target names: `NAME` or `[./]dvc.yaml:NAME`; None for the whole
    `[./]dvc.yaml`."""
    if target in ("dvc.yaml", "./dvc.yaml"):
        return None
    return re.sub(r"^(\./)?dvc\.yaml:", "", target)


def pipeline_command(sets: List[str], targets: List[str]) -> List[str]:
    """`dvc repro`, or — with `-S` values (config.experiment_sets: overrides, the profile named) — a
    DVC experiment: DVC composes conf/ and them into params.yaml (Hydra), so what runs is what
    `dvc exp show` / `dvc params diff` report."""
    if sets:
        return ["dvc", "exp", "run", *(a for o in sets for a in ("-S", o)), *targets]
    return ["dvc", "repro", *targets]


DEPLOY_KEYS = ("profile", "orchestration.cpu_pool", "orchestration.gpu_pool", "export.s3_uri")  # what deploy reads


def cmd_deploy(args) -> int:
    """`prefect deploy --all` from this checkout, prefect.yaml's pools filled from the profile
    (orchestration.cpu_pool / gpu_pool) and LOOM_REPO defaulting to the checkout."""
    import shutil

    _refuse_unread(args.overrides, DEPLOY_KEYS, "loom deploy", "; the deployed runs read the checkout's params.yaml "
                   "(`loom params k=v` changes it) or the overrides a run is given in the UI")
    cfg = _load(args)
    here = Path.cwd()
    if not (here / "prefect.yaml").is_file():
        print(f"loom deploy: no prefect.yaml in {here}: run it from the checkout", file=sys.stderr)
        return 2
    from loomcore.local_server import ServerStartError, configured_api

    try:  # the environment's, else the active Prefect profile's (`prefect config set PREFECT_API_URL=…`)
        api = configured_api(os.environ)
    except ServerStartError as e:
        print(f"loom deploy: {e}", file=sys.stderr)
        return 2
    if not api:
        print("loom deploy: PREFECT_API_URL is not set (in the environment or Prefect's profile): export the URL of "
              "the Prefect server the workers talk to (e.g. http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    if not _reachable(api["PREFECT_API_URL"]):
        print(f"loom deploy: nothing answers at PREFECT_API_URL={api['PREFECT_API_URL']}: start the server "
              "(`prefect server start`) or export its URL", file=sys.stderr)
        return 1
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    pools = {"LOOM_CPU_POOL": cfg.orchestration.cpu_pool, "LOOM_GPU_POOL": cfg.orchestration.gpu_pool}
    nightly = bool(cfg.export.s3_uri)  # nightly-eval evaluates the registry's `latest`: none without one
    env = {**os.environ, **api, **pools, "LOOM_REPO": os.environ.get("LOOM_REPO") or str(here),
           "LOOM_NIGHTLY_ACTIVE": "true" if nightly else "false"}
    missing = [p for p in dict.fromkeys(pools.values())
               if subprocess.run([prefect, "work-pool", "inspect", p], env=env, capture_output=True).returncode]
    if missing:
        print(f"loom deploy: no work pool {', '.join(missing)} on {env['PREFECT_API_URL']}; create "
              f"{'it' if len(missing) == 1 else 'them'} first: "
              + "; ".join(f"prefect work-pool create {p} --type process" for p in missing), file=sys.stderr)
        return 2
    print(f"deploy: profile {cfg.profile}: CPU deployments on pool {pools['LOOM_CPU_POOL']}, GPU deployments on "
          f"pool {pools['LOOM_GPU_POOL']}; runs in {env['LOOM_REPO']}", flush=True)
    from loomcore.config import load_config

    params = Path(env["LOOM_REPO"]) / "params.yaml"  # what the deployed runs read
    checkout_profile = load_config(params_path=params).profile if params.is_file() else None
    if checkout_profile and checkout_profile != cfg.profile:
        print(f"deploy: note: the runs read {params} (profile {checkout_profile}), not profile {cfg.profile}: run "
              f"`loom params profile={cfg.profile}` first, or give each run the override profile={cfg.profile}",
              flush=True)
    print(f"deploy: nightly-retrain and nightly-eval schedules active (model registry {cfg.export.s3_uri})" if nightly
          else "deploy: nightly-retrain and nightly-eval deployed with their schedules paused: no model registry "
          "(export.s3_uri is null), so nightly-eval has no `latest` to evaluate; resume them in the UI", flush=True)
    # the server's pause switches and schedule states, kept across `prefect deploy` (flows/deploy_states.py);
    # put back also when the deploy fails part-way (the deployments it reached were reset)
    tmp = Path(tempfile.mkdtemp(prefix="loom-deploy-"))
    states = tmp / "states.json"
    rc = subprocess.run([sys.executable, "-m", "flows.deploy_states", "save", str(states)], cwd=here, env=env).returncode
    if rc == 0:
        rc = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], cwd=here, env=env).returncode
        restored = subprocess.run([sys.executable, "-m", "flows.deploy_states", "restore", str(states),
                                   *(["--deploy-failed"] if rc else [])], cwd=here, env=env).returncode
        if restored:
            print(f"loom deploy: the deployments' pause and schedule states before this deploy are kept in {states}; "
                  f"put them back with `python -m flows.deploy_states restore {states}`", file=sys.stderr)
            return restored
    shutil.rmtree(tmp, ignore_errors=True)
    if rc:
        return rc
    # the automation that marks runs whose heartbeats stopped Crashed (flows/automations.py: the
    # model package stays free of prefect imports, so it runs as the flows' module)
    return subprocess.run([sys.executable, "-m", "flows.automations"], cwd=here, env=env).returncode


def _reachable(api_url: str, timeout: float = 10.0) -> bool:
    """Something answers HTTP at `api_url` (any status: a server that wants credentials answers too)."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):  # (not HTTP: no answer)
        return False
    return True


# `loom plan`'s largest pack: 2²⁴ tokens (the paper profile packs 16,384) traced in ~1.3 GB of host
# memory; a mistyped 10⁹ grew past 14 GB before answering
PLAN_MAX_TOKENS = 1 << 24


def cmd_plan(args) -> int:
    """The per-rank memory plan of the training stages (loomcore/train/memory.py)."""
    from loomcore.train.memory import GPU_MEMORY_GIB, plan_stage, plan_table

    _refuse_unread(args.overrides, PLAN_KEYS, "loom plan")
    cfg = _load(args)
    bad = [g for g in args.gpu if g not in GPU_MEMORY_GIB]
    if bad:
        print(f"loom plan: unknown GPU {', '.join(bad)}; known: {', '.join(GPU_MEMORY_GIB)}", file=sys.stderr)
        return 2
    if any(n < 1 for n in args.gpus):
        print(f"loom plan: --gpus {args.gpus}: each count must be >= 1", file=sys.stderr)
        return 2
    if args.context < 1:
        print(f"loom plan: --context {args.context}: expected >= 1 (MLLM tokens per sample)", file=sys.stderr)
        return 2
    for stage in args.stage:  # the plan traces one pack's forward: its host memory grows with the tokens
        if cfg.stage(stage).max_tokens > PLAN_MAX_TOKENS:
            print(f"loom plan: {stage}.max_tokens = {cfg.stage(stage).max_tokens:,}: more than the plan traces "
                  f"({PLAN_MAX_TOKENS:,} tokens a pack, ~1.3 GB of host memory; its activations alone would fill "
                  "a hundred 96 GB GPUs)", file=sys.stderr)
            return 2
    cache: dict = {}
    plans = [plan_stage(cfg, stage, n, gpu, None if args.checkpointing is None else args.checkpointing == "on",
                        args.context, cache)
             for stage in args.stage for gpu in args.gpu for n in args.gpus]
    p = cache["params"]
    print(f"plan: profile {cfg.profile}; DiT {p['trainable'] / 1e9:.3f}B trainable + {p['frozen'] / 1e6:.1f}M frozen "
          f"parameters; {cfg.dit.num_layers} blocks; MLLM features {cfg.mllm.feature_mode}"
          + (f" ({cache['mllm'][0] / 1e9:.2f}B parameters: {cache['mllm'][1]})" if "mllm" in cache else "")
          + f"; {args.context} context tokens per pack\n")
    print(plan_table(plans))
    return 0


def cmd_node(args) -> int:
    """Join a multi-node stage from a node other than the first (loomcore/train/launch.py)."""
    import shlex

    from loomcore.train.launch import check_rendezvous, stage_command, stage_nodes

    if args.params:
        print("loom node: --params: the ranks read the checkout's params.yaml; pass key=value overrides instead",
              file=sys.stderr)
        return 2
    cfg = _load(args)
    nodes, procs = stage_nodes(cfg, args.stage)
    try:
        if nodes < 2:
            raise InputError(f"{args.stage} runs on one node (its nodes = 1): there is no run to join")
        check_rendezvous(cfg, args.stage)
    except InputError as e:
        print(f"loom node: {e}", file=sys.stderr)
        return 2
    if not 1 <= args.node_rank < nodes:
        print(f"loom node: --node-rank {args.node_rank}: expected 1 … {nodes - 1} for a {nodes}-node {args.stage} "
              f"(0 is the first node's, where DVC or the Prefect deployment runs the stage)", file=sys.stderr)
        return 2
    cmd = stage_command(cfg, args.stage, args.overrides, node_rank=args.node_rank)
    print(f"node: joining {args.stage} ({nodes} nodes × {procs} process(es)) at {cfg.orchestration.rdzv_endpoint}: "
          f"{shlex.join(cmd)}", flush=True)
    return subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode


def _dvc_ended(rc: int) -> str:
    """How DVC's process ended, for a message: its exit code, or the signal that killed it."""
    return f"DVC was killed by {signal.Signals(-rc).name}" if rc < 0 else f"DVC exited with {rc}"


class StoppedBySignal(Exception):
    """`loom pipeline` was sent SIGINT, SIGTERM, SIGHUP or SIGQUIT; `code` is the shell's 128 + signal."""

    def __init__(self, signum: int, detail: str = ""):
        self.code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}{detail}")


class _SignalledRun:
    """Runs one command in a session of its own and passes the signals `loom pipeline` gets on to
    its whole process group (`stopped_by_signals`). The handler only records and forwards: what
    raises is the code it interrupts, at points where nothing is half started."""

    GRACE_S = 60.0  # from the first signal: the stage stops its torchrun (tasks.proc), DVC records the failure

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.signals: List[int] = []
        self.deadline: Optional[float] = None
        self.below: List[tuple] = []  # (pid, start time) below the group in sessions of their own: torchrun, ranks
        self.stopping_left = False  # stop_what_is_left is stopping what DVC, killed, left

    def on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        if self.proc is None:  # the Prefect server's start-up: `stop_requested` ends it
            return
        if self.deadline is None:
            self._first_signal()
        elif self.stopping_left and len(self.signals) == 1:
            pass  # (already stopping what a killed DVC left, as the first signal would: the next one kills)
        else:
            self._kill_all()

    def on_pause(self, signum, frame) -> None:
        """Ctrl-Z: the terminal's SIGTSTP reaches loom alone (DVC's session is not the terminal's).
        DVC's group and what is below it get SIGSTOP — a group in a session of its own is orphaned,
        and the kernel drops a SIGTSTP sent there — then loom stops itself as it would have; `fg` or
        `bg` continues loom here, and loom continues them. Paused time does not count towards the
        grace after a stop signal."""
        from loomcore.processes import kill_if_alive, outside_descendants

        below = []
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGSTOP)
            below = list(dict.fromkeys(self.below + outside_descendants(self.proc.pid)))
            kill_if_alive(below, signal.SIGSTOP)
        paused, deadline_before = time.monotonic(), self.deadline
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        try:
            os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until SIGCONT
        finally:
            signal.signal(signal.SIGTSTP, self.on_pause)
            if deadline_before is not None:  # (not one set by a signal handled as loom continued: SIGHUP, `kill %1`)
                self.deadline += time.monotonic() - paused
            if self.proc is not None:
                kill_if_alive(below, signal.SIGCONT)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGCONT)

    def stop_requested(self) -> bool:
        return bool(self.signals)

    def _first_signal(self) -> None:
        from loomcore.processes import outside_descendants

        if self.deadline is not None:  # (a signal while the process was being made: passed on once)
            return
        self.deadline = time.monotonic() + self.GRACE_S
        self.below = outside_descendants(self.proc.pid)  # found now, while they are still below the group
        try:  # SIGINT whatever loom got: DVC stops cleanly on it (it waits for the stage, which stops its torchrun)
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        with contextlib.suppress(Exception):  # last, and never raising: a closed terminal, a `| tee` Ctrl-C killed
            print(f"loom pipeline: {signal.Signals(self.signals[0]).name}: stopping the DAG (passed on to DVC and the "
                  f"running stage; up to {self.GRACE_S:.0f} s, a second signal stops it at once)", file=sys.stderr,
                  flush=True)

    def _kill_all(self) -> None:
        from loomcore.processes import kill_if_alive, outside_descendants

        below = list(dict.fromkeys(self.below + outside_descendants(self.proc.pid)))
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_if_alive(below)

    def stop_what_is_left(self) -> bool:
        """After the command died of a signal that did not come through loom (DVC killed by the OOM
        killer, a `kill -9`): the rest of its group — the stage it ran — and what is below it run on,
        unsupervised, and no lock record would name them once loom exits. They are stopped as a stop
        signal would stop them: SIGINT to the group, SIGKILL to what is left GRACE_S after. True if
        anything was left."""
        from loomcore.processes import outside_descendants

        if not self._alive():
            return False
        self.below = list(dict.fromkeys(self.below + outside_descendants(self.proc.pid)))
        if self.deadline is None:  # (else a signal's stop is under way: its SIGINT sent, its deadline kept)
            self.stopping_left, self.deadline = True, time.monotonic() + self.GRACE_S
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
        while self._alive() and time.monotonic() < self.deadline:
            time.sleep(0.2)
        if self._alive():
            self._kill_all()
        return True

    def _alive(self) -> bool:
        from loomcore.processes import group_members, still_running  # (zombies do not count: an init may not reap)

        return bool(group_members(self.proc.pid) or still_running(self.below))

    def run(self, cmd: List[str], env, on_start: Callable[[int], None] = lambda pgid: None) -> int:
        """The command's exit code; StoppedBySignal once it and everything below it ended after a
        signal (SIGKILL to what is left GRACE_S after the first). `on_start(pgid)`: its group, as
        it starts."""
        if self.signals:
            raise StoppedBySignal(self.signals[0], " before the DAG started")
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        on_start(self.proc.pid)
        if self.signals:  # one that came while the process was being made
            self._first_signal()
        while True:
            try:
                rc = self.proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._kill_all()
        if not self.signals:
            return rc
        while self._alive() and time.monotonic() < self.deadline:  # DVC may end first: its stage goes on stopping
            time.sleep(0.2)
        left = self._alive()
        if left:
            self._kill_all()
        raise StoppedBySignal(self.signals[0], f"; {_dvc_ended(rc)}"
                              + (f", what was left killed {self.GRACE_S:.0f} s after the signal" if left else ""))


@contextlib.contextmanager
def stopped_by_signals():
    """A `_SignalledRun` whose command stops with `loom pipeline`. DVC runs in a session of its own,
    so a signal sent to loom alone — `kill`, `timeout`, a closed terminal, a service manager's stop
    — used to end loom at once (SIGTERM's default) and leave DVC, the stage and the Prefect server
    running; now loom passes SIGINT, SIGTERM, SIGHUP and SIGQUIT (Ctrl-\\) on to DVC's group (as SIGINT, which DVC
    handles by waiting for the stage), waits for it and what it started below, then stops the
    server. A terminal's Ctrl-C, which reached DVC and the stage directly before, reaches them
    through loom. SIGHUP that loom was started ignoring (`nohup`) stays ignored, by DVC too. SIGINT or
    SIGTERM started ignored (a script's `loom pipeline &`) stays ignored by loom, but not by DVC and
    the stage — the signal loom passes on is a SIGINT — : a handler that does nothing is reset to the
    default across exec, where an ignored signal stays ignored. Ctrl-Z (SIGTSTP) pauses DVC's group
    and what is below it with loom, `fg`/`bg` continues them (`_SignalledRun.on_pause`)."""
    run = _SignalledRun()
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        ignored = signal.getsignal(s) is signal.SIG_IGN
        if not (ignored and s == signal.SIGHUP):
            previous[s] = signal.signal(s, (lambda *_: None) if ignored else run.on_signal)
    if signal.getsignal(signal.SIGTSTP) is not signal.SIG_IGN:
        previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, run.on_pause)
    try:
        yield run
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _crash_runs_a_killed_pipeline_left(api_url: str, previous: Optional[dict], env) -> None:
    """A `loom pipeline` killed outright (its lock's record left behind) left its stages' flow runs
    Running in Prefect for good: mark them Crashed (loomcore.local_server.crash_runs_left)."""
    import http.client

    from loomcore.checkout_lock import pipeline_tag
    from loomcore.local_server import crash_runs_left

    if not previous or previous.get("what") != "loom pipeline" or not previous.get("run_id"):
        return
    why = (f"its `loom pipeline` (pid {previous['pid']} on {previous.get('host', '?')}, since "
           f"{previous.get('since', '?')}) was killed; marked by the next one on the checkout")
    try:
        names = crash_runs_left(api_url, [f"checkout:{Path.cwd()}", pipeline_tag(previous["run_id"])], why, env)
    except (OSError, ValueError, http.client.HTTPException) as e:  # bookkeeping: the run goes on
        print(f"pipeline: could not mark the runs the killed loom pipeline left as Crashed: {e}", file=sys.stderr)
        return
    if names:
        print(f"pipeline: marked Crashed the {len(names)} run(s) the killed loom pipeline left running: "
              f"{', '.join(names)}", file=sys.stderr, flush=True)


def cmd_pipeline(args) -> int:
    if args.params:  # DVC runs the checkout's params.yaml (composed again with the overrides)
        print("loom pipeline: --params: DVC runs the checkout's params.yaml; pass key=value overrides (a DVC "
              "experiment) or --profile instead", file=sys.stderr)
        return 2
    # a bad key or value refused before DVC starts, the overrides read as DVC's -S reads them; an
    # experiment checked as DVC composes it: conf/ for the profile named, not params.yaml's values
    from loomcore.config import experiment_sets

    sets = experiment_sets(args.profile, args.overrides, _params_path(args)) if args.overrides or args.profile else []
    cfg = check_dvc_sets(sets, lambda keys: _load(argparse.Namespace(**{**vars(args), "overrides": keys, "profile": None}),
                                                  composed=bool(sets)))
    from loomcore.rl.rewards import reward_class

    reward_class(cfg.rl.reward)  # a registry others extend (not config.py's to check): a typo here, not after stage 3
    print(f"pipeline: profile {cfg.profile} (config {cfg.fingerprint()})")
    stages = _dvc_stages()
    missing = [s for s in PIPELINE_STAGES if s not in stages]
    unknown = [t for t in args.targets or [] if _dvc_target_stage(t) not in [None, *stages]]
    if unknown:  # before a Prefect server starts for it
        print(f"loom pipeline: --target {', '.join(unknown)}: no such stage in dvc.yaml; stages: {', '.join(stages) or '(none)'}",
              file=sys.stderr)
        return 2
    if stages and not Path(".dvc").is_dir():
        print(f"loom pipeline: {Path.cwd()} has dvc.yaml but no .dvc/: not a DVC repository (`dvc init` makes one)",
              file=sys.stderr)
        return 2
    if not stages:
        print("pipeline: dvc.yaml has no stages yet; the config checked, nothing to run.")
    else:
        cmd = pipeline_command(sets, args.targets or [])
        print(f"pipeline: {' '.join(cmd)}", flush=True)
        from loomcore.checkout_lock import PIPELINE_RUN_ENV, PipelineBusy, checkout_lock, holder_info
        from loomcore.local_server import ServerStartError, ServerStartStopped, prefect_server

        env = dict(os.environ)  # stage cmds run `python -m flows.…`: this environment's python
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        rc = None
        try:  # the checkout's lock, as the pipeline and nightly flows and a stage's own run hold it
            with checkout_lock(Path.cwd(), holder_info("loom pipeline"),
                               warn=lambda m: print(f"pipeline: {m}", file=sys.stderr, flush=True)) as lock, \
                    stopped_by_signals() as dvc:
                env[PIPELINE_RUN_ENV] = lock.info["run_id"]  # its stages' runs are tagged with it (flows.common)
                try:  # one server for every stage (loomcore.local_server)
                    with prefect_server(env, stop_requested=dvc.stop_requested, on_start=lock.add_group,
                                        on_stop=lock.remove_group) as run_env:
                        _crash_runs_a_killed_pipeline_left(run_env["PREFECT_API_URL"], lock.previous, run_env)
                        rc = dvc.run(cmd, run_env, on_start=lock.add_group)
                        stage_left = rc < 0 and dvc.stop_what_is_left()  # (reporting to the server still)
                except ServerStartStopped:
                    raise StoppedBySignal(dvc.signals[0], " before the DAG started") from None
                if dvc.signals:  # one that came after DVC had ended, while the server stopped
                    raise StoppedBySignal(dvc.signals[0], f"; {_dvc_ended(rc)}"
                                          + ("; the stage it was running, stopped" if stage_left else ""))
        except (ServerStartError, PipelineBusy) as e:
            print(f"loom pipeline: {e}", file=sys.stderr)
            return 1
        except StoppedBySignal as e:
            print(f"loom pipeline: {e}", file=sys.stderr)
            return e.code
        except KeyboardInterrupt:  # Ctrl-C outside loom's own handler: while it took the checkout, stopping
            # what a killed run left there (its record stays: the next run stops the rest), or while
            # it released the checkout after DVC had ended (DVC's result stands)
            if rc is None:
                print("loom pipeline: stopped by SIGINT while taking the checkout; nothing of the DAG ran",
                      file=sys.stderr)
                return 128 + signal.SIGINT
        if rc < 0:  # DVC killed by a signal that did not come through loom (the OOM killer, a kill -9)
            print(f"loom pipeline: {_dvc_ended(rc)}"
                  + ("; the stage it was running, stopped" if stage_left else ""), file=sys.stderr)
            return 128 - rc
        if rc:
            return rc
    if missing:
        print(f"pipeline: stages not built yet (open issues): {', '.join(missing)}")
    return 0


GENERATE_EPILOG = """examples (the profile's base models; --transformer DIR for a trained DiT, --model DIR for an
exported pipeline; in.mp4, in.png, a.png, b.png stand for your files — after `make pipeline` the
tiny profile's Shapes data has some: data/raw/samples/<id>/source.mp4, source.png, ref1.png):
  text to video           loom generate --prompt "a red circle moves left" --out t2v.mp4
  text to image           loom generate --prompt "a red circle" --frames 1 --out t2i.png
  edit a video            loom generate --source in.mp4 --prompt "make the circle blue" --out tv2v.mp4
  edit an image           loom generate --source in.png --prompt "make the circle blue" --out ti2i.png
  edit with a reference   loom generate --source in.mp4 --ref a.png --prompt "paint the circle like @Figure 1" --out tvr2v.mp4
  … an image              loom generate --source in.png --ref a.png --prompt "replace the circle with the shape in @Figure 1" --out tir2i.png
  images to video         loom generate --ref a.png --ref b.png --prompt "@Figure 1 chases @Figure 2" --out mi2v.mp4
  images to image         loom generate --ref a.png --ref b.png --frames 1 --prompt "@Figure 1 beside @Figure 2" --out mi2i.png
  reconstruct a video     loom generate --source in.mp4 --out recon.mp4
  reconstruct an image    loom generate --source in.png --out recon.png
  four seeds in a batch   loom generate --prompt "a red circle" --frames 1 --num-outputs 4 --out seeds.png
  a file of prompts       loom generate --prompts prompts.txt --frames 1 --out prompts.png
  a trained DiT           loom generate --transformer outputs/stage3/model --prompt "a blue square" --out stage3.mp4
  an exported pipeline    loom generate --model outputs/export/model --prompt "a blue square" --out export.mp4

--num-outputs 4 writes seeds-0.png … seeds-3.png (seeds 0–3), each the image --seed <that seed> alone gives
(to within one 8-bit level). --prompts writes prompts-1.png, prompts-2.png … (prompts-1-0.png … with --num-outputs),
one per prompt of the file, each what --prompt with that line gives; every prompt is checked first.
The task is inferred from the inputs (--task to name it). Sizes and frame counts are checked
against the model before anything runs: bad input exits with status 2 and says what the model takes.
On a GPU that does not hold the paper profile's MLLM and DiT together, add --cpu-offload.
"""


def _check_generate_size(cfg, args) -> None:
    """--height / --width / --frames against the profile's codec and patch before any model loads
    (the pipeline checks them again, and what a source or reference implies, once it has one)."""
    from loomcore.pipeline.inputs import Geometry

    given = [(f"--{k}", v) for k, v in (("height", args.height), ("width", args.width), ("frames", args.frames)) if v]
    geo = Geometry(cfg.codec.spatial_factor, cfg.codec.temporal_factor, tuple(cfg.dit.patch_size))
    if args.frames and not geo.frames_ok(args.frames):  # whatever the media (else refused once the models are loaded)
        raise InputError(f"--frames {args.frames}: this model takes {geo.frames_rule()} "
                         f"(e.g. {geo.frames_around(args.frames)})")
    if not given or args.source or args.ref:  # with media, the unspecified ones come from it
        return
    g = cfg.guidance
    try:
        geo.check_size(args.height or g.height, args.width or g.width)
        geo.check_tokens(args.height or g.height, args.width or g.width, args.frames or g.frames)
    except InputError as e:
        raise InputError(f"{' '.join(f'{k} {v}' for k, v in given)}: {e}") from None


def _check_file(flag: str, path: str) -> None:
    """`flag path` names a file: InputError if it is missing or a folder."""
    if Path(path).is_dir():
        raise InputError(f"{flag} {path}: a folder, not a file")
    if not Path(path).is_file():
        raise InputError(f"{flag} {path}: no such file")


def read_prompts(path: str) -> List[tuple]:
    """`--prompts FILE`: one prompt a line; blank lines and lines starting with # are skipped.
    [(line number, prompt)]; InputError for a missing or empty file."""
    _check_file("--prompts", path)
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # (a BOM, as Notepad writes, is not text)
    except UnicodeDecodeError as e:
        raise InputError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"--prompts {path}: no prompt in it (one a line; blank and # lines are skipped)")
    return prompts


@contextlib.contextmanager
def _named(where: str):
    """An InputError inside says where its input came from (`--prompts FILE line N: …`); "": as it is."""
    try:
        yield
    except InputError as e:
        raise (InputError(f"{where}: {e}") if where else e) from None


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):  # (mps, meta, xpu …: errors after the models load)
        raise InputError(f"--device {device}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_folder_for(folder: Path, what: str) -> None:
    """`folder` exists or can be made: its nearest existing ancestor is a writable folder, not a file
    (checked before the work that writes into it, not after). `what` names the argument."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what}: {existing} is not writable")


def _check_weights_folder(flag: str, folder: Path) -> None:
    """The JSON and safetensors files of a local model folder (and of its component folders, for
    an exported pipeline) parse, read before a model is built from them: a broken file is named
    with the reason here, not in a loader's traceback after the other models have loaded."""
    from safetensors import SafetensorError, safe_open

    for file in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise InputError(f"{flag} {folder}: {file} is not valid JSON ({getattr(e, 'msg', e)}{where})") from None
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")]):
        try:
            with safe_open(str(file), "pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as e:
            raise InputError(f"{flag} {folder}: {file} is not a readable safetensors file ({e})") from None


# The pipeline's messages name its call's arguments; the CLI's name the flags that set them.
_ARGUMENT = r"(?<![\w./~-])"  # a call argument's name as a word of the message, not inside a path or a key
_CALL_ARGUMENT_FLAGS = ((_ARGUMENT + r"num_frames = (\d+)", r"--frames \1"), (_ARGUMENT + r"num_frames\b", "--frames"),
                        (_ARGUMENT + r"num_inference_steps = (-?\d+)", r"--steps \1"),
                        (_ARGUMENT + r"mllm_layout = ", "--layout "),
                        (r"(^|: )(height|width) = (-?\d+)", r"\1--\2 \3"),
                        (r"\bpass height and width\b", "pass --height and --width"),
                        (r"(--frames (\d+)) \(--frames \2\)", r"\1"))


def _as_flags(message: str, args) -> str:
    """A pipeline InputError in the CLI's terms: `num_frames = 9` → `--frames 9`, `source:` →
    `--source PATH:`, `reference k:` → `--ref PATH:`."""
    for pattern, flag in _CALL_ARGUMENT_FLAGS:
        message = re.sub(pattern, flag, message)
    if args.source:
        message = re.sub(r"(^|: )source: ", lambda m: f"{m.group(1)}--source {args.source}: ", message)
    for flag, path in [("--source", args.source), *(("--ref", r) for r in args.ref)]:
        if path and message.startswith(f"{path}: "):  # the media reader names the file: `in.md: unsupported …`
            return f"{flag} {message}"
    if args.transformer and message.startswith("checkpoint: "):  # the release reader's
        return f"--transformer {args.transformer}: {message}"
    message = re.sub(r"(^|: )reference (\d+): ",
                     lambda m: (f"{m.group(1)}--ref {args.ref[int(m.group(2)) - 1]}: "
                                if 0 < int(m.group(2)) <= len(args.ref) else m.group(0)), message)
    return re.sub(r"^(--[\w-]+ -?\d+): \1: ", r"\1: ", message)  # `--height 37: --height 37: …` said once


MAX_FPS = 1000  # frames per second an output may be written at


@contextlib.contextmanager
def _s3_errors(what: str):
    """S3 failures reaching an s3:// input (no credentials, no endpoint, no bucket, refused) are the
    input's: one line naming it (`what`), not botocore's traceback."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as e:
        raise InputError(f"{what}: {e}") from None


def cmd_generate(args) -> int:
    import torch

    from loomcore.task_kinds import check_figure_refs
    from loomcore.models.mllm import MLLMRequest
    from loomcore.models.release import RELEASE_FILE_SUFFIXES, is_release_checkpoint
    from loomcore.pipeline import LoomVideoPipeline, check_output_path, inference_dtype, save_output
    from loomcore.pipeline.inputs import describe
    from loomcore.storage import is_s3

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        # 1. What can be checked without a model
        _check_device(device)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        dtype = dtypes[args.dtype] if args.dtype else inference_dtype(device)
        if args.model and args.transformer:
            raise InputError("--model (an exported pipeline) and --transformer (a DiT with the profile's other models): give one")
        if args.prompts and args.prompt:
            raise InputError("--prompt and --prompts (a file of them): give one")
        if args.num_outputs < 1:
            raise InputError(f"--num-outputs {args.num_outputs}: expected >= 1")
        if not 0 <= args.seed <= 2 ** 63 - args.num_outputs:  # (torch's seeds; one per output from --seed on)
            raise InputError(f"--seed {args.seed}: expected 0 … {2 ** 63 - args.num_outputs}")
        if args.fps is not None and not 0 < args.fps <= MAX_FPS:  # (inf, 1e12: av's OverflowError after generating)
            raise InputError(f"--fps {args.fps}: expected > 0 and at most {MAX_FPS}")
        if args.cpu_offload and torch.device(device).type == "cpu":
            raise InputError(f"--cpu-offload: keeps the models in CPU memory and moves each to the GPU while it runs, "
                             f"but the device is {device} (no GPU here, or --device cpu)")
        # (where a prompt came from, for messages; its text): the file's lines, else --prompt
        prompts = ([(f"--prompts {args.prompts} line {n}", text) for n, text in read_prompts(args.prompts)]
                   if args.prompts else [("", args.prompt)])
        seeds = list(range(args.seed, args.seed + args.num_outputs))
        out = Path(args.out)
        outs = []  # per prompt, per seed: <out>, <out>-<seed>, with a file of prompts <out>-<k>[-<seed>] (k from 1)
        for k in range(1, len(prompts) + 1):
            stem = f"{out.stem}-{k}" if args.prompts else out.stem
            outs.append([out.with_name(f"{stem}{out.suffix}")] if len(seeds) == 1 else
                        [out.with_name(f"{stem}-{s}{out.suffix}") for s in seeds])
        for out_path in (p for per_prompt in outs for p in per_prompt):
            check_output_path(out_path, args.frames, overwrite=args.overwrite, how_to_overwrite="--overwrite")
            _check_folder_for(out_path.parent, f"--out {out_path}")
        for flag, value in (("--steps", args.steps), ("--frames", args.frames), ("--height", args.height),
                            ("--width", args.width)):
            if value is not None and value < 1:
                raise InputError(f"{flag} {value}: expected >= 1")
        for flag, value in (("--guidance", args.guidance), ("--visual-guidance", args.visual_guidance)):
            if value is not None and not value >= 1.0:
                raise InputError(f"{flag} {value}: expected >= 1 (1 turns that guidance off)")
        for where, text in prompts:
            with _named(where):
                check_figure_refs(text, len(args.ref))
        for flag, path in [("--source", args.source)] * bool(args.source) + [("--ref", r) for r in args.ref]:
            _check_file(flag, path)
        if args.model and not is_s3(args.model) and Path(args.model).is_file():
            raise InputError(f"--model {args.model}: a file; an exported pipeline is a folder (export.out_dir, "
                             "with model_index.json)")
        s3_model = bool(args.model) and is_s3(args.model)  # reached as the checkout's s3: section (+ its profile) says
        not_s3 = [o for o in args.overrides if not o.lstrip("+~").startswith("s3.")]
        if args.model and (args.profile and not s3_model or not_s3):
            given = " ".join([*(["--profile " + args.profile] if args.profile and not s3_model else []), *not_s3])
            raise InputError(f"--model {args.model}: an exported pipeline carries its own config, so {given} would not "
                             "apply (s3.* overrides and --profile only, to reach an s3:// folder): give generation "
                             "settings as flags (--steps, --guidance, --height …)")
        if args.transformer and not is_s3(args.transformer) and Path(args.transformer).is_file() \
                and not is_release_checkpoint(args.transformer):
            raise InputError(f"--transformer {args.transformer}: a file, but not a release weights file "
                             f"({', '.join(RELEASE_FILE_SUFFIXES)}); a trained DiT is a folder "
                             "(<train.out_dir>/<stage>/model)")
        for flag, folder in (("--model", args.model), ("--transformer", args.transformer)):
            if folder and not is_s3(folder) and not Path(folder).is_dir() and not (
                    flag == "--transformer" and Path(folder).is_file()):  # a release weights file
                raise InputError(f"{flag} {folder}: no such folder (a trained DiT is <train.out_dir>/<stage>/model, "
                                 "an exported pipeline export.out_dir; run that stage first — a relative path on the "
                                 f"command line is taken from the current folder, {args.started_in})")
        if args.transformer and not is_s3(args.transformer) and Path(args.transformer).is_dir() \
                and not is_release_checkpoint(args.transformer):  # (the release's folder: ema/ema.pth …, no config)
            folder = Path(args.transformer)
            if (folder / "model_index.json").is_file():
                raise InputError(f"--transformer {folder}: an exported pipeline (it has model_index.json): give it "
                                 "as --model")
            if not (folder / "config.json").is_file():
                raise InputError(f"--transformer {folder}: no config.json (a trained DiT's folder, "
                                 "<train.out_dir>/<stage>/model, or a diffusers Wan transformer's)")
            _check_weights_folder("--transformer", folder)
        if args.model and not is_s3(args.model):
            folder = Path(args.model)
            if not (folder / "model_index.json").is_file():
                raise InputError(f"--model {folder}: no model_index.json (an exported pipeline's folder, export.out_dir"
                                 + ("; a DiT's folder is given as --transformer)" if (folder / "config.json").is_file()
                                    else ")"))
            _check_weights_folder("--model", folder)
        cfg = None if args.model else _load(args)
        if cfg is not None:  # the profile's base models (models.*), the DiT unless --transformer replaces it
            _check_generate_size(cfg, args)
            how = ("`loom init-models --profile tiny` (or `make pipeline`) builds them" if cfg.profile == "tiny" else
                   f"`loom init-models --profile {cfg.profile}` checks them")
            for key in ("vae", "scheduler", "mllm") + (() if args.transformer else ("transformer",)):
                folder = getattr(cfg.models, key)
                if not is_s3(folder) and not Path(folder).is_dir():
                    raise InputError(f"models.{key} {folder}: no such folder (the {cfg.profile} profile's base models; "
                                     f"{how})")

        # 2. The model
        if args.model:
            dtypes = {"default": dtype, "vae": torch.float32} if dtype != torch.float32 else dtype  # the codec in fp32
            # an exported folder carries no params: an s3:// one is reached as this checkout's `s3:` section
            # (+ overrides) says when there is a params file, else through the environment (AWS_*)
            from loomcore.config import DEFAULT_PARAMS
            from loomcore.storage import S3Settings

            has_params = Path(args.params or DEFAULT_PARAMS).is_file()
            s3 = S3Settings.from_config(_load(args).s3) if is_s3(args.model) and has_params else None
            with _s3_errors(f"--model {args.model}"):
                pipe = LoomVideoPipeline.from_pretrained(args.model, dtype=dtypes, s3_settings=s3)
        else:
            with _s3_errors(f"--transformer {args.transformer}" if is_s3(args.transformer or "") else
                            "the profile's models (models.*)"):
                pipe = LoomVideoPipeline.from_config_models(cfg, args.transformer, dtype=dtype)
        if args.model:
            print(f"generate: the exported pipeline {args.model}")
        elif args.transformer:
            print(f"generate: the DiT {args.transformer} with the {cfg.profile} profile's other models")
        else:  # the tiny profile's base DiT is a fresh init; the paper profile's the release's weights
            print(f"generate: the {cfg.profile} profile's base models (models.transformer {cfg.models.transformer}"
                  + ("; untrained: it draws noise — --transformer outputs/rl/model for the trained DiT)"
                     if cfg.profile == "tiny" else ")"))

        # 3. The inputs, as this model takes them — every prompt's before any is generated (with a
        #    file of them, the MLLM's token limit too: the tokenizer's check, without the model)
        plans = []
        for (where, text), per_prompt in zip(prompts, outs):
            with _named(where):  # the media read once: the file's later prompts share the first plan's frames
                plan = plans[0].with_prompt(text) if plans else pipe.resolve_inputs(
                    text, negative_prompt=args.negative_prompt, task=args.task, source=args.source, references=args.ref,
                    height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, visual_guidance_scale=args.visual_guidance, mllm_layout=args.layout,
                )
                if args.prompts:
                    pipe.mllm_encoder().tokenize(MLLMRequest(plan.task, plan.prompt, references=list(plan.references),
                                                             source=plan.source, layout=plan.mllm_layout))
            for out_path in per_prompt:
                check_output_path(out_path, plan.num_frames, overwrite=args.overwrite, how_to_overwrite="--overwrite")
            plans.append(plan)
        size, default = plans[0].height * plans[0].width, pipe.config.height * pipe.config.width
        if args.height is None and args.width is None and size > 4 * default:  # taken from --source / --ref
            print(f"generate: the output is {plans[0].width}×{plans[0].height} (W×H), the size of "
                  f"{'--source' if args.source else '--ref 1'}: {size / default:,.0f}× the pixels of this model's "
                  f"default {pipe.config.width}×{pipe.config.height}, and at least as many times slower (--height "
                  "and --width set the size)")
        if args.cpu_offload:  # one model in GPU memory at a time: the MLLM, then the DiT, then the codec
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)

        # 4. Generate, each prompt's outputs written as they come (an InputError here is still the
        #    input's: e.g. a prompt over mllm.max_length tokens)
        for (where, text), plan, per_prompt in zip(prompts, plans, outs):
            if where:
                print(f"generate: {where}: {text}")
            for line in describe(plan):
                print(f"generate: {line}")
            result = pipe(
                plan.prompt, **plan.call_inputs(), num_videos_per_prompt=len(seeds),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],  # CPU noise: a seed means the same on any device
            )
            for frames, out_path in zip(result.frames, per_prompt):
                path = save_output(frames, out_path, fps=args.fps or pipe.config.fps, overwrite=True, lossless=args.lossless)
                print(f"generate: wrote {path}")
    except InputError as e:  # a user's mistake (loomcore.errors); anything else is a bug: its traceback shows
        from loomcore.config import ConfigError

        # (the pipeline's messages name its call's arguments; a config error names its keys as they are)
        print(f"loom generate: {e if isinstance(e, ConfigError) else _as_flags(str(e), args)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NaN/inf frames (pipeline.to_uint8_frames): the weights', not a bug of ours
        print(f"loom generate: the model's output: {e}, nothing written: weights from a training that diverged, "
              "or an overflow in bfloat16 (`--dtype float32` tells which)", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom",
        description="LoomVideo training pipeline: curate → cache → stage1 → stage2 → stage3 → rl → evaluate → export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    configured = []

    def command(name: str, func, config: bool = True, params: bool = True, **kw) -> argparse.ArgumentParser:
        """A subcommand that runs `func`; with `config`, it takes --profile, --params (`params`) and
        key=value overrides (added after its own arguments, so that the overrides' positional comes last)."""
        p = sub.add_parser(name, **kw)
        p.set_defaults(func=func)
        if config:
            configured.append((p, params))
        return p

    p = command("config", cmd_config, help="print or check the config a stage runs with (params.yaml + overrides)",
                description="Prints the config as YAML — the whole of it, or one section named first — with the "
                "key=value overrides applied and checked.",
                epilog="examples:\n  loom config stage1\n  loom config stage1 stage1.steps=200\n"
                "  loom config --check --profile paper", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only validate; print one line")

    p = command("params", cmd_params, config=False,
                help="compose conf/ (+ Hydra overrides) into params.yaml, the config DVC tracks",
                description="Composes conf/ (the profile's file and every section) with Hydra into params.yaml, "
                "the one file DVC tracks and every stage reads. Run it after editing conf/: the file keeps the profile it "
                "names (`profile=tiny` changes it); `dvc exp run -S k=v` composes the same way for one experiment "
                "(conf/'s default profile unless `-S profile=…` names one).",
                epilog="examples:\n  loom params\n  loom params --check\n  loom params profile=paper --out /tmp/paper.yaml",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. profile=paper stage1.steps=5")
    p.add_argument("--conf", default=None, help="config folder (default: conf/ at the repo root)")
    p.add_argument("--out", default=None, help="file to write (default: params.yaml at the repo root)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs from the composition")

    p = command("plots-template", cmd_plots_template, config=False,
                help="write the offline HTML page `dvc plots show` fills (vega inlined)",
                description="Writes .dvc/plots/offline.html: DVC's plot page with vega, vega-lite and "
                "vega-embed inlined from the pinned vl-convert-python, so `dvc plots show` draws with no "
                "network. .dvc/config's plots.html_template points at it.")
    p.add_argument("--out", default=None, help="file to write (default: .dvc/plots/offline.html at the repo root)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs from the build")

    p = command("init-models", cmd_init_models, help="build the tiny base models, or check the paper ones are complete")
    p.add_argument("--force", action="store_true", help="rebuild even if the folders are up to date")

    p = command("import-release", cmd_import_release,
                help="convert the authors' released checkpoint into our safetensors folder",
                description="Reads every form the release's load_checkpoint reads: the checkpoint folder "
                "(ema/ema.pth first, else latest/gen_model.pth, else gen_model.pth) or one .pth/.pt/.safetensors "
                "file with keys 'gen_model.*' or unprefixed. Pickles are read with weights_only=True; every "
                "key and shape is checked against the profile's DiT.")
    p.add_argument("checkpoint", help="the release's checkpoint folder (e.g. checkpoints/LoomVideo) or a weights file")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="from a folder: the EMA weights when present, as the release loads (default), or the model's")
    p.add_argument("out_dir", help="output folder (LoomDiT.save_pretrained layout)")

    p = command("pipeline", cmd_pipeline, params=False, help="run the whole DAG (dvc repro) on a profile",
                description="Runs the DAG through DVC (`dvc repro`; with overrides or another profile, one "
                "`dvc exp run -S …` experiment), every stage reporting to one Prefect server started for the "
                "run (or yours, with PREFECT_API_URL). It holds the checkout's lock: a second run, a stage's "
                "deployment run or a pipeline flow on this checkout fails at once naming it, a nightly waits. "
                "Ctrl-C, Ctrl-\\, `kill`, a closed terminal: DVC and the running stage stop cleanly (up to 60 s; a second "
                "signal kills them), exit 128 + the signal. Ctrl-Z pauses them with loom, `fg`/`bg` continues "
                "them. After a `kill -9` of loom, the next run stops what it left and marks its Prefect runs "
                "Crashed.",
                epilog="examples:\n  loom pipeline                          # the DAG on params.yaml (make pipeline)\n"
                "  loom pipeline --target stage1          # up to stage 1\n"
                "  loom pipeline stage3.steps=1200        # one experiment: dvc exp show lists it\n"
                "  loom pipeline --profile paper          # the paper profile, composed from conf/",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", dest="targets", action="append", help="only reproduce up to this stage (repeatable)")

    p = command("plan", cmd_plan, help="the GPU memory one training rank needs, per stage and GPU count (FSDP2)",
                description="Builds the DiT on the meta device and reports, per rank: fp32 parameters, "
                "gradients, AdamW moments and EMA sharded over the GPUs, the gathered blocks, the "
                "activations of one stageN.max_tokens pack (measured on the meta device: what autograd "
                "saves, with or without activation checkpointing), the frozen MLLM in the online "
                "feature mode, a margin; and whether it fits the GPU. The training stages' GPU "
                "preflight asks each GPU for the same per-rank total.",
                epilog="example:\n  loom plan --profile paper --gpus 4 8 16 --gpu H20 H200",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", nargs="+", default=["stage1", "stage2", "stage3"], choices=("stage1", "stage2", "stage3"))
    p.add_argument("--gpus", nargs="+", type=int, default=[4, 8, 16], help="GPU counts (ranks) to plan for")
    p.add_argument("--gpu", nargs="+", default=["H20"], help="GPU kinds: H20, H200, H100, A100-80GB")
    p.add_argument("--checkpointing", choices=("on", "off"), default=None,
                   help="activation checkpointing (default: dit.gradient_checkpointing)")
    p.add_argument("--context", type=int, default=1024, help="MLLM context tokens per pack (default 1024)")

    p = command("node", cmd_node, params=False, help="join a multi-node stage from one of its other nodes (torchrun)",
                description="A stage with nodes > 1 (stageN.nodes, rl.nodes, data.cache_nodes) runs its first node "
                "(node rank 0) where DVC or its Prefect deployment runs it; that node hosts the rendezvous at "
                "orchestration.rdzv_endpoint (its address, reachable from the others). Run this on each of the "
                "other nodes with its own --node-rank (1 … nodes − 1), in the same checkout on storage every node "
                "shares, with the same profile and overrides: it runs the stage's torchrun command there, which "
                "joins the first node's run (the rendezvous id fingerprints the params dvc.yaml lists for the "
                "stage: a node whose params differ does not join). The nodes may start up to 15 minutes apart, in "
                "either order.",
                epilog="examples:\n  loom node stage1 --node-rank 1 --profile paper orchestration.rdzv_endpoint=10.0.0.5:29400\n"
                "  # from a Slurm job on 2 nodes whose first node (10.0.0.5) runs the stage: the other one\n"
                "  srun --nodes 1 --ntasks-per-node 1 --relative 1 loom node stage1 --node-rank 1 --profile paper "
                "orchestration.rdzv_endpoint=10.0.0.5:29400",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    from loomcore.train.launch import RANKED_STAGES

    p.add_argument("stage", choices=RANKED_STAGES, help="the stage to join")
    p.add_argument("--node-rank", type=int, required=True, metavar="K",
                   help="this node's rank, 1 … nodes − 1 (each other node its own; the first node is 0)")

    p = command("deploy", cmd_deploy, help="prefect deploy --all with the profile's work pools (run from the checkout)",
                description="Deploys prefect.yaml's deployments to the Prefect server at PREFECT_API_URL. "
                "The CPU deployments go to orchestration.cpu_pool, the GPU ones (cache, stages 1-3, RL, "
                "evaluate, and the pipeline and nightlies, whose dvc repro runs those stages on the worker's "
                "machine) to orchestration.gpu_pool: on the tiny profile both are loom-local, one CPU "
                "pool with one worker; on the paper profile the GPU pool is h20. The pools must exist; "
                "the deployments run in LOOM_REPO (default: this checkout). A deployment already on the "
                "server keeps its pause switch and its schedules' states as the UI left them (a nightly "
                "schedule follows the model registry, export.s3_uri, when that changed since the last "
                "deploy; flows/deploy_states.py). Then the automation that marks "
                "a run whose heartbeats stopped (a killed process) Crashed is created or updated "
                "(flows/automations.py).")
    p.set_defaults(own_checkout_only=True)  # outside a checkout: refused, not the installed package's deployed

    from loomcore.config import TASK_KINDS

    p = command("generate", cmd_generate, help="generate or edit an image/video with a LoomVideo pipeline",
                epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="", help="caption or instruction; '@Figure k' names the k-th --ref")
    p.add_argument("--prompts", metavar="FILE",
                   help="a text file of prompts, one a line (blank and # lines skipped), each generated with the "
                   "other flags as given, the models loaded once: <out>-1, <out>-2 … in the file's order")
    p.add_argument("--negative-prompt", default=None,
                   help="default: the pipeline's (params guidance.generate_negative_prompt, else guidance.negative_prompt)")
    p.add_argument("--layout", choices=("demo", "train", "eval"), default=None,
                   help="order of text, source and references in the MLLM prompt: the release's inference demo, its "
                   "training processors, or its benchmark processors (default: the pipeline's, guidance.mllm_layout: "
                   "demo on the paper profile, train on tiny)")
    p.add_argument("--task", default=None, choices=TASK_KINDS, help="default: inferred from the inputs")
    p.add_argument("--ref", action="append", default=[], metavar="IMAGE", help="a reference image (repeatable, in @Figure order)")
    p.add_argument("--source", metavar="VIDEO|IMAGE", help="the video or image to edit / reconstruct")
    p.add_argument("--frames", type=int, help="output frames, 1 + temporal_factor·k (1: an image)")
    p.add_argument("--height", type=int, help="output height (default: the source's, else the first --ref's, else the "
                   "config's)")
    p.add_argument("--width", type=int, help="output width (default: the source's, else the first --ref's, else the "
                   "config's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: guidance.steps)")
    p.add_argument("--guidance", type=float, help="text guidance s_t (default: guidance.text_scale, "
                   "guidance.text_scale_edit with a source — paper 5.0 / 2.5, tiny 1.0 / 2.5)")
    p.add_argument("--visual-guidance", type=float, help="visual guidance s_v (default: guidance.visual_scale, 1.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--num-outputs", type=int, default=1, metavar="N",
                   help="N outputs in one batch, seeds --seed … --seed+N-1, written to <out>-<seed>.<ext>; each is "
                   "what --seed <that seed> alone writes, to within one 8-bit level (default 1: --out itself)")
    p.add_argument("--out", required=True, metavar="PATH", help="output file: .mp4 (video) or .png (image)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--fps", type=float, help="output frame rate (default: the pipeline's, video.fps)")
    p.add_argument("--lossless", action="store_true", help="a video's exact RGB frames (H.264 High 4:4:4, which most "
                   "players refuse); default: H.264 yuv420p, visually lossless, as every common player plays it")
    p.add_argument("--model", metavar="DIR", help="an exported pipeline folder (LoomVideoPipeline.save_pretrained)")
    p.add_argument("--transformer", metavar="DIR", help="a trained LoomDiT folder, or the authors' release checkpoint (folder or weights file), "
                   "with the profile's other base models")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="DiT/MLLM dtype (default: bfloat16 on cuda, else float32)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep the models in CPU memory and move each to the GPU while it runs (diffusers' "
                   "enable_model_cpu_offload): the paper profile's MLLM and DiT need not fit the GPU together")
    for p, params in configured:
        _add_config_args(p, params)
    return parser


# The command line's file and folder arguments (of the subcommands that run in the checkout)
PATH_ARGS = ("params", "out", "source", "ref", "model", "transformer", "prompts", "conf", "checkpoint", "out_dir")


def _run_in_checkout(args) -> None:
    """For the subcommands that read or write the folders params names (models/, data/, outputs/,
    runs/): those paths are relative to the checkout, as DVC and the flows read them. Run in the
    checkout that holds the current folder (the nearest one with dvc.yaml and params.yaml or conf/), else in
    this package's, with its params.yaml and conf/ (`args.checkout`), the paths given on the command
    line made absolute first (s3:// URIs as given). `main` goes back to the folder afterwards."""
    from loomcore.config import REPO_ROOT
    from loomcore.storage import is_s3

    here = args.started_in = Path.cwd().resolve()
    is_checkout = lambda d: (d / "dvc.yaml").is_file() and (  # noqa: E731 — (conf/: its params.yaml gone, to rebuild)
        (d / "params.yaml").is_file() or (d / "conf" / "config.yaml").is_file())
    found = next((d for d in (here, *here.parents) if is_checkout(d)), None)
    if found is None and getattr(args, "own_checkout_only", False):  # deploy: what it deploys is where it runs
        return
    root = found or REPO_ROOT.resolve()
    if not is_checkout(root):  # an installed package, no checkout anywhere: paths are the caller's
        return
    args.checkout = root
    if root == here:
        return
    absolute = lambda v: v if not v or is_s3(v) or Path(v).is_absolute() else str(Path(v).resolve())  # noqa: E731
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [absolute(v) for v in value])
        elif isinstance(value, str):
            setattr(args, name, absolute(value))
    os.chdir(root)


def main(argv: Optional[List[str]] = None) -> int:
    from loomcore.config import ConfigError

    if hasattr(sys.stdout, "reconfigure"):  # a line as it is printed, also into `> file` or `| tee`:
        sys.stdout.reconfigure(line_buffering=True)  # not after DVC's, in blocks, when loom ends
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # its list options (--gpu H20 …) would take a key=value after them for one of theirs
        overrides = [a for a in argv[1:] if OVERRIDE.match(a)]
        argv = ["plan", *overrides, *(a for a in argv[1:] if not OVERRIDE.match(a))]
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # k=v after an option that follows a positional: `loom node stage1 --profile p k=v`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    back = os.getcwd()
    # every subcommand runs in the checkout that holds the current folder: its params.yaml and conf/,
    # and the folders params names, are the ones DVC and the flows use
    _run_in_checkout(args)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, InputError) as e:  # a user's mistake: one line
        print(f"loom {args.command}: {e}", file=sys.stderr)
        return 2
    finally:
        os.chdir(back)  # (main called in-process: the caller's folder stays its own)


if __name__ == "__main__":
    sys.exit(main())
