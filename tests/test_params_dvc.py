"""What DVC tracks is what runs (issue #14), with real DVC and the project's real dvc.yaml, conf/
and base_models stage in a temporary git repository.

A key the tiny profile sets (`dit.num_layers`, `dit.ffn_dim`) is overridden through `dvc exp run
-S` — directly, through the Prefect `pipeline` flow's `overrides`, and as a queued sweep — and the
value is read back from what the stage built (the transformer's config.json), not from our config
loader. `-S profile=paper` selects the paper profile: base_models then stops on the missing weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from _orchestration import BIN, DVC, REPO, copy_checkout

REPO_DVC_CONFIG = REPO / ".dvc" / "config"
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


def dvc(repo, *args, check=True):
    return subprocess.run([DVC, *args], cwd=repo, env=ENV, capture_output=True, text=True, check=check)


def built_transformer(repo) -> dict:
    return json.loads((repo / "models/tiny/transformer/config.json").read_text())


@pytest.fixture
def checkout(tmp_path, prefect_api):
    repo = copy_checkout(tmp_path / "checkout")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"]):
        subprocess.run(cmd, cwd=repo, check=True)
    dvc(repo, "init", "-q")
    (repo / ".dvc" / "config").write_text(REPO_DVC_CONFIG.read_text())  # hydra.enabled, as the project's
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "checkout"], cwd=repo, check=True)
    return repo


def test_project_enables_dvcs_hydra_composition():
    text = REPO_DVC_CONFIG.read_text()
    assert "[hydra]" in text and "enabled = true" in text


def test_overrides_of_profile_keys_take_effect_and_show_in_dvc(checkout):
    from flows.pipeline import pipeline_flow

    repo = checkout
    assert "  num_layers: 4\n" in (repo / "params.yaml").read_text()  # the tiny profile's depth

    # through the Prefect pipeline flow's `overrides` (what a UI-triggered run passes) → dvc exp run -S
    out = pipeline_flow(repo=str(repo), overrides=["dit.num_layers=2", "mllm.layers_used=2"], stages=["base_models"])
    assert [r["dvc"] for r in out["stages"]] == ["ran: base_models"]
    assert built_transformer(repo)["num_layers"] == 2  # what the stage built, not what a loader says
    diff = dvc(repo, "params", "diff", "--json").stdout
    assert json.loads(diff)["params.yaml"]["dit.num_layers"] == {"old": 4, "new": 2, "diff": -2}

    # a key that does not exist is refused by the composition, naming it; nothing runs
    bad = dvc(repo, "exp", "run", "-S", "dit.num_layerz=2", "base_models", check=False)
    assert bad.returncode != 0 and "dit.num_layerz" in bad.stderr + bad.stdout

    # -S profile=paper: the paper profile, whose base models are not here
    subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=repo, check=True)
    paper = dvc(repo, "exp", "run", "-S", "profile=paper", "base_models", check=False)
    assert paper.returncode != 0
    text = paper.stdout + paper.stderr
    assert "base models incomplete" in text and "(models.transformer)" in text
    assert "\nprofile: paper\n" in (repo / "params.yaml").read_text()


SWEEP_DAG = """\
stages:
  dit:
    cmd: python -c "import yaml; open('dit.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['dit']['ffn_dim']))"
    params: [dit]
    outs: [dit.txt]
"""


def test_a_queued_two_point_sweep_runs_both(tmp_path):
    """`dvc exp run --queue -S 'k=a,b'` (Hydra's sweep syntax over our conf/), `dvc queue start`,
    `dvc exp show`: the queue machinery is DVC's, so a one-line stage stands in for a real one."""
    import shutil

    repo = tmp_path / "sweep"
    shutil.copytree(REPO / "conf", repo / "conf")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(SWEEP_DAG)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"]):
        subprocess.run(cmd, cwd=repo, check=True)
    dvc(repo, "init", "-q")
    (repo / ".dvc" / "config").write_text(REPO_DVC_CONFIG.read_text())
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "sweep"], cwd=repo, check=True)

    dvc(repo, "exp", "run", "--queue", "-S", "dit.ffn_dim=256,384")
    dvc(repo, "queue", "start")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 240:
        status = dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(1)
    assert status.count("Success") == 2, status
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = [exp for rev in shown for group in (rev.get("experiments") or []) for exp in group["revs"]]
    assert sorted(e["data"]["params"]["params.yaml"]["data"]["dit"]["ffn_dim"] for e in exps) == [256, 384]
    assert all(e["data"]["params"]["params.yaml"]["data"]["stage1"]["steps"] == 1000 for e in exps)  # tiny's
