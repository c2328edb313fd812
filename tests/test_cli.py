"""The fastrnn command: bench (verify, then time), check, info."""

import json
import time

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
    if "numba" not in backends.why_absent():
        from fastrnn.backends import _simd
        assert f"{_simd.vector_width()}-lane vectors" in text   # the width this CPU gets


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
    assert "reverse=True" in text
    assert "zoneout=0.3" in text and "layernorm=True" in text
    assert f"{9 * len(CPU_BACKENDS)} passed, 0 failed, 0 not run" in text


def test_check_reports_what_a_backend_has_no_kernels_for(capsys, monkeypatch):
    """A configuration the backend refuses is listed as not run, not as a failure."""
    monkeypatch.setattr(cli, "check_configs",
                        lambda cells: iter([("gru", {"zoneout": 0.3, "reset_after": False}),
                                            ("gru", {})]))
    assert cli.main(["check", "--backends", "numba"]) == 0
    text = capsys.readouterr().out
    assert "not run (no kernels): numba gru: zoneout together with reset_after=False" in text
    assert "1 passed, 0 failed, 1 not run" in text


def test_bench_writes_rows_with_the_documented_fields(tmp_path, capsys):
    """The default protocol: one worker process per engine; every peer verified first."""
    path = tmp_path / "run.json"
    code = cli.main(["bench", "--sizes", "4x2x3x5", "--cells", "lstm", "gru", "--repeats", "2",
                     "--vs", "torch,onnxruntime,jax", "--json", str(path)])
    assert code == 0
    data = json.loads(path.read_text())
    assert data["machine"]["cores"] >= 1 and data["gemm_peak_gflops"] > 0
    assert data["protocol"] == "subprocess"
    rows = data["rows"]
    contenders = {r["backend"] for r in rows}
    assert set(CPU_BACKENDS) | {"torch", "onnxruntime", "jax"} <= contenders
    # fastrnn and torch and jax: both modes; onnxruntime: inference only
    assert len(rows) == 2 * (2 * (len(CPU_BACKENDS) + 2) + 1)
    for r in rows:
        for key in ("backend", "cell", "mode", "T", "B", "I", "H", "dtype", "median_ms",
                    "gflops", "peak_fraction"):
            assert key in r
        assert r["median_ms"] > 0 and r["gflops"] > 0
        assert r["peak_fraction"] <= 1.0          # a %peak above 100 is never printed
    assert all(v["passed"] for v in data["verified"].values())
    # the BLAS of every engine's process is recorded, and no forced kernel reached it
    for name, e in data["engines"].items():
        assert e["blas"] is not None and e["versions"]["numpy"], name
        assert e["env"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}, name
    fast = [r for r in rows if r["backend"] in CPU_BACKENDS]
    assert all({"torch", "onnxruntime"} <= set(r["speedup_vs"]) for r in fast
               if r["mode"] == "inference")
    assert "median ms" in capsys.readouterr().out


def test_bench_passes_pool_their_samples(tmp_path, monkeypatch):
    """``--passes 2``: the grid is timed twice over, each point's engines in a rotating
    order, and a row's median comes from both passes' samples."""
    from fastrnn.bench import runner
    asked = []
    real_ask = runner.LocalWorker.ask

    def ask(self, op, **request):
        if op == "time":
            asked.append((self.name, request["case"]["cell"], request["mode"]))
        return real_ask(self, op, **request)

    monkeypatch.setattr(runner.LocalWorker, "ask", ask)
    path = tmp_path / "run.json"
    code = cli.main(["bench", "--sizes", "3x2x3x4", "--cells", "rnn_tanh", "gru",
                     "--repeats", "2", "--passes", "2", "--backends", CPU_BACKENDS[0],
                     "--modes", "inference", "--no-torch", "--protocol", "inprocess",
                     "--json", str(path)])
    assert code == 0
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 2                              # one row a point, not one a pass
    assert all(r["samples"] == 4 for r in rows)        # 2 rounds of 1 run, twice
    assert len(asked) == 8 and asked[:4] == asked[4:]  # the grid, then the grid again


def test_bench_passes_rotate_and_drop_a_point_that_fails_in_any_pass(monkeypatch):
    """Two engines, two passes: each point's first engine differs between the passes, and
    an engine that fails at a point in the second pass gets no row there (its first pass's
    samples too), keeps its other rows, and is reported."""
    from fastrnn.bench import runner
    engines_ = [CPU_BACKENDS[0], "torch"]
    visits = []
    real_ask = runner.LocalWorker.ask

    def ask(self, op, **request):
        if op == "time":
            visits.append((self.name, request["case"]["cell"]))
            if self.name == "torch" and request["case"]["cell"] == "gru" and len(visits) > 4:
                raise runner.WorkerError("failed on purpose")
        return real_ask(self, op, **request)

    monkeypatch.setattr(runner.LocalWorker, "ask", ask)
    result = runner.run(engines_, ["rnn_tanh", "gru"], [(3, 2, 3, 4)], ["inference"],
                        "float32", 1, None, 1, "inprocess", log=lambda *a: None, passes=2)
    # 1 repeat: one round a point, so a visit is one ask per engine
    first = [visits[i][0] for i in range(0, len(visits), 2)]
    assert first[:2] != first[2:]                     # the leaders rotate between passes
    rows = {(r["backend"], r["cell"]) for r in result.rows}
    assert ("torch", "gru") not in rows
    assert {("torch", "rnn_tanh"), (engines_[0], "gru"), (engines_[0], "rnn_tanh")} <= rows
    assert "failed on purpose" in result.not_timed["torch"]


def test_bench_reports_an_absent_peer(tmp_path, capsys, monkeypatch):
    from fastrnn.bench import engines
    monkeypatch.setattr(engines.JaxEngine, "requires", ("a_module_that_is_not_there",))
    code = cli.main(["bench", "--sizes", "3x2x3x4", "--cells", "rnn_tanh", "--repeats", "1",
                     "--backends", CPU_BACKENDS[0], "--vs", "jax", "--protocol", "inprocess"])
    assert code == 0
    out = capsys.readouterr().out
    assert "jax" in out and "absent" in out and "a_module_that_is_not_there" in out


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
                     "--repeats", "1", "--no-torch", "--protocol", "inprocess",
                     "--json", str(path)])
    assert code == 1
    assert "FAILED, not timed" in capsys.readouterr().out
    assert json.loads(path.read_text())["rows"] == []


def test_blas_warning_names_the_variables(monkeypatch):
    from fastrnn import bench
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    info = [{"internal_api": "openblas", "architecture": "Haswell", "user_api": "blas"}]
    monkeypatch.setattr(bench.machine, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert "OPENBLAS_CORETYPE=Haswell" in bench.blas_warning(info)
    monkeypatch.setattr(bench.machine, "cpu_flags", lambda: {"avx2"})
    assert bench.blas_warning(info) is None
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    assert bench.blas_warning(info) is None


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


def test_bench_workers_warm_up_for_a_time_after_their_pause():
    """The timed calls start only after ``warmup_s`` of warm-up calls (and at least
    ``warmup`` of them): the wake-up after the settle pause is not timed."""
    from fastrnn.bench.worker import time_runs
    calls = []
    samples = time_runs(lambda: calls.append(time.perf_counter()), 3, None, warmup=1,
                        warmup_s=0.01)
    assert len(samples) == 3 and calls[-3] - calls[0] >= 0.0099 and len(calls) > 5
    calls.clear()
    assert len(time_runs(lambda: calls.append(0), 2, None, warmup=2)) == 2 and len(calls) == 4


def test_a_row_whose_samples_run_at_two_speeds_is_marked_noisy():
    """The quartiles of a row's samples: where the middle half spans more than NOISY_IQR of
    the median, the table marks the row, says why, and the summary names its worst point
    as noisy; steady samples are not marked."""
    from fastrnn.bench import report, runner
    from fastrnn.bench.cases import Case
    case = Case("lstm", 4, 2, 3, 5)
    steady = runner._row("numba", case, "inference", [1.0, 1.01, 0.99, 1.02, 1.0, 0.98], None)
    two_speeds = runner._row("numba", case, "inference", [1.0, 1.0, 1.0, 1.7, 1.7, 1.7], None)
    assert not steady["noisy"] and two_speeds["noisy"]
    assert steady["q1_ms"] <= steady["median_ms"] <= steady["q3_ms"]
    lines = []
    peer = runner._row("onnxruntime", case, "inference", [1.1] * 6, None)
    for ours in (steady, two_speeds):
        ours["speedup_vs"] = {"onnxruntime": peer["median_ms"] / ours["median_ms"]}
        peer["speedup_vs"] = {}
        lines.clear()
        report.print_table([ours, peer], ["onnxruntime"], out=lines.append)
        marked = ours["noisy"]
        assert (lines[1].split()[7].endswith("~")) == marked
        assert any(line.startswith("~ noisy") for line in lines) == marked
        assert ("noisy)" in report.summarize([ours, peer], "numba", ["onnxruntime"])) == marked
