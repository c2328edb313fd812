"""A probe of the CPUs a packed loop's call ran on, loaded into every benchmark worker
through ``PYTHONPATH`` (Python imports ``sitecustomize`` at start-up):

    FASTRNN_PROBE=50x16 PYTHONPATH=bench/probe_cpus env -u OPENBLAS_CORETYPE \\
        -u OPENBLAS_L2_SIZE fastrnn bench --backends numba --cells lstm \\
        --sizes 100x64x256x256,50x16x128x128 --repeats 7 --passes 2

Each worker that runs ``packed_numba._run`` at T x B = ``FASTRNN_PROBE`` writes, at exit,
``/tmp/fastrnn-probe-<pid>.json``: per call ``[ms, threads, by rows, the caller's CPU
before, after, the worker's CPU left out, the worker's affinity, time]``. Session 15 found
with it that the slow calls of LSTM 50x16x128x128 (3-7 ms instead of 1.2) were those whose
caller had moved onto the CPU its worker was pinned to
(``bench/results/2026-12-06-probe-cpus-session15.txt``).
"""

import os

if os.environ.get("FASTRNN_PROBE"):
    import atexit
    import json
    import time

    from fastrnn.backends import _hotpool
    from fastrnn.backends import packed_numba as pk

    _T, _B = (int(n) for n in os.environ["FASTRNN_PROBE"].split("x"))
    _log = []
    _real = pk._run

    def _run(n, x, *args, by_rows=False, panels_ih=None):
        if x.shape[:2] != (_T, _B):
            return _real(n, x, *args, by_rows=by_rows, panels_ih=panels_ih)
        before = pk._current_cpu()
        start = time.perf_counter()
        result = _real(n, x, *args, by_rows=by_rows, panels_ih=panels_ih)
        ms = (time.perf_counter() - start) * 1e3
        w = _hotpool._workers[0] if _hotpool._workers else None
        _log.append([round(ms, 3), n, by_rows, before, pk._current_cpu(), getattr(w, "off", None),
                     sorted(os.sched_getaffinity(w.thread.native_id)) if w else None, time.time()])
        return result

    pk._run = _run

    def _dump():
        if _log:
            with open(f"/tmp/fastrnn-probe-{os.getpid()}.json", "w") as f:
                json.dump(_log, f)

    atexit.register(_dump)
