"""Data-stage throughput on the tiny profile, measured in one run:
curation rows/s, cache samples/s, bytes per sample of each MLLM mode, and the packer's token
utilisation (tokens used / budget) on the synthetic set at each stage's budget.

    python -m benchmarks.data_throughput [--samples 300] [--out bench.json]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks import at_least, cpu_name, output_file, parser
from loomcore.config import STAGES, load_config
from loomcore.storage import S3Settings
from loomcore.train.cache import build_cache
from loomcore.data.curate import curate
from loomcore.data.loader import PackedLoader
from loomcore.data.packing import utilisation
from loomcore.models.base_models import init_models


def main(argv=None) -> dict:
    p = parser("data_throughput", __doc__)
    p.add_argument("--samples", type=at_least(1), default=300, help="synthetic samples to curate and cache (default 300)")
    p.add_argument("--packs", type=at_least(1), default=400, help="packs drawn per stage for utilisation (default 400)")
    p.add_argument("--out", type=output_file, default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loom-bench-") as tmp:  # raw videos, models, cache: removed however the run ends
        result = _measure(args, Path(tmp))
    print(json.dumps(result, indent=2))
    print("\n| stage | budget | utilisation | samples/pack |\n|---|---|---|---|")
    for name, v in result["packing"].items():
        print(f"| {name} | {v['budget']} | {v['utilisation']:.3f} | {v['samples_per_pack']} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _measure(args, root: Path) -> dict:
    cfg = load_config([
        f"paths.data_root={root}/raw", f"paths.manifests={root}/manifests", f"paths.cache={root}/cache",
        f"paths.models={root}/models", f"models.transformer={root}/models/tiny/transformer",
        f"models.vae={root}/models/tiny/vae", f"models.scheduler={root}/models/tiny/scheduler",
        f"models.mllm={root}/models/tiny/mllm", f"data.synthetic_samples={args.samples}",
    ], profile="tiny")
    init_models(cfg)
    t = time.perf_counter()
    cur = curate(cfg, "synthetic", root / "raw", root / "manifests", progress=False)
    t_gen_cur = time.perf_counter() - t
    t = time.perf_counter()
    cur2 = curate(cfg, str(root / "raw"), root / "raw", root / "manifests2", progress=False)  # curation alone, no generation
    t_cur = time.perf_counter() - t
    t = time.perf_counter()
    cache = build_cache(cfg, progress=False)
    t_cache = time.perf_counter() - t
    packs = {}
    for name in STAGES:
        s = cfg.stage(name)
        loader = PackedLoader(cfg.paths.cache, s.sampling.as_dict(), s.max_tokens, s.resolution, seed=0,
                              settings=S3Settings.from_config(cfg.s3))
        items = [loader.next_items() for _ in range(args.packs)]
        packs[name] = {"budget": s.max_tokens, "utilisation": round(utilisation(items, s.max_tokens), 4),
                       "samples_per_pack": round(sum(map(len, items)) / len(items), 2)}
    return {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "rows": cur2["rows_in"],
        "curate_rows_per_s": round(cur2["rows_in"] / t_cur, 1),
        "generate_and_curate_s": round(t_gen_cur, 2),
        "cache_entries": cache["samples"],
        "cache_samples_per_s": round(cache["samples"] / t_cache, 1),
        "bytes_per_sample": cache["bytes_per_sample"],
        "packing": packs,
    }


if __name__ == "__main__":
    main()
