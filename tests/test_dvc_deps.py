"""dvc.yaml lists, for every stage, the code its command runs: the import closure of its flow
module (loomcore.codegraph) — the same closure a training run's key fingerprints. A stage whose
code can change without DVC noticing reruns nothing and reports stale outputs as current."""

import os
import subprocess
import sys

import pytest
import yaml

from loomcore.codegraph import REPO, import_closure

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _covered(path: str, deps) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _deps(stage):
    """The stage's dvc.yaml deps, comments stripped."""
    return [d.split("#")[0].strip() for d in STAGES[stage].get("deps", [])]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_its_command_imports(stage):
    spec = STAGES[stage]
    module = next(w for w in spec["cmd"].split() if w.startswith("flows."))
    deps = [d for d in _deps(stage) if not d.startswith("$")]
    missing = sorted(f for f in import_closure(module) if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage}: deps omit files {module} imports: {', '.join(missing)}"
    absent = [d for d in deps if not (REPO / d).exists()]
    assert not absent, f"dvc.yaml stage {stage}: deps name files that do not exist: {absent}"


@pytest.mark.parametrize("stage", ["cache", "stage1", "stage2", "stage3", "rl"])
def test_stage_deps_cover_the_module_its_torchrun_starts(stage):
    """A ranked stage's flow launches torchrun on another module (`-m loomcore.rl` …), whose imports
    the flow's own closure does not reach: the Shapes reward's vocabulary, for one."""
    from loomcore.config import load_config
    from loomcore.train.launch import stage_command

    cmd = stage_command(load_config(profile="tiny"), stage, [])
    module = cmd[cmd.index("-m") + 1]
    entry = f"{module}.__main__" if (REPO / module.replace(".", "/") / "__main__.py").is_file() else module
    deps = [d for d in _deps(stage) if not d.startswith("$")]
    missing = sorted(f for f in import_closure(entry) if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage}: deps omit files {entry} (torchrun's) imports: {', '.join(missing)}"


def test_the_closure_follows_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / "loomcore"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")  # an empty package marker: no code, not a dep
    (pkg / "sub" / "__init__.py").write_text('"""sub"""\n')
    (pkg / "a.py").write_text("from .sub import b\n\ndef f():\n    from loomcore import c\n")
    (pkg / "sub" / "b.py").write_text("from ..d import x\nimport os\n")
    (pkg / "c.py").write_text("y = 2\n")
    (pkg / "d.py").write_text("x = 1\n")
    (pkg / "unused.py").write_text("")
    assert import_closure("loomcore.a", repo=tmp_path) == {
        "loomcore/a.py", "loomcore/sub/__init__.py", "loomcore/sub/b.py", "loomcore/c.py", "loomcore/d.py"}
    with pytest.raises(ValueError, match="no project module 'loomcore.nope'"):
        import_closure("loomcore.nope", repo=tmp_path)


def test_run_keys_fingerprint_the_trainers_closure():
    """The training stages' and RL's run keys hash exactly their entry module's closure, which
    includes what the old fixed list missed (loomcore/task_kinds.py, imported by models/mllm.py)."""
    from loomcore.codegraph import code_fingerprint

    train = import_closure("loomcore.train.trainer")
    assert {"loomcore/task_kinds.py", "loomcore/models/mllm.py", "loomcore/train/ema.py", "loomcore/config.py"} <= train
    assert "loomcore/rl/nft.py" in import_closure("loomcore.rl.trainer") and "loomcore/rl/nft.py" not in train
    assert code_fingerprint() != code_fingerprint("loomcore.rl.trainer")
    # the same in every process (a run resumes in a later one): hash randomisation does not reach it
    here = code_fingerprint()
    for seed in ("1", "2"):
        other = subprocess.run([sys.executable, "-c", "from loomcore.codegraph import code_fingerprint; "
                                "print(code_fingerprint())"], cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed},
                               capture_output=True, text=True, check=True).stdout.strip()
        assert other == here, seed
    assert len(here) == 16


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_params_key_dvc_yaml_lists_exists_in_the_config(stage):
    from loomcore.config import load_config
    from loomcore.codegraph import stage_params

    load_config().fingerprint(*stage_params(stage))  # KeyError names a key the config lacks


def test_run_keys_hash_the_params_dvc_yaml_lists_and_nothing_else():
    """A training run resumes exactly when DVC calls its params unchanged: the run key hashes
    the stage's dvc.yaml params (dotted keys included), no more, no less."""
    from loomcore.config import load_config
    from loomcore.codegraph import stage_params

    base = load_config()
    listed = load_config(["guidance.steps=7"])  # stage 1 lists guidance.steps (its validation grids)
    unlisted = load_config(["guidance.height=48"])  # ... but not guidance.height (evaluate's)
    assert "guidance.steps" in stage_params("stage1") and "guidance" not in stage_params("stage1")
    fp = lambda cfg, stage: cfg.fingerprint(*stage_params(stage))  # noqa: E731
    assert fp(listed, "stage1") != fp(base, "stage1")
    assert fp(unlisted, "stage1") == fp(base, "stage1")
    assert fp(load_config(["stage3.steps=9"]), "stage1") == fp(base, "stage1")
    assert fp(load_config(["stage3.steps=9"]), "stage3") != fp(base, "stage3")
    with pytest.raises(KeyError, match="guidance.nope"):
        base.fingerprint("guidance.nope")


# the stages whose code reads MLLM contexts through loomcore/train/contexts.py
CONTEXT_STAGES = sorted(s for s in STAGES if _covered("loomcore/train/contexts.py", _deps(s)))


def test_the_stages_that_read_contexts_are_the_trainers():
    assert CONTEXT_STAGES == ["rl", "stage1", "stage2", "stage3"]  # the parametrisation below is not empty


@pytest.mark.parametrize("stage", CONTEXT_STAGES)
def test_a_stage_that_may_encode_contexts_online_lists_what_the_encoder_reads(stage):
    """With mllm.feature_mode online, a stage that reads its contexts through
    loomcore/train/contexts.py runs the frozen MLLM (models.mllm, mllm.*) in batches of
    data.cache_batch_size: a change to any of them must rerun the stage."""
    from loomcore.codegraph import stage_params

    params = stage_params(stage)
    read = ("mllm.feature_mode", "models.mllm", "data.cache_batch_size")
    missing = [k for k in read if not any(k == p or k.startswith(p + ".") for p in params)]
    assert not missing, f"dvc.yaml stage {stage}: params omit {missing}, which its online contexts read"


def test_a_trained_stage_depends_on_the_weights_its_init_from_names():
    """RL's deps named stage 3's model whatever rl.init_from said: with rl.init_from=stage2, DVC
    watched stage 3's weights and never stage 2's, which RL read."""
    assert "${train.out_dir}/${rl.init_from}/model" in _deps("rl")
    assert "${train.out_dir}/${rl.init_from}/summary.json" in _deps("rl")
    assert not [d for d in _deps("rl") if "/stage3/" in d]


def test_the_headline_plots_read_curves_a_stage_writes_and_tracks():
    """dvc.yaml's titled top-level plots (first on `dvc plots show`'s page) name curve files inside
    a stage's tracked outs — so `dvc plots diff <rev>` finds them in a revision (not the untracked
    timing/ curves, which exist only in the workspace)."""
    dag = yaml.safe_load((REPO / "dvc.yaml").read_text())
    titled = [next(iter(p.items())) for p in dag["plots"] if isinstance(p, dict) and isinstance(next(iter(p.values())), dict)
              and isinstance(next(iter(p.values())).get("y"), dict)]
    assert titled, "no titled plot first in dvc.yaml"
    folders = {o if isinstance(o, str) else next(iter(o)) for spec in STAGES.values() for o in spec.get("outs", [])}
    folders |= {o if isinstance(o, str) else next(iter(o)) for spec in STAGES.values() for o in spec.get("plots", [])}
    for title, spec in titled:  # (DVC writes the title into the page's script unescaped: a quote broke it)
        assert not set("'\"\\") & set(title), f"{title}: a quote or backslash in a plot title stops the page's script"
        for path in spec["y"]:
            assert any(path.startswith(f.rstrip("/") + "/") for f in folders), f"{title}: {path} is in no stage's outs"
