"""The benchmarks' command lines refuse a bad value before anything runs: one argparse line naming
the flag (exit 2), not a traceback, a division by zero or a table of zeros after the run — and the
shared helpers they use. Nothing here runs a benchmark."""

import pytest
import torch

import benchmarks
from benchmarks import at_least, cpu_name, output_file
from benchmarks import checkpoint_io, cpu_numerics, data_throughput, edit_overhead, exit_soak, gpu_paper_scale
from benchmarks import packed_attention, s3_mirror_rerun, train_throughput


def refused(capsys, main, argv, *words):
    """main(argv) stops with an argparse error whose one line names each of `words`."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("python -m benchmarks.") and ": error: " in line, line
    for word in words:
        assert word in line, line
    return line


@pytest.mark.parametrize("main, argv, flag", [
    (train_throughput.main, ["--stages"], "--stages"),  # measured nothing and exited 0
    (train_throughput.main, ["--stages", "bogus"], "--stages"),  # ConfigError traceback
    (train_throughput.main, ["--paper-layers", "-2"], "--paper-layers"),  # silently ran the CPU benchmark
    (data_throughput.main, ["--samples", "0"], "--samples"),  # ConfigError naming data.synthetic_samples
    (s3_mirror_rerun.main, ["--objects", "0"], "--objects"),  # a table of zeros
    (checkpoint_io.main, ["--profile", "bogus"], "--profile"),  # ConfigError traceback
    (checkpoint_io.main, ["--repeats", "0"], "--repeats"),  # UnboundLocalError
    (exit_soak.main, ["--runs", "0"], "--runs"),  # ZeroDivisionError
    (exit_soak.main, ["--runs", "1", "--nproc", "0"], "--nproc"),  # counted as a pass
    (cpu_numerics.main, ["--steps", "0"], "--steps"),  # made-up tokens/s
    (packed_attention.main, ["--repeats", "0"], "--repeats"),  # a median of nothing
])
def test_counts_and_choices_are_refused(capsys, main, argv, flag):
    refused(capsys, main, argv, flag)


@pytest.mark.parametrize("argv, flag", [
    (["--train", "--layers", "99"], "--layers"),  # ValueError traceback
    (["--edit", "--video", "0x0x0"], "--video"),  # failed deep in packing
    (["--edit", "--video", "10x64x96"], "--video"),  # frames the codec does not take
    (["--edit", "--set", "dit.num_layers=-1"], "--set"),  # ConfigError traceback
])
def test_gpu_paper_scale_checks_against_the_config_first(capsys, argv, flag):
    refused(capsys, gpu_paper_scale.main, [*argv, "--tiny", "--device", "cpu"], flag)


@pytest.mark.parametrize("main, argv", [
    (gpu_paper_scale.main, ["--edit", "--tiny", "--device", "cpu", "--json"]),  # failed after the run
    (edit_overhead.main, ["--tiny", "--json"]),
    (train_throughput.main, ["--out"]),
    (packed_attention.main, ["--out"]),
])
def test_an_output_file_in_a_missing_folder_is_refused_up_front(capsys, tmp_path, main, argv):
    refused(capsys, main, [*argv, str(tmp_path / "missing" / "x.json")], argv[-1], "no folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA paper scale runs")
def test_gpu_paper_scale_leaves_no_temp_folder_when_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_paper_scale.main(["--edit"])
    assert list(tmp_path.iterdir()) == []


def test_cpu_numerics_refuses_an_unknown_branch_and_a_duplicate(capsys):
    refused(capsys, cpu_numerics.main, ["--settings", "default", "AVX3"], "--settings", "AVX3")
    refused(capsys, cpu_numerics.main, ["--settings", "AVX2", "COMPATIBLE", "avx2"], "--settings", "AVX2")
    assert cpu_numerics.setting("avx512_e1,strict") == "AVX512_E1,STRICT"


def test_exit_soak_says_what_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tiny models or cache here (the config's paths are relative)
    with pytest.raises(SystemExit, match="dvc repro cache"):
        exit_soak.main(["--runs", "1"])


def test_shared_helpers(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Test CPU\n")
    monkeypatch.setattr(benchmarks, "CPUINFO", info)
    assert cpu_name() == "Intel(R) Xeon(R) Test CPU" and benchmarks.cpuinfo("vendor_id") == "GenuineIntel"
    monkeypatch.setattr(benchmarks, "CPUINFO", tmp_path / "absent")
    assert cpu_name()  # the architecture, where the kernel does not say
    assert at_least(0)("0") == 0
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(Exception, match=">= 0"):
            at_least(0)(bad)
    assert output_file(str(tmp_path / "x.json")) == tmp_path / "x.json"
    with pytest.raises(Exception, match="is a folder"):
        output_file(str(tmp_path))
