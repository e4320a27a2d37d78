"""`dvc plots show` draws with no network: the repository's `.dvc/config` points
`plots.html_template` at `.dvc/plots/offline.html`, which inlines vega / vega-lite / vega-embed
(`loomcore.plots_template`). Checked with real DVC and a real headless Chromium whose network is
cut; DVC's own page (CDN scripts) draws nothing under the same conditions."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loomcore.config import REPO_ROOT
from loomcore.plots_template import TEMPLATE_PATH, render_template

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_committed_page_is_what_the_pinned_package_builds():
    committed = (REPO_ROOT / TEMPLATE_PATH).read_text(encoding="utf8")
    assert committed == render_template(), "run `loom plots-template` and commit .dvc/plots/offline.html"
    assert "{plot_divs}" in committed and "{scripts}" not in committed  # DVC's CDN tags have nowhere to go
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / ".dvc" / "config")
    assert REPO_ROOT / ".dvc" / cfg["plots"]["html_template"] == REPO_ROOT / TEMPLATE_PATH


def test_plots_template_check_fails_on_a_stale_page(tmp_path):
    page = tmp_path / "offline.html"
    loom = [sys.executable, "-m", "loomcore.cli", "plots-template", "--out", str(page)]
    missing = subprocess.run([*loom, "--check"], capture_output=True, text=True)
    assert missing.returncode == 1 and "missing" in missing.stderr
    assert subprocess.run(loom, capture_output=True, text=True).returncode == 0
    assert subprocess.run([*loom, "--check"], capture_output=True, text=True).returncode == 0
    page.write_text(page.read_text(encoding="utf8").replace("vega-embed", "vega-embedded", 1), encoding="utf8")
    stale = subprocess.run([*loom, "--check"], capture_output=True, text=True)
    assert stale.returncode == 1 and "differs" in stale.stderr


def _offline_dom(html: Path) -> str:
    """The DOM after the page's scripts ran, in headless Chromium with every host unresolvable and
    a dead proxy: nothing can come from the network."""
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", "--dump-dom", html.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary (apt-get install chromium)")
def test_dvc_plots_show_draws_offline_in_chromium(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]

    def run(*cmd):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True)

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    (repo / ".dvc" / "plots").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / TEMPLATE_PATH, repo / TEMPLATE_PATH)
    run(*dvc, "config", "plots.html_template", "plots/offline.html")  # as this repository's .dvc/config
    (repo / "loss.tsv").write_text("step\tloss\n" + "".join(f"{i}\t{1.0 / (i + 1):.4f}\n" for i in range(20)))
    (repo / "lr.tsv").write_text("step\tlr\n" + "".join(f"{i}\t3e-05\n" for i in range(20)))  # RL's constant lr

    run(*dvc, "plots", "show", "loss.tsv", "lr.tsv", "-o", "ours")
    dom = _offline_dom(repo / "ours" / "index.html")
    assert dom.count('class="mark-line') >= 2 and "role-axis" in dom, dom[-3000:]
    # the page's number format: vega took a tick's digits from the tick step, and a constant 3e-5
    # read "0" on its axis (a user took it for an RL stage that never trained)
    assert ">0.00003</text>" in dom, dom[-3000:]

    run(*dvc, "config", "--unset", "plots.html_template")  # DVC's own page: vega from a CDN
    run(*dvc, "plots", "show", "loss.tsv", "-o", "stock")
    assert "cdn.jsdelivr.net" in (repo / "stock" / "index.html").read_text()
    assert 'class="mark-line' not in _offline_dom(repo / "stock" / "index.html")
