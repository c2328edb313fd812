"""Whether the machine code Numba makes for the packed loops depends on Python's string
hash seed (``PYTHONHASHSEED``, random per process unless set): each seed compiles the
package into a Numba cache of its own, then frozen LSTM inference is timed from each cache
in alternating fresh processes (the bench's protocol: a 0.2 s pause, 20 ms of warm-up,
then one timed call; medians).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/hashseed.py [--seeds 0 1 2 3]
        [--rounds 4] [--audit]

For each seed: the sizes of the compiled ``_recurrent`` functions (the micro-kernel's
loops) in the cached object code of ``packed_numba.cell_thread``, and the times. Session
10 found two variants of ``_recurrent`` (0x4f42 and 0x5564 bytes, one per seed) and the
same sources running 0.85-0.89x from one checkout's cache against another's.

``--audit`` (no timing): each seed's cache gets every kernel ``fastrnn.warmup()`` compiles
(about a minute a seed), and the sizes of the functions in their cached object code are
compared across the seeds, function by function (symbols without their ABI tags, which
carry per-process counters). A function whose size differs between seeds was compiled
differently: the check session 11 ran over every kernel after session 10's fix. For each
such function the audit also compares its disassembly under each seed with the first
seed's: the symbols it references (calls, NRT's reference counts, constants) and how many
instructions of each mnemonic it has.
"""

import argparse
import collections
import glob
import os
import pickletools
import re
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import sys, time
import numpy as np
import fastrnn
cases = [("lstm", 100, 64, 256, 256), ("lstm", 200, 1, 64, 64)]
out = []
for cell, T, B, I, H in cases:
    m = fastrnn.make_layer(cell, I, H, backend="numba", seed=0).eval().freeze()
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    m(x)
    ts = []
    for _ in range(9):
        time.sleep(0.2)
        t1 = time.perf_counter()
        while time.perf_counter() - t1 < 0.02:
            m(x)
        t0 = time.perf_counter()
        m(x)
        ts.append(time.perf_counter() - t0)
    out.append(float(np.median(ts)))
print(" ".join(map(str, out)))
"""


def _strip_abi_tags(symbol):
    """An Itanium-mangled name without its ABI tags (``B<length><chars>``): Numba's carry
    per-process counters, the rest (the function's name and argument types) is stable."""
    out, i = [], 0
    while i < len(symbol):
        if symbol[i] == "B" and symbol[i + 1:i + 2].isdigit():
            j = i + 1
            while j < len(symbol) and symbol[j].isdigit():
                j += 1
            i = j + int(symbol[i + 1:j])
            continue
        out.append(symbol[i])
        i += 1
    return "".join(out)


def _objects(cache_dir):
    """``(cache file, object index, ELF bytes)`` of every object in a Numba cache."""
    for path in sorted(glob.glob(os.path.join(cache_dir, "**", "*.nbc"), recursive=True)):
        objects = [arg for _, arg, _ in pickletools.genops(open(path, "rb").read())
                   if isinstance(arg, bytes) and arg[:4] == b"\x7fELF"]
        for k, obj in enumerate(objects):
            yield os.path.basename(path), k, obj


def _tool(args, obj):
    """The output of binutils' ``args`` (``nm``, ``objdump``) over the object ``obj``."""
    with tempfile.NamedTemporaryFile(suffix=".o") as f:
        f.write(obj)
        f.flush()
        return subprocess.run(args + [f.name], capture_output=True, text=True,
                              check=True).stdout


def _function_sizes(cache_dir):
    """``{(cache file, object index, symbol): size}`` of every function defined in the
    object code of a Numba cache."""
    sizes = {}
    for name, k, obj in _objects(cache_dir):
        for line in _tool(["nm", "-S", "--defined-only"], obj).splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2] in "TtWw":
                key = (name, k, _strip_abi_tags(parts[3]))
                sizes[key] = sizes.get(key, 0) + int(parts[1], 16)
    return sizes


def _code_profile(cache_dir, key):
    """``(instructions, relocations)`` of the function ``key`` (as :func:`_function_sizes`
    names it): how many of each mnemonic its disassembly has, and how many references to
    each symbol (ABI tags and constant-pool offsets stripped). Two compiles with the same
    relocations and mnemonics that differ only in moves chose other registers or spills;
    other differences are another structure (session 10's: NRT calls kept or not)."""
    name, k, symbol = key
    obj = next(o for n, i, o in _objects(cache_dir) if (n, i) == (name, k))
    ops, refs, inside = collections.Counter(), collections.Counter(), False
    for line in _tool(["objdump", "-dr", "--no-show-raw-insn"], obj).splitlines():
        label = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if label:
            inside = _strip_abi_tags(label.group(1)) == symbol
        elif inside:
            reloc = re.search(r"R_X86_64_\w+\s+(\S+)", line)
            if reloc:
                refs[re.sub(r"\+0x[0-9a-f]+$", "", _strip_abi_tags(reloc.group(1)))] += 1
            elif "\t" in line:
                ops[line.split("\t", 1)[1].split()[0]] += 1
    return ops, refs


def _recurrent_sizes(cache_dir):
    """Sizes of the ``_recurrent`` functions (the micro-kernel's loops) in the cached object
    code of cell_thread."""
    return sorted({hex(size) for (name, _, symbol), size in _function_sizes(cache_dir).items()
                   if name.startswith("packed_numba.cell_thread-") and "10_recurrent" in symbol})


def audit(seeds):
    """Compile every kernel under each seed and report the functions whose machine code
    differs in size between seeds."""
    sizes, caches = {}, {}
    for seed in seeds:
        caches[seed] = tempfile.mkdtemp(prefix=f"hashseed{seed}_")
        env = dict(os.environ, PYTHONHASHSEED=str(seed), NUMBA_CACHE_DIR=caches[seed])
        subprocess.run([sys.executable, "-c", "import fastrnn; fastrnn.warmup()"], env=env,
                       check=True)
        sizes[seed] = _function_sizes(caches[seed])
    keys = sorted(set().union(*sizes.values()))
    differ = [k for k in keys if len({sizes[s].get(k) for s in seeds}) > 1]
    print(f"{len(keys)} compiled functions in {len({k[0] for k in keys})} cache files; "
          f"{len(differ)} differ in size between PYTHONHASHSEED={seeds}", flush=True)
    for k in differ:
        print(f"  {k[0]} #{k[1]} {k[2][:100]}: "
              + ", ".join(f"seed {s} {sizes[s].get(k)}" for s in seeds), flush=True)
        base = seeds[0]
        ops0, refs0 = _code_profile(caches[base], k)
        for s in seeds[1:]:
            if sizes[s].get(k) == sizes[base].get(k):
                continue
            ops, refs = _code_profile(caches[s], k)
            ops_diff = {op: (ops0[op], ops[op]) for op in ops0 | ops if ops0[op] != ops[op]}
            print(f"    seed {s} against seed {base}: relocations "
                  f"{'the same' if refs == refs0 else 'differ: ' + str(refs ^ refs0)}; "
                  f"instructions that differ in count {ops_diff}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--audit", action="store_true",
                   help="compare every kernel's machine code across the seeds instead")
    args = p.parse_args()
    if args.audit:
        audit(args.seeds)
        return
    caches = {s: tempfile.mkdtemp(prefix=f"hashseed{s}_") for s in args.seeds}

    def run(seed):
        env = dict(os.environ, PYTHONHASHSEED=str(seed), NUMBA_CACHE_DIR=caches[seed])
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                             text=True, check=True).stdout
        return [float(v) for v in out.split()]

    for seed in args.seeds:              # compile each seed's cache
        run(seed)
    times = {s: [] for s in args.seeds}
    for r in range(args.rounds):
        for seed in (args.seeds if r % 2 == 0 else args.seeds[::-1]):
            times[seed].append(run(seed))
    for seed in args.seeds:
        med = np.median(np.array(times[seed]), axis=0)
        print(f"PYTHONHASHSEED={seed}: _recurrent {', '.join(_recurrent_sizes(caches[seed]))}; "
              f"frozen LSTM 100x64x256x256 {med[0] * 1e3:.2f} ms, 200x1x64x64 "
              f"{med[1] * 1e6:.0f} us", flush=True)


if __name__ == "__main__":
    main()
