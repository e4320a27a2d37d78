"""The evaluate stage's journal: each sample's score rows are kept as soon as the sample is
scored, so an evaluation that stops — a preempted GPU node, an out-of-memory kill, Ctrl-C, a
bug fixed in a file the scores do not depend on … — resumes where it stopped instead of
generating (and judging) hours of samples again.

    <paths.runs>/evaluate/<key>/
        samples.jsonl     one line a scored sample: where it belongs (model, benchmark, sample id,
                          seed index), a fingerprint of its inputs, its score rows, and whether it
                          is a contact-sheet row
        sheets/<n>.npz    those contact-sheet rows' pictures (frames, source, references)
    <paths.runs>/evaluate/<key>.lock   held while a stage writes the journal

The key fingerprints what decides every score, as a training run's directory does (DESIGN §5):
the evaluate stage's params (dvc.yaml's list, less where the outputs go and `eval.cpu_offload`,
which changes no sample), the files of the weights evaluated and of every base-model,
VBench-backbone and judge folder (an s3:// one by its verified mirror;
`storage.inputs_fingerprint`), a hosted judge's address and model, the code that
computes the scores (`codegraph.code_fingerprint`, less OUTPUT_ONLY: a fix to the report writer
keeps the journal), and where the numbers are computed (device, dtype, torch / diffusers /
transformers versions). A sample is taken from the journal only when its own fingerprint matches
too — its manifest row or benchmark entry, the bytes of the media it is given — and it was made
for the same contact-sheet decision, so an edited benchmark regenerates just the samples that
changed. A sample the judge failed on (a timeout, an endpoint down, a refused key) is not kept: the
rerun asks again. A line cut short by the stop is dropped, and that sample generated again.

The journal lives outside the stage's outs (`dvc repro` deletes those before a run) and is
removed once the outs are written: it recovers a stopped evaluation, never replays a finished
one (`dvc repro -f evaluate` generates everything again).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from loomcore.codegraph import code_fingerprint, stage_params
from loomcore.config import Config, fingerprint_dict
from loomcore.eval.judge import ENV_BASE_URL, ENV_MODEL
from loomcore.sheets import SheetItem
from loomcore.storage import S3Settings, inputs_fingerprint, is_s3, materialize, sha256_file

JOURNAL_FILE = "samples.jsonl"
Scored = Tuple[List[dict], Optional[SheetItem]]  # a sample's score rows and its contact-sheet row, if any


# Modules that write the outputs from the journaled rows, not the rows: a fix to one of them (the
# likeliest crash after hours of scoring is in writing the report) keeps the journal usable.
OUTPUT_ONLY = ("loomcore/eval/report.py", "loomcore/eval/journal.py", "loomcore/sheets.py")


def journal_key(cfg: Config, model_path: Path, device: str, dtype: torch.dtype) -> str:
    """What decides every score of an evaluation: params, weights, base models and backbones,
    the judge, the code, and where the numbers are computed (device, dtype, library versions)."""
    # where the outputs go is not what they are (the weights' own bytes stand for train.out_dir), nor
    # where the models wait between uses: a run stopped by an out-of-memory kill resumes with cpu_offload
    picked = cfg.pick(*(k for k in stage_params("evaluate") if k != "train.out_dir"))
    picked["eval"] = {k: v for k, v in picked["eval"].items() if k not in ("out_dir", "cpu_offload")}
    e = cfg.eval
    named = {str(v) for v in [*dataclasses.asdict(cfg.models).values(), e.vbench.clip, e.vbench.dino, e.judge.model] if v}
    settings = S3Settings.from_config(cfg.s3)
    # an s3:// folder by its mirror (what the stage loads; `materialize` verified it against the store)
    folders = [Path(model_path), *sorted({materialize(v, settings=settings) if is_s3(v) else Path(v)
                                          for v in named if is_s3(v) or Path(v).exists()})]
    # a hosted judge is named by the environment (judge.ENV_*), not by params: which one answered counts
    hosted = [os.environ.get(ENV_BASE_URL), os.environ.get(ENV_MODEL)] if e.judge.kind == "openai" else []
    where = [device, torch.cuda.get_device_name() if device == "cuda" else "", str(dtype),
             *(importlib.metadata.version(m) for m in ("torch", "diffusers", "transformers"))]
    blob = json.dumps([fingerprint_dict(picked), inputs_fingerprint(folders),
                       code_fingerprint("loomcore.eval.runner", leave_out=OUTPUT_ONLY), hosted, where])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_fingerprint(definition: dict, media: Sequence[Optional[Path]]) -> str:
    """A sample's inputs: its definition (JSON-able: a manifest row with its ground truth, a
    benchmark entry) and the sha256 of each media file it is given that exists."""
    h = hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode())
    for p in media:
        if p is not None and Path(p).is_file():
            h.update(f"\n{Path(p).name}:{sha256_file(Path(p))}".encode())
    return h.hexdigest()[:16]


def benchmark_fingerprint(sample) -> str:
    """`sample_fingerprint` of a `benchmarks.BenchmarkSample`: its media by name and bytes, not by
    absolute path (a synthetic or s3:// benchmark is written to a new local folder on each run)."""
    definition = dataclasses.asdict(sample)
    definition.update(source=sample.source and Path(sample.source).name, refs=[Path(r).name for r in sample.refs],
                      missing=[Path(m).name for m in sample.missing])
    return sample_fingerprint(definition, [sample.source, *sample.refs])


class Journal:
    """Open with `Journal.open(...)`; `scored(place, fingerprint, wants_sheet, compute)` returns a
    sample's (rows, sheet row) from the journal, or computes and records them; `close(finished)`
    removes the journal when the evaluation finished, else keeps it for the next run."""

    def __init__(self, folder: Optional[Path], log: Callable[[str], None] = print):
        self.folder, self.log = folder, log
        self.entries: Dict[str, dict] = {}
        self.reused = 0
        self._file = self._lock = None
        if folder is None:  # no journal: every sample is computed (tests, callers of one benchmark)
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        # beside the folder, not in it: the folder is removed while the lock is held
        self._lock = open(folder.with_name(f"{folder.name}.lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another evaluation with the same params, weights and code is writing {folder} "
                               "right now: wait for it, or stop it first") from None
        try:
            (folder / "sheets").mkdir(parents=True, exist_ok=True)
            self._read()
            self._file = open(folder / JOURNAL_FILE, "a", encoding="utf-8")
        except BaseException:
            self._lock.close()  # (and with it the lock)
            raise

    @classmethod
    def open(cls, cfg: Config, model_path: Path, device: str, dtype: torch.dtype,
             log: Callable[[str], None] = print) -> "Journal":
        folder = Path(cfg.paths.runs) / "evaluate" / journal_key(cfg, model_path, device, dtype)
        journal = cls(folder, log)
        if journal.entries:
            log(f"evaluation journal {folder}: {len(journal.entries)} sample(s) scored by a run that stopped "
                "are taken from it")
        return journal

    def _read(self) -> None:
        path = self.folder / JOURNAL_FILE
        if not path.is_file():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):  # the stop cut the last line: drop it, append after the rest
            keep = data.rfind(b"\n") + 1
            self.log(f"{path}: the last line was cut short by the stop ({len(data) - keep} bytes); "
                     "that sample is generated again")
            with open(path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        for number, line in enumerate(data.splitlines(), 1):
            try:  # line by line: a line of bad bytes costs its sample (UnicodeDecodeError is a ValueError)
                entry = json.loads(line)
                sheet = entry["sheet"]
                if not (isinstance(entry["place"], str) and isinstance(entry["fingerprint"], str)
                        and isinstance(entry["rows"], list) and isinstance(entry["wants_sheet"], bool)
                        and (sheet is None or {"prompt", "note", "references"} <= set(sheet))):
                    raise TypeError("a field of the wrong kind")
            except (ValueError, KeyError, TypeError) as e:
                self.log(f"{path}:{number}: not a journal entry ({e}); that sample is generated again")
                continue
            self.entries[entry["place"]] = entry

    def scored(self, place: Sequence[object], fingerprint: str, wants_sheet: bool,
               compute: Callable[[], Scored]) -> Scored:
        """The sample at `place` (model, benchmark, id[, seed]): from the journal when an entry has
        its fingerprint and was made for the same sheet decision (whether the sample is a contact-
        sheet row depends on the other samples' kinds), else `compute()` (and recorded)."""
        key = json.dumps(list(place))
        entry = self.entries.get(key)
        if entry is not None and entry["fingerprint"] == fingerprint and (entry["wants_sheet"] or not wants_sheet):
            sheet = self._load_sheet(entry) if wants_sheet and entry["sheet"] else None
            if not (wants_sheet and entry["sheet"]) or sheet is not None:
                self.reused += 1
                return entry["rows"], sheet
        rows, sheet = compute()
        if self._file is not None and not any(r["failure"] and r["attempts"] for r in rows):
            # (a sample the judge failed on — a timeout, an endpoint down, a refused key — is asked again)
            self._record(key, fingerprint, wants_sheet, rows, sheet)
        return rows, sheet

    def _sheet_path(self, key: str) -> Path:
        return self.folder / "sheets" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"

    def _record(self, key: str, fingerprint: str, wants_sheet: bool, rows: List[dict],
                sheet: Optional[SheetItem]) -> None:
        entry = {"place": key, "fingerprint": fingerprint, "wants_sheet": wants_sheet, "rows": rows, "sheet": None}
        if sheet is not None:  # the pictures first: a line names only a sheet file that is whole
            path = self._sheet_path(key)
            arrays = {"frames": sheet.frames, **({"source": sheet.source} if sheet.source is not None else {}),
                      **{f"ref{i}": r for i, r in enumerate(sheet.references)}}
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            entry["sheet"] = {"prompt": sheet.prompt, "note": sheet.note, "references": len(sheet.references)}
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries[key] = entry

    def _load_sheet(self, entry: dict) -> Optional[SheetItem]:
        path, meta = self._sheet_path(entry["place"]), entry["sheet"]
        try:
            with np.load(path) as z:
                return SheetItem(meta["prompt"], z["frames"], z["source"] if "source" in z.files else None,
                                 [z[f"ref{i}"] for i in range(meta["references"])], meta["note"])
        except (OSError, ValueError, KeyError) as e:  # gone or cut short: generate the sample again
            self.log(f"{path}: unreadable ({e}); that sample is generated again")
            return None

    def close(self, finished: bool) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            if finished:
                shutil.rmtree(self.folder, ignore_errors=True)  # (the empty <key>.lock stays: unlinked, a
                # waiting process could lock the old file while a third locked a new one)
            else:
                self.log(f"evaluation stopped: {len(self.entries)} scored sample(s) kept in {self.folder}; "
                         "a rerun with the same params, weights and code resumes from them")
            self._lock.close()
            self._lock = None
