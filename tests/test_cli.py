"""The `loom` console entry point."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loomcore.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_subcommands():
    out = subprocess.run([Path(sys.executable).parent / "loom", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("config", "init-models", "import-release", "pipeline"):
        assert name in out
    assert "examples:" in out


def test_pipeline_help_says_what_it_runs_holds_and_does_on_a_signal_and_its_examples_parse(capsys):
    out = subprocess.run([Path(sys.executable).parent / "loom", "pipeline", "--help"], capture_output=True, text=True,
                         check=True).stdout
    text = " ".join(out.split())
    for said in ("dvc exp run -S", "checkout's lock", "Ctrl-Z pauses", "exit 128 + the signal", "kill -9"):
        assert said in text, said
    examples = [line.split("#")[0].split()[2:] for line in out.split("examples:")[1].splitlines() if "loom pipeline" in line]
    assert len(examples) == 4
    for args in examples:  # each parses, and its config loads (what `loom pipeline` checks before DVC starts)
        ns = build_parser().parse_args(["pipeline", *args])
        assert main(["config", "--check", *(["--profile", ns.profile] if ns.profile else []), *ns.overrides]) == 0, args


def test_config_prints_yaml_section(capsys):
    assert main(["config", "--profile", "paper", "stage1"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["stage1"]["max_tokens"] == 10240 and d["stage1"]["sampling"]["t2i"] == 0.8


def test_config_override_and_refusal(capsys):
    assert main(["config", "--check", "stage1.steps=10"]) == 0
    assert "config OK (profile tiny" in capsys.readouterr().out
    assert main(["config", "stage1.optimizer.lr=-1"]) == 2
    assert "the learning rate must be positive" in capsys.readouterr().err


def test_config_names_the_sections_when_asked_for_an_unknown_one(capsys):
    assert main(["config", "nosuch"]) == 2  # a user's mistake: one line, exit 2
    assert "loom config: no section 'nosuch'; sections: profile, seed, paths" in capsys.readouterr().err


def test_parser_has_every_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"config", "init-models", "import-release", "pipeline"} <= set(sub.choices)


def _bad_checkpoint(tmp_path, kind):
    import torch

    path = tmp_path / f"{kind}.pth"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    elif kind == "list":
        torch.save([1, 2], path)
    return path


@pytest.mark.parametrize("kind, needle", [
    ("text", "is not a PyTorch checkpoint torch.load can read"),
    ("empty", "is empty (0 bytes)"),
    ("png", "is not a plain tensor state dict (refused by weights_only"),
    ("list", "holds list, expected a dict of tensors"),
    ("missing", "missing.pth: no such file"),
])
def test_import_release_refuses_a_wrong_file_in_one_line(tmp_path, capsys, kind, needle):
    path = _bad_checkpoint(tmp_path, kind)
    code = main(["import-release", str(path), str(tmp_path / "out"), "--profile", "tiny"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("loom import-release: checkpoint: ") and needle in err, err
    assert not (tmp_path / "out").exists()


def test_pipeline_overrides_run_as_a_dvc_experiment():
    """`loom pipeline k=v` used to validate the override and then run plain `dvc repro`, which
    ignored it; now it is `dvc exp run -S k=v` (DVC composes params.yaml with it)."""
    from loomcore.cli import pipeline_command

    assert pipeline_command([], []) == ["dvc", "repro"]
    assert pipeline_command([], ["stage1"]) == ["dvc", "repro", "stage1"]
    assert pipeline_command(["profile=paper", "stage1.steps=5"], ["stage1"]) == [
        "dvc", "exp", "run", "-S", "profile=paper", "-S", "stage1.steps=5", "stage1"]


def test_an_experiment_runs_the_profile_params_yaml_names_composed_as_dvc_composes_it(tmp_path):
    """DVC composes conf/ with the -S values alone, whose default profile is conf/config.yaml's: on a
    checkout made paper by `loom params profile=paper` (README's Prefect set-up), `loom pipeline
    stage3.steps=300` was checked and announced as paper and ran tiny (a helper's review: DVC's own
    composition wrote `profile: tiny`). The profile is named in the -S values; the check composes
    conf/ for it, leaving out what an earlier experiment left in params.yaml, as DVC does."""
    from loomcore.config import ConfigError, compose, experiment_sets, load_config, params_yaml

    params = tmp_path / "params.yaml"
    params.write_text(params_yaml(overrides=["profile=paper", "stage3.steps=77"]))  # an experiment's leftover
    assert experiment_sets(None, ["stage3.steps=300"], params) == ["profile=paper", "stage3.steps=300"]
    assert experiment_sets("tiny", ["seed=1"], params) == ["profile=tiny", "seed=1"]
    assert experiment_sets(None, ["profile=tiny", "seed=1"], params) == ["profile=tiny", "seed=1"]
    assert experiment_sets("tiny", ["params.yaml:profile=tiny"], params) == ["params.yaml:profile=tiny"]
    with pytest.raises(ConfigError, match=r"--profile paper and the override 'profile=tiny' name two profiles"):
        experiment_sets("paper", ["profile=tiny"], params)
    with pytest.raises(ConfigError, match=r"--profile paper and the override 'profile=tiny' name two profiles"):
        load_config(["profile=tiny"], profile="paper")  # (`loom config --profile paper profile=tiny` said paper)
    params.write_text("profile: [paper\n")  # unreadable: no profile named (load_config says what is wrong)
    assert experiment_sets(None, ["seed=1"], params) == ["seed=1"]
    # what the experiment runs is what the check loads: conf/'s paper composition with the sets
    params.write_text(params_yaml(overrides=["profile=paper", "stage3.steps=77"]))
    sets = experiment_sets(None, ["stage3.steps=300"], params)
    cfg = load_config(sets, params_path=params, composed=True)
    assert cfg.profile == "paper" and cfg.stage3.steps == 300
    assert load_config(["seed=5"], params_path=params, composed=True).stage3.steps == compose(overrides=["profile=paper"])["stage3"]["steps"]
    assert load_config(["seed=5"], params_path=params).stage3.steps == 77  # (`dvc repro`: params.yaml as it is)


def test_pipeline_refuses_an_unknown_target_before_starting_anything(capsys):
    """A typo in --target is named with the stages there are, exit 2 — not a Prefect server started
    for DVC's own "Stage not found" (exit 255)."""
    code = main(["pipeline", "--target", "stage1", "--target", "nosuchstage"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("loom pipeline: --target nosuchstage: no such stage in dvc.yaml; stages: base_models, ")


@pytest.mark.parametrize("argv, needle", [
    # DVC's own target syntax (`dvc repro dvc.yaml:stage1`) was refused as "no such stage"; the
    # unknown target after it shows it passed (the targets are checked together, before anything runs)
    (["--target", "dvc.yaml:stage1", "--target", "./dvc.yaml", "--target", "nosuch"], "--target nosuch: no such stage"),
    (["--target", "dvc.yaml:nosuch"], "--target dvc.yaml:nosuch: no such stage"),
    # overrides as `dvc exp run -S` takes them (the Prefect pipeline flow's check reads them so):
    # Hydra's ++key= and DVC's params.yaml: prefix were refused as unknown keys '++stage1' / 'params'
    (["++stage1.steps=5", "params.yaml:stage1.log_every=2", "params.yaml:++seed=3", "--target", "nosuch"],
     "--target nosuch: no such stage"),
    (["++stage1.stepz=5"], "override '++stage1.stepz=5': unknown key"),  # (named as written)
    (["params.yaml:stage1.steps=x"], "override 'params.yaml:stage1.steps=x'"),
    (["+stage1.steps=5"], "override '+stage1.steps=5': `+` adds a key, and stage1.steps exists (DVC refuses it)"),
    # what DVC would run otherwise than loom reports (its header named a config DVC did not compose)
    (["++profile=paper"], "override '++profile=paper': Hydra cannot force-add the config group profile"),
    (["./params.yaml:profile=paper"], "DVC edits ./params.yaml in place, outside Hydra's composition"),
    (["~stage1.steps"], "override '~stage1.steps': a key deleted from params.yaml fails every stage"),
    (["dvc.yaml:seed=3"], "override 'dvc.yaml:seed=3': the DAG reads params.yaml alone"),
    (["data.source=a,b"], "override 'data.source=a,b': a sweep: one run takes one value"),  # (DVC refuses it)
    (["params.yaml:+stage1.stepz=1"], "override 'params.yaml:+stage1.stepz=1': unknown key"),
    # a per-resolution key: Hydra's grammar takes no segment that begins with a digit (the whole
    # mapping is how DVC sets it; the Hydra parser's own words said nothing of the sort)
    (["video.frames.480p=5"], "override 'video.frames.480p=5': Hydra's keys cannot begin with a digit ('480p'): "
                              "give video.frames whole, its other entries as they are, e.g. "
                              "'video.frames={480p: 5, …}' (`loom config video` shows them)"),
    (["video.frames={256p: 33, 480p: 9, 720p: 121}", "--target", "nosuch"], "--target nosuch: no such stage"),
    (["params.yaml:++video.frames.480p=5"], "give video.frames whole, its other entries as they are, e.g. "
                                            "'video.frames={480p: 5, …}' (`loom config video` shows them)"),
    # a reward none registered: refused before DVC starts (RL refused it after stages 1–3 had trained)
    (["rl.reward=pickscor"], "rl.reward = 'pickscor': unknown reward; registered: pickscore, shapes"),
])
def test_pipeline_reads_targets_and_overrides_as_dvc_does(capsys, argv, needle):
    code = main(["pipeline", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--fps", "-3"], "--fps -3.0: expected > 0"),
    (["--fps", "0"], "--fps 0.0: expected > 0"),  # (was taken as "the default")
    (["--device", "bogus"], "--device bogus: expected cpu, cuda or cuda:N"),
    (["--seed", "-1"], "--seed -1: expected 0 …"),
    (["--seed", str(2 ** 63)], f"--seed {2 ** 63}: expected 0 …"),
    (["--height", "-8"], "--height -8: expected >= 1"),
    (["--out-under-a-file"], "is a file, not a folder"),
    (["--transformer", "PIPELINE"], "an exported pipeline (it has model_index.json): give it as --model"),
    (["--transformer", "EMPTY"], "no config.json"),
    (["--source", "EMPTY"], "EMPTY: a folder, not a file"),  # was "no such file"
    (["--prompts", "EMPTY"], "EMPTY: a folder, not a file"),
    (["--model", "AFILE"], "AFILE: a file; an exported pipeline is a folder"),  # was "no such folder"
    (["--model", "EMPTY"], "EMPTY: no model_index.json (an exported pipeline's folder, export.out_dir)\n"),
    (["--model", "DIT"], "no model_index.json (an exported pipeline's folder, export.out_dir; a DiT's folder is "
                         "given as --transformer)"),
    # a broken file inside a model folder, named (diffusers' JSONDecodeError / OSError tracebacks before)
    (["--transformer", "BADJSON"], "BADJSON/config.json is not valid JSON (Expecting property name enclosed in "
                                   "double quotes at line 1 column 2)"),
    (["--transformer", "BADWEIGHTS"], "BADWEIGHTS/diffusion_pytorch_model.safetensors is not a readable "
                                      "safetensors file (Error while deserializing header"),
    (["--model", "BADPIPE"], "BADPIPE/transformer/config.json is not valid JSON"),
    (["--fps", "inf"], "--fps inf: expected > 0 and at most 1000"),  # (av's OverflowError after generating)
    (["--device", "meta"], "--device meta: expected cpu, cuda or cuda:N"),  # (mps, meta: after the models load)
    (["--transformer", "AFILE"], "AFILE: a file, but not a release weights file (.pth, .pt, .bin, .safetensors)"),
    (["--model", "PIPELINE", "guidance.steps=3"], "an exported pipeline carries its own config, so guidance.steps=3 "
                                                  "would not apply"),  # (was ignored, an invalid key too)
    # botocore's NoCredentialsError alone; beside the suite's S3 server (its environment) a NoSuchBucket
    (["--model", "s3://loom-no-bucket/model"], ("loom generate: --model s3://loom-no-bucket/model: Unable to locate "
                                                 "credentials", "loom generate: --model s3://loom-no-bucket/model: An "
                                                 "error occurred (NoSuchBucket)")),
] + ([(["--device", "cuda"], "--device cuda: no CUDA device here")] if not __import__("torch").cuda.is_available() else []))
def test_generate_refuses_bad_flags_before_any_model_loads(tmp_path, capsys, monkeypatch, argv, needle):
    """Mistakes found by a newcomer's probe, each a traceback before (some after the whole generation,
    writing the file) or a message naming the wrong thing: now one line naming the flag, exit 2,
    before a model loads."""
    out = tmp_path / "a.mp4"
    if argv == ["--out-under-a-file"]:
        (tmp_path / "afile").write_text("x")
        out, argv = tmp_path / "afile" / "a.mp4", []
    for folder, files in {"PIPELINE": {"model_index.json": "{}"}, "EMPTY": {}, "DIT": {"config.json": "{}"},
                          "BADJSON": {"config.json": "{'single': 'quotes'}"},
                          "BADWEIGHTS": {"config.json": "{}", "diffusion_pytorch_model.safetensors": "x" * 64},
                          "BADPIPE": {"model_index.json": "{}", "transformer/config.json": '{"a": 1,'}}.items():
        (tmp_path / folder).mkdir()
        for name, text in files.items():
            (tmp_path / folder / name).parent.mkdir(exist_ok=True)
            (tmp_path / folder / name).write_text(text)
    (tmp_path / "AFILE").write_text("x")
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # (no credentials anywhere: the s3:// case)
    prompt = [] if "--prompts" in argv else ["--prompt", "x"]
    assert main(["generate", *prompt, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert any(n in err for n in ([needle] if isinstance(needle, str) else needle)) and "Traceback" not in err, err


def test_config_check_refuses_an_unknown_section_as_printing_does(capsys):
    """`loom config stage1.steps 10 --check` (the = forgotten) said "config OK"."""
    assert main(["config", "stage9", "--check"]) == 2
    assert "no section 'stage9'" in capsys.readouterr().err


def test_deploy_says_when_nothing_answers_at_the_api_url(monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    assert main(["deploy"]) == 1
    assert f"nothing answers at PREFECT_API_URL=http://127.0.0.1:{port}/api" in capsys.readouterr().err


def test_plan_refuses_a_pack_larger_than_it_traces_before_tracing_it(capsys):
    """stage1.max_tokens=10⁹ (a typo) grew the plan's host memory past 14 GB before answering."""
    assert main(["plan", "--profile", "paper", "stage2.max_tokens=1000000000", "--stage", "stage1", "stage2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loom plan: stage2.max_tokens = 1,000,000,000: more than the plan traces (16,777,216 tokens")


def test_plan_refuses_a_context_below_one(capsys):
    assert main(["plan", "--context", "0"]) == 2  # (a traceback from the memory model before)
    assert "--context 0: expected >= 1" in capsys.readouterr().err


def test_import_release_refuses_a_file_for_its_output_folder(tmp_path, capsys):
    given = tmp_path / "out.safetensors"  # the likely mistake: a file name where the folder goes
    given.write_text("x")
    assert main(["import-release", str(tmp_path / "release.safetensors"), str(given)]) == 2
    assert f"out_dir {given}: {given} is a file, not a folder" in capsys.readouterr().err


def test_params_refuses_a_bare_value_and_a_folder_and_names_a_bad_override(tmp_path, capsys):
    assert main(["params", "=3", "--out", str(tmp_path / "p.yaml")]) == 2  # (Hydra's traceback before)
    assert "override '=3': expected key=value" in capsys.readouterr().err
    assert main(["params", "--out", str(tmp_path)]) == 2  # (IsADirectoryError, and a .tmp left beside it)
    assert f"--out {tmp_path}: a folder" in capsys.readouterr().err and not list(tmp_path.parent.glob("*.tmp"))
    assert main(["params", "stage1.steps=[1,2]", "--out", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err  # named by the override, not by the temporary file it was checked in
    assert "override 'stage1.steps=[1,2]': key 'stage1.steps': expected int" in err and "params.yaml" not in err, err
    # Hydra's own words, cut to a line, gave no reason ("Could not override 'stage1.stepz'.")
    assert main(["params", "stage1.stepz=5", "--out", str(tmp_path / "p.yaml")]) == 2
    assert "override 'stage1.stepz=5': unknown key 'stage1.stepz' (did you mean 'stage1.steps'?)" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_every_command_runs_in_the_checkout_it_is_started_in(tmp_path, monkeypatch, capsys):
    """`loom config`, `params`, `plan` … read the params.yaml and conf/ of the checkout that holds the
    current folder, as `loom pipeline` and DVC do (they read the installed package's: `loom config
    --check` passed a file other than the one the DAG runs)."""
    import shutil

    checkout = tmp_path / "checkout"
    (checkout / "sub").mkdir(parents=True)
    shutil.copytree(REPO / "conf", checkout / "conf")
    shutil.copy(REPO / "dvc.yaml", checkout / "dvc.yaml")
    params = (REPO / "params.yaml").read_text()
    assert "\n  steps: 1000\n" in params
    (checkout / "params.yaml").write_text(params.replace("\n  steps: 1000\n", "\n  steps: 7777\n", 1))
    monkeypatch.chdir(checkout / "sub")
    assert main(["config", "stage1"]) == 0 and "steps: 7777" in capsys.readouterr().out
    assert main(["params", "--check"]) == 1  # its own params.yaml, against its own conf/
    err = capsys.readouterr().err
    assert err.startswith(f"{checkout / 'params.yaml'}: differs from the composition of {checkout / 'conf'}"), err
    assert main(["params", "--check", "--out", "../params.yaml"]) == 1  # the advice repeats --out
    assert f"run `loom params --out {checkout / 'params.yaml'} profile=tiny`" in capsys.readouterr().err
    (checkout / "dvc.yaml").write_text("stages:\n  a: [\n")
    assert main(["pipeline"]) == 2  # (yaml's ScannerError traceback)
    assert f"loom pipeline: {checkout / 'dvc.yaml'}: not valid YAML" in capsys.readouterr().err


def test_plan_takes_an_override_after_its_list_options(capsys):
    """`loom plan --gpu H20 stage1.max_tokens=2048` took the override for a GPU name ("unknown GPU")."""
    assert main(["plan", "--profile", "paper", "--stage", "stage1", "--gpus", "8", "stage1.max_tokens=2048"]) == 0
    assert "| stage1 | 8 | 2,048 |" in capsys.readouterr().out


def test_params_and_plots_template_refuse_an_out_they_cannot_write(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["params", "--out", str(tmp_path / "afile" / "p.yaml")]) == 2
    assert "--out " in (err := capsys.readouterr().err) and "is a file, not a folder" in err and "Traceback" not in err
    assert main(["plots-template", "--out", str(tmp_path)]) == 2  # (IsADirectoryError, and a stray .tmp beside)
    assert "a folder; give the file to write" in capsys.readouterr().err and not list(tmp_path.parent.glob("*.tmp"))
    binary = tmp_path / "w.bin"
    binary.write_bytes(bytes(range(256)))
    assert main(["params", "--check", "--out", str(binary)]) == 1  # (UnicodeDecodeError)
    assert "differs from the composition" in capsys.readouterr().err


def test_pipeline_refuses_params_dvc_would_not_run(capsys):
    assert main(["pipeline", "--params", "other.yaml"]) == 2
    assert "loom pipeline: --params: DVC runs the checkout's params.yaml" in capsys.readouterr().err


def test_generate_leaves_config_keys_and_paths_as_they_are(tmp_path, capsys):
    """The pipeline's argument names are put in the CLI's terms (num_frames → --frames), but not inside
    a config key or a path: `guidance.mllm_layout=foo` was told as `guidance.--layout`, an --out under
    a folder num_frames/ as `--frames/`."""
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "a.png"), "guidance.mllm_layout=foo"]) == 2
    assert "guidance.mllm_layout" in (err := capsys.readouterr().err) and "--layout" not in err, err
    (tmp_path / "num_frames").mkdir()
    (tmp_path / "num_frames" / "x.png").write_bytes(b"")
    assert main(["generate", "--prompt", "x", "--frames", "1", "--out", str(tmp_path / "num_frames" / "x.png")]) == 2
    assert f"{tmp_path}/num_frames/x.png: exists" in capsys.readouterr().err


def test_params_leaves_another_dvc_projects_params_alone(tmp_path, monkeypatch, capsys):
    """A folder with dvc.yaml and params.yaml but no conf/ is another DVC project: `loom params` there
    would have replaced its params.yaml with this composition."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("lr: 0.1\n")
    monkeypatch.chdir(tmp_path)
    assert main(["params"]) == 2
    assert "has dvc.yaml and params.yaml but no conf/: not a loomvideo checkout" in capsys.readouterr().err
    assert (tmp_path / "params.yaml").read_text() == "lr: 0.1\n"


def test_generate_names_the_folder_a_relative_path_was_taken_from(tmp_path, monkeypatch, capsys):
    """Outside a checkout the command runs in the package's; its message named that folder as the one
    a relative path is taken from, not the user's."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "x", "--transformer", "nope", "--out", "a.png"]) == 2
    err = capsys.readouterr().err
    assert f"--transformer {tmp_path}/nope: no such folder" in err, err
    assert f"taken from the current folder, {tmp_path})" in err, err


def test_generate_refuses_what_it_could_only_fail_at_after_the_models_load(tmp_path, capsys):
    """A review's finds: a frame count the codec does not take was refused once the paper profile's
    MLLM and DiT had loaded (minutes), five frames asked into a .png only after generating them, and
    .webm accepted, then av's ValueError after the whole generation (its encoders are H.264/MPEG-4)."""
    import numpy as np

    from loomcore.data.video_io import write_image

    write_image(tmp_path / "r.png", np.zeros((16, 16, 3), np.uint8))
    codec4 = ["codec.temporal_factor=4", "guidance.frames=5", *(f"video.frames.{r}=5" for r in ("256p", "480p", "720p"))]
    for argv, needle in (
        (["--frames", "6", "--out", tmp_path / "a.mp4", *codec4], "--frames 6: this model takes 1 + 4·k frames (e.g. 5 or 9)"),
        (["--frames", "6", "--ref", tmp_path / "r.png", "--out", tmp_path / "a.mp4", *codec4], "--frames 6: this model"),
        (["--frames", "5", "--out", tmp_path / "a.png"], "a.png: a .png holds one frame, but the output is a video of 5"),
        (["--out", tmp_path / "a.webm"], "unsupported output type '.webm'"),
    ):
        assert main(["generate", "--prompt", "x", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]


def test_a_prompts_file_saved_with_a_bom_reads_as_its_text(tmp_path):
    """Notepad's UTF-8 starts with U+FEFF: the file's first line, a # comment, became a prompt."""
    from loomcore.cli import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("# shapes\na red circle\n", encoding="utf-8-sig")
    assert read_prompts(str(path)) == [(2, "a red circle")]


def test_import_release_and_plan_refuse_overrides_they_would_ignore(tmp_path, capsys):
    """`loom import-release ckpt out export.dtype=float16` wrote float32 weights and said nothing;
    `loom plan … eval.steps=3` alike. Like init-models and deploy, they name the keys they read."""
    assert main(["import-release", str(tmp_path / "ckpt"), str(tmp_path / "out"), "export.dtype=float16"]) == 2
    assert "override 'export.dtype=float16': loom import-release reads only profile, dit, mllm, rope, flow, s3" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["plan", "--gpus", "1", "eval.steps=3"]) == 2
    assert "override 'eval.steps=3': loom plan reads only profile, dit, " in capsys.readouterr().err


def test_help_shows_what_runs_and_no_option_the_command_refuses(capsys):
    """`loom pipeline --help` and `loom node --help` listed `--params PARAMS`, which both refuse;
    the rank entry points' help stopped at "…starts on every rank:", before the command line."""
    from loomcore.rl.__main__ import main as rl_main
    from loomcore.train.cli import main as train_main

    for command in ("pipeline", "node"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--params" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["config", "--help"])
    assert "--params PARAMS" in capsys.readouterr().out
    for entry, line in ((train_main.__wrapped__, "torchrun --nnodes N --nproc-per-node G -m loomcore.train --stage stage2"),
                        (rl_main.__wrapped__, "torchrun --nnodes N --nproc-per-node G -m loomcore.rl [--profile P]")):
        with pytest.raises(SystemExit):  # (torch's @record, unwrapped: it swallows the exit)
            entry(["--help"])
        assert line in capsys.readouterr().out


def test_params_rebuilds_a_missing_or_broken_params_yaml(tmp_path, monkeypatch, capsys):
    """`loom params` (and --check) must work where params.yaml is gone or does not parse (a merge
    conflict's markers): checking the overrides read it first and refused (a review of this change)."""
    import shutil

    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "conf", checkout / "conf")
    shutil.copy(REPO / "dvc.yaml", checkout / "dvc.yaml")
    monkeypatch.chdir(checkout)
    assert main(["params"]) == 0 and (checkout / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    (checkout / "params.yaml").write_text("<<<<<<< HEAD\n" + (REPO / "params.yaml").read_text())
    assert main(["params", "--check"]) == 1 and "differs from the composition" in capsys.readouterr().err
    assert main(["params"]) == 0 and (checkout / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
