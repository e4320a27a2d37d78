"""`loom`: the command line of the LoomVideo pipeline.

Every subcommand composes the same config (params.yaml + conf/profile/<profile>.yaml +
key=value overrides) and calls into loomcore; heavy imports happen inside the subcommand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

PIPELINE_STAGES = ("curate", "cache", "stage1", "stage2", "stage3", "rl", "evaluate", "export")

EPILOG = """examples:
  loom config                              # the composed tiny-profile config, as YAML
  loom config --profile paper stage3       # one section of the paper profile
  loom config stage1.steps=10 --check      # validate an override without printing
  loom init-models --profile tiny          # build the tiny base models under models/tiny/
  loom init-models --profile paper         # check the real Wan2.2 / Qwen3-VL folders are complete
  loom import-release gen_model.pth out/   # convert the authors' checkpoint to safetensors
  loom pipeline                            # run the whole DAG on the tiny profile (dvc repro)
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="profile name (conf/profile/<name>.yaml); default: params.yaml's 'profile'")
    p.add_argument("--params", default=None, help="params file (default: params.yaml at the repo root)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stage1.steps=100")


def _load(args) -> "object":
    from loomcore.config import DEFAULT_PARAMS, load_config

    return load_config(args.overrides, profile=args.profile, params_path=args.params or DEFAULT_PARAMS)


def cmd_config(args) -> int:
    import yaml

    section = None
    if args.overrides and "=" not in args.overrides[0]:
        section, args.overrides = args.overrides[0], args.overrides[1:]
    cfg = _load(args)
    if args.check:
        print(f"config OK (profile {cfg.profile}; {' + '.join(cfg.sources)}; fingerprint {cfg.fingerprint()})")
        return 0
    d = cfg.to_dict()
    if section:
        if section not in d:
            raise SystemExit(f"loom config: no section {section!r}; sections: {', '.join(d)}")
        d = {section: d[section]}
    sys.stdout.write(yaml.safe_dump(d, sort_keys=False, width=110))
    return 0


def cmd_init_models(args) -> int:
    from loomcore.models.base_models import check_paper_models, init_models

    cfg = _load(args)
    if cfg.models.codec == "wan" and cfg.profile == "paper":
        problems = check_paper_models(cfg)
        if problems:
            print(f"init-models (profile {cfg.profile}): the base models are incomplete:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 1
        print(f"init-models (profile {cfg.profile}): OK — every configured model folder is complete")
        return 0
    report = init_models(cfg, force=args.force)
    for name, info in report.items():
        print(f"  {name}: {info}")
    return 0


def cmd_import_release(args) -> int:
    from loomcore.models.release import import_release

    cfg = _load(args)
    out = import_release(Path(args.checkpoint), Path(args.out_dir), cfg)
    print(f"import-release: wrote {out}")
    return 0


def _dvc_stages() -> List[str]:
    import yaml

    path = Path("dvc.yaml")
    if not path.is_file():
        return []
    return list((yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {})


def cmd_pipeline(args) -> int:
    cfg = _load(args)
    print(f"pipeline: profile {cfg.profile} (config {cfg.fingerprint()})")
    stages = _dvc_stages()
    missing = [s for s in PIPELINE_STAGES if s not in stages]
    if not stages:
        print("pipeline: dvc.yaml has no stages yet; ran what exists (config check, base models).")
    else:
        cmd = ["dvc", "repro", *(args.targets or [])]
        print(f"pipeline: {' '.join(cmd)}", flush=True)
        env = dict(os.environ)  # stage cmds run `python -m flows.…`: this environment's python
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        rc = subprocess.call(cmd, env=env)
        if rc:
            return rc
    if missing:
        print(f"pipeline: stages not built yet (open issues): {', '.join(missing)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom",
        description="LoomVideo training pipeline: curate → cache → stage1 → stage2 → stage3 → rl → evaluate → export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print or check the composed config (params.yaml + profile + overrides)")
    _add_config_args(p)
    p.add_argument("--check", action="store_true", help="only validate; print one line")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("init-models", help="build the tiny base models, or check the paper ones are complete")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the folders are up to date")
    p.set_defaults(func=cmd_init_models)

    p = sub.add_parser("import-release", help="convert the authors' gen_model.pth into our safetensors folder")
    p.add_argument("checkpoint", help="path to gen_model.pth (keys 'gen_model.*'; read with weights_only=True)")
    p.add_argument("out_dir", help="output folder (LoomDiT.save_pretrained layout)")
    _add_config_args(p)
    p.set_defaults(func=cmd_import_release)

    p = sub.add_parser("pipeline", help="run the whole DAG (dvc repro) on a profile")
    p.add_argument("--target", dest="targets", action="append", help="only reproduce up to this stage (repeatable)")
    _add_config_args(p)
    p.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from loomcore.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"loom {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
