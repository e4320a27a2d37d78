"""DVC stage `export`: the trained DiT (RL's when it exists, else stage 3's) + the frozen base
parts → a diffusers pipeline folder at export.out_dir (safetensors, model card with metrics and
lineage), and, when export.s3_uri is set, a published version under <s3_uri>/models/<name>/ that
replaces `latest` only if the promotion gate passes (loomcore.export).

    python -m flows.export [--profile P] [--overwrite] [key=value …]

--overwrite (= export.overwrite=true) replaces an existing export folder."""

from __future__ import annotations

import sys
from typing import List, Optional


from flows.common import stage_flow, stage_main
from tasks.common import load_stage_config, markdown_table, publish_markdown
from tasks.export import export_folder_task, publish_export_task


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def export_report(exported: dict, published: Optional[dict]) -> str:
    """The markdown artifact: what was exported, where, and the gate's decision."""
    lines = [
        f"# Export {exported['name']} {exported['version']}\n",
        f"Folder `{exported['folder']}`: {exported['files']} files, {exported['bytes'] / 1e6:.1f} MB, from the "
        f"**{exported['source_stage']}** weights (`{exported['source_path']}`).\n",
    ]
    lines += [f"- **lineage warning**: {w}" for w in exported["lineage_warnings"]]
    metrics = [{"metric": k, "value": _fmt(v)} for k, v in sorted(exported["metrics"].items())]
    lines.append("\n## Metrics\n\n" + (markdown_table(metrics) if metrics else "_none_\n"))
    if published is None:
        lines.append("## S3\n\nNot uploaded (export.s3_uri is null).\n")
        return "\n".join(lines)
    d = published["decision"]
    verdict = ("**promoted**: `latest` now points to this version" if published["promoted"]
               else f"**kept as a candidate**: `latest` stays {published['latest'] or 'unset'}")
    lines.append(f"## S3\n\n`{published['uri']}`: {published['files']} files ({published['uploaded']} uploaded, "
                 f"{published['kept']} already there). {verdict}.\n")
    if d["reasons"]:
        lines.append(f"Why: worse than {d['baseline']} beyond export.promotion_tolerance:\n")
        lines += [f"- {r}" for r in d["reasons"]]
    else:
        lines.append(d["summary"])
    rows = [{"metric": c["key"], "better": c["direction"], "latest": _fmt(c["latest"]), "new": _fmt(c["new"]),
             "worse by": _fmt(c["loss"]), "allowed": _fmt(c["allowed"]), "verdict": c["verdict"]}
            for c in d["comparisons"]]
    if rows:
        lines.append(f"\n### Against {d['baseline']}\n\n" + markdown_table(rows))
    return "\n".join(lines)


@stage_flow("export")
def export_flow(profile: str | None = None, overrides: list[str] | None = None) -> dict:
    """The trained DiT (RL's when it exists, else stage 3's) and the frozen base parts → a
    diffusers pipeline folder at `export.out_dir` (safetensors, a model card with metrics and
    lineage); with `export.s3_uri`, a published version that replaces `latest` only if the
    promotion gate passes."""
    overrides = list(overrides or [])
    cfg = load_stage_config(profile, overrides)
    exported = export_folder_task(profile, overrides)
    published = publish_export_task(exported["folder"], profile, overrides) if cfg.export.s3_uri else None
    publish_markdown("export-summary", export_report(exported, published),
                     "What the export stage wrote, where it published it, and the promotion decision")
    return {"export": exported, "publication": published}


def _existing_target(argv: List[str]) -> str | None:
    """The refusal of an existing export folder, found before a Prefect run is started."""
    import argparse

    from loomcore.config import ConfigError
    from loomcore.export.folder import existing_target_error

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--profile", default=None)
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_stage_config(args.profile, [a for a in rest if "=" in a])
    except ConfigError:
        return None  # stage_main reports it
    return existing_target_error(cfg)


def main(argv: list[str] | None = None) -> int:
    from loomcore.export import ExportExists, PublishError

    argv = list(sys.argv[1:] if argv is None else argv)
    overwrite = ("export.overwrite=true", "replace an existing export folder")
    given = [a for a in argv if a != "--overwrite"] + [overwrite[0]] * ("--overwrite" in argv)
    refusal = None if {"-h", "--help"} & set(argv) else _existing_target(given)
    if refusal:
        print(f"flows.export: {refusal}", file=sys.stderr)
        return 2
    try:
        return stage_main(export_flow, __doc__, argv, switches={"--overwrite": overwrite})
    except (ExportExists, PublishError) as e:
        print(f"flows.export: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
