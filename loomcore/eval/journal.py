"""The evaluate stage's journal: each sample's score rows are kept as soon as the sample is
scored, so an evaluation that stops — a preempted GPU node, an out-of-memory kill, Ctrl-C, a
bug fixed in a file the scores do not depend on … — resumes where it stopped instead of
generating (and judging) hours of samples again.

    <paths.runs>/evaluate/<key>/
        samples.jsonl     one line a scored sample: where it belongs (model, benchmark, sample id,
                          seed index), a fingerprint of its inputs, its score rows, and whether it
                          is a contact-sheet row
        sheets/<n>.npz    those contact-sheet rows' pictures (frames, source, references)
        .lock             held while a stage writes the journal

The key fingerprints what decides every score, as a training run's directory does (DESIGN §5):
the evaluate stage's params (dvc.yaml's list, less where the outputs go), the files of the
weights evaluated and of every local base-model, VBench-backbone and judge folder
(`storage.inputs_fingerprint`), a hosted judge's address and model, and the code the stage runs
(`codegraph.code_fingerprint`). A sample is taken from the journal only when its own fingerprint
matches too — its manifest row or benchmark entry, the bytes of the media it is given — so an
edited benchmark regenerates just the samples that changed. A line cut short by the stop is
dropped, and that sample generated again.

The journal lives outside the stage's outs (`dvc repro` deletes those before a run) and is
removed once the outs are written: it recovers a stopped evaluation, never replays a finished
one (`dvc repro -f evaluate` generates everything again).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from loomcore.codegraph import code_fingerprint, stage_params
from loomcore.config import Config, fingerprint_dict
from loomcore.eval.judge import ENV_BASE_URL, ENV_MODEL
from loomcore.sheets import SheetItem
from loomcore.storage import inputs_fingerprint, is_s3, sha256_file

JOURNAL_FILE = "samples.jsonl"
Scored = Tuple[List[dict], Optional[SheetItem]]  # a sample's score rows and its contact-sheet row, if any


def journal_key(cfg: Config, model_path: Path) -> str:
    """What decides every score of an evaluation: params, weights and base models, code."""
    # where the outputs go is not what they are (the weights' own bytes stand for train.out_dir)
    picked = cfg.pick(*(k for k in stage_params("evaluate") if k != "train.out_dir"))
    picked["eval"] = {k: v for k, v in picked["eval"].items() if k != "out_dir"}
    e = cfg.eval
    named = [*dataclasses.asdict(cfg.models).values(), e.vbench.clip, e.vbench.dino, e.judge.model]
    folders = [Path(model_path), *sorted({Path(str(v)) for v in named if v and not is_s3(str(v)) and Path(str(v)).exists()})]
    # a hosted judge is named by the environment (judge.ENV_*), not by params: which one answered counts
    hosted = [os.environ.get(ENV_BASE_URL), os.environ.get(ENV_MODEL)] if e.judge.kind == "openai" else []
    blob = json.dumps([fingerprint_dict(picked), inputs_fingerprint(folders), code_fingerprint("loomcore.eval.runner"),
                       hosted])
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
    """`sample_fingerprint` of a `benchmarks.BenchmarkSample`."""
    return sample_fingerprint(dataclasses.asdict(sample), [sample.source, *sample.refs])


class Journal:
    """Open with `Journal.open(cfg, model_path, log)`; `scored(place, fingerprint, compute)` returns
    a sample's (rows, sheet row) from the journal, or computes and records them; `close(done)`
    removes the journal when the evaluation finished, else keeps it for the next run."""

    def __init__(self, folder: Optional[Path], log: Callable[[str], None] = print):
        self.folder, self.log = folder, log
        self.entries: Dict[str, dict] = {}
        self.reused = 0
        self._file = self._lock = None
        if folder is None:  # no journal: every sample is computed (tests, callers of one benchmark)
            return
        (folder / "sheets").mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"another evaluation with the same params, weights and code is writing {folder} "
                               "right now: wait for it, or stop it first") from None
        self._read()
        self._file = open(folder / JOURNAL_FILE, "a", encoding="utf-8")

    @classmethod
    def open(cls, cfg: Config, model_path: Path, log: Callable[[str], None] = print) -> "Journal":
        folder = Path(cfg.paths.runs) / "evaluate" / journal_key(cfg, model_path)
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
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            try:
                entry = json.loads(line)
                place, fingerprint, rows = entry["place"], entry["fingerprint"], entry["rows"]
            except (ValueError, KeyError, TypeError) as e:
                self.log(f"{path}:{number}: not a journal entry ({e}); that sample is generated again")
                continue
            self.entries[place] = entry

    def scored(self, place: Sequence[object], fingerprint: str, compute: Callable[[], Scored]) -> Scored:
        key = json.dumps(list(place))
        entry = self.entries.get(key)
        if entry is not None and entry["fingerprint"] == fingerprint:
            sheet = self._load_sheet(entry) if entry.get("sheet") else None
            if not entry.get("sheet") or sheet is not None:
                self.reused += 1
                return entry["rows"], sheet
        rows, sheet = compute()
        if self._file is not None:
            self._record(key, fingerprint, rows, sheet)
        return rows, sheet

    def _sheet_path(self, key: str) -> Path:
        return self.folder / "sheets" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"

    def _record(self, key: str, fingerprint: str, rows: List[dict], sheet: Optional[SheetItem]) -> None:
        entry = {"place": key, "fingerprint": fingerprint, "rows": rows, "sheet": None}
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
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                self.log(f"evaluation stopped: {len(self.entries)} scored sample(s) kept in {self.folder}; "
                         "a rerun with the same params, weights and code resumes from them")
            self._lock.close()
            self._lock = None
