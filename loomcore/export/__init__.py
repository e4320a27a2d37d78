"""Export: a trained LoomVideo as a diffusers pipeline folder, optionally published to S3.

    folder.py    export_pipeline(cfg) → the folder (atomic; safetensors only; model card); checks
    card.py      the model card: front matter, loading, metrics, lineage, params
    lineage.py   git commit + dirty flag; the weights' ancestors in dvc.lock; DVC-hash checks
    metrics.py   flatten the evaluate stage's metrics; the promotion gate
    publish.py   publish_export(folder, s3_uri) → models/<name>/<version>/ + _COMPLETE + latest.json;
                 the reader side: resolve_version, download_version, list_versions

DESIGN §5 ("Export"). The flow around it is flows/export.py → tasks/export.py.
"""

from .folder import (ExportExists, ExportResult, check_export_folder, content_version, export_pipeline, find_pickles,
                     read_export_info, resolve_source)
from .lineage import dvc_lineage, dvc_md5, git_state
from .metrics import GateDecision, flatten_metrics, load_metrics, promotion_gate
from .publish import (COMPLETE, LATEST, Publication, PublishError, download_version, list_versions, publish_export,
                      read_latest, resolve_version, version_uri)

__all__ = [
    "COMPLETE", "LATEST", "ExportExists", "ExportResult", "GateDecision", "Publication", "PublishError",
    "check_export_folder", "content_version", "download_version", "dvc_lineage", "dvc_md5", "export_pipeline",
    "find_pickles", "flatten_metrics", "git_state", "list_versions", "load_metrics", "promotion_gate",
    "publish_export", "read_export_info", "read_latest", "resolve_source", "resolve_version", "version_uri",
]
