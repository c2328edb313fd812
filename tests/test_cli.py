"""The fastrnn command: bench (verify, then time), check, info."""

import json

import pytest

from fastrnn import backends, cli

from conftest import CPU_BACKENDS


def test_info_names_every_backend(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for name in ("numpy", "numba", "cuda"):
        assert name in text
    for reason in backends.why_absent().values():
        assert reason in text


def test_cuda_algorithm_option_sets_the_time_loop(monkeypatch, capsys):
    from fastrnn.backends import cuda
    monkeypatch.setattr(cuda, "_algorithm", "stepwise")
    assert cli.main(["check", "--cells", "rnn_tanh", "--backends", "numpy",
                     "--cuda-algorithm", "auto"]) == 0
    assert cuda.algorithm() == "auto"
    assert cli.main(["info"]) == 0
    assert "cuda time loop: auto" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["check", "--cuda-algorithm", "fast"])


def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check", "--cells", "gru", "--backends", *CPU_BACKENDS]) == 0
    text = capsys.readouterr().out
    assert "reset_after=False" in text
    assert f"{6 * len(CPU_BACKENDS)} passed, 0 failed" in text


def test_bench_writes_rows_with_the_documented_fields(tmp_path, capsys):
    path = tmp_path / "run.json"
    code = cli.main(["bench", "--sizes", "4x2x3x5", "--cells", "lstm", "gru", "--repeats", "2",
                     "--json", str(path)])
    assert code == 0
    data = json.loads(path.read_text())
    assert data["machine"]["cores"] >= 1 and data["gemm_peak_gflops"] > 0
    rows = data["rows"]
    contenders = {r["backend"] for r in rows}
    assert set(CPU_BACKENDS) <= contenders
    assert len(rows) == 2 * 2 * len(contenders)          # cells x modes x contenders
    for r in rows:
        for key in ("backend", "cell", "mode", "T", "B", "I", "H", "dtype", "median_ms",
                    "gflops"):
            assert key in r
        assert r["median_ms"] > 0 and r["gflops"] > 0
    assert "median ms" in capsys.readouterr().out


def test_bench_does_not_time_a_backend_that_fails_verification(monkeypatch, tmp_path, capsys):
    if "numba" not in CPU_BACKENDS:
        pytest.skip("needs a backend other than the reference")
    module = backends.get("numba").module
    good = module.lstm_forward

    def wrong(*args, **kwargs):
        out, h_n, c_n, cache = good(*args, **kwargs)
        return out * 1.01, h_n, c_n, cache

    monkeypatch.setattr(module, "lstm_forward", wrong)
    path = tmp_path / "run.json"
    code = cli.main(["bench", "--sizes", "3x2x3x4", "--cells", "lstm", "--backends", "numba",
                     "--repeats", "1", "--no-torch", "--json", str(path)])
    assert code == 1
    assert "FAILED, not timed" in capsys.readouterr().out
    assert json.loads(path.read_text())["rows"] == []


def test_bench_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--sizes", "10x2x3"])


def test_installed_package_ships_the_cuda_sources():
    """The wheel carries csrc/ (NVRTC compiles it where no fatbin matches)."""
    import importlib.resources
    from pathlib import Path

    import fastrnn
    package = Path(fastrnn.__file__).resolve().parent
    if (package.parent / "pyproject.toml").exists():
        pytest.skip("fastrnn is imported from a source checkout, not an installed package")
    shipped = importlib.resources.files("fastrnn") / "csrc"
    names = {p.name for p in shipped.iterdir()}
    assert {"fastrnn_common.cuh", "fastrnn_lstm.cu", "fastrnn_gru.cu", "fastrnn_rnn.cu"} <= names
