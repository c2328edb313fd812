"""Sharded inference on Dask: run a recurrent layer over a dask array of sequences.

    import dask.array as da, fastrnn.dask
    x = da.from_zarr(...)                            # (T, B, I), chunked along B only
    out, h_n = fastrnn.dask.apply(lstm, x, lengths, return_state=True)
    out.to_zarr(...)                                 # or .compute() on any scheduler

Every block of ``x`` holds whole sequences (all T steps, all I features of a
range of batch rows), so each block is one independent eval-mode call of the
layer and the blocks run in parallel on whatever scheduler computes the result:
the threaded or process schedulers, or a ``distributed`` cluster
(``LocalCluster`` or remote). The model enters the graph once, as one key that
every block task depends on: a distributed scheduler ships it to each worker
once, not with every chunk. Importing :mod:`fastrnn` does not import Dask;
importing this module does (``pip install 'fastrnn[dask]'``).
"""

from __future__ import annotations

import numbers

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as exc:   # pragma: no cover - exercised only without the extra
    raise ImportError("fastrnn.dask needs Dask: pip install 'fastrnn[dask]'") from exc

from .layers import _RNNBase

__all__ = ["apply"]


def _run_block(model, x, lengths):
    """One block: the layer's eval-mode call on whole sequences -> (out, h_n[, c_n])."""
    out, state = model(x, lengths=lengths)
    return (out, *state) if isinstance(state, tuple) else (out, state)


def _item(block, i):
    return block[i]


def apply(model, x, lengths=None, *, return_state=False, rechunk=False):
    """Run ``model`` (in eval mode) over a dask array of sequences, block by block.

    Parameters
    ----------
    model : fastrnn.RNN, LSTM, GRU (or a LayerNorm layer)
        Used as it is now: an eval-mode copy enters the graph (the model
        itself is left unchanged, and later changes to it do not reach the
        graph). Initial states are zeros.
    x : dask.array.Array (T, B, I), or (B, T, I) with ``model.batch_first``
        Of the model's dtype (no silent casting). Chunked along B only: every
        block must hold whole sequences and whole feature vectors. Chunks along
        T or I raise ValueError, unless ``rechunk=True``, which merges them
        (``x.rechunk`` to one chunk along T and I; this moves data, and a
        block then holds T * I * rows values).
    lengths : array-like or dask array (B,), optional
        Integer valid lengths, 0..T, as the layer's ``lengths``; a dask array
        is rechunked to ``x``'s batch chunks, and its values are checked when
        the blocks run.
    return_state : bool
        Also return the final state(s).

    Returns
    -------
    out : dask array (T, B, D * H) ((B, T, D * H) with ``batch_first``)
        Chunked along B as ``x``, of the model's dtype (an LSTM with ``proj_size``:
        proj_size in place of H, as in its own call).
    h_n : dask array (L * D, B, H), with ``return_state``; LSTM: ``(h_n, c_n)``
        Chunked along B as ``x``.

    Errors (raised here, at graph construction; nothing is computed):
    TypeError for a model that is not a fastrnn layer, an ``x`` that is not a
    dask array or of another dtype, a non-bool flag or non-integer lengths;
    ValueError for a wrong number of dimensions, ``input_size``, chunks along
    T or I, unknown chunk sizes, or ``lengths`` of the wrong shape or range.
    """
    if not isinstance(model, _RNNBase):
        raise TypeError(f"model must be a fastrnn recurrent layer (RNN, LSTM, GRU or a "
                        f"LayerNorm layer), got {type(model).__name__}")
    for name, flag in (("return_state", return_state), ("rechunk", rechunk)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if not isinstance(x, da.Array):
        raise TypeError(f"x must be a dask array (dask.array.from_array(x, chunks=...) wraps "
                        f"a NumPy array), got {type(x).__name__}")
    b_axis, t_axis = (0, 1) if model.batch_first else (1, 0)
    layout = "(B, T, input_size)" if model.batch_first else "(T, B, input_size)"
    if x.ndim != 3:
        raise ValueError(f"x must have 3 dimensions {layout}, got shape {x.shape}")
    if x.shape[2] != model.input_size:
        raise ValueError(f"x has {x.shape[2]} features, expected input_size="
                         f"{model.input_size}")
    if np.dtype(x.dtype) != model.dtype:
        raise TypeError(f"x has dtype {x.dtype}, but the model is {model.dtype} (no silent "
                        f"casting: x.astype(np.{model.dtype}) or model.copy(dtype=...))")
    if any(not np.isfinite(c) for axis in x.chunks for c in axis):
        raise ValueError("x has unknown chunk sizes: call x.compute_chunk_sizes() first")
    split = [axis for axis in (t_axis, 2) if len(x.chunks[axis]) > 1]
    if split:
        if not rechunk:
            what = " and ".join(f"{'T' if a == t_axis else 'I'} (axis {a}: chunks "
                                f"{x.chunks[a]})" for a in split)
            raise ValueError(f"x is chunked along {what}; each block must hold whole "
                             f"sequences: chunk x along B only, e.g. "
                             f"x.rechunk({{{t_axis}: -1, 2: -1}}), or pass rechunk=True")
        x = x.rechunk({t_axis: -1, 2: -1})
    T, B = x.shape[t_axis], x.shape[b_axis]
    b_chunks = x.chunks[b_axis]
    len_arr = None if lengths is None else _lengths_array(lengths, T, B, b_chunks)

    runner = model.copy()
    runner.eval()
    runner.grads = {}    # eval-mode calls never read them; only the parameters travel
    model_token = tokenize(type(model).__name__, repr(model), model.backend,
                           sorted((k, v) for k, v in model.params.items()))
    model_node = dask.delayed(runner, name=f"fastrnn-model-{model_token}", pure=True)

    token = tokenize(model_token, x.name, None if len_arr is None else len_arr.name)
    run_name = f"fastrnn-{model._cell}-{token}"
    x_index = (lambda i: (x.name, i, 0, 0)) if b_axis == 0 else (lambda i: (x.name, 0, i, 0))
    layer = {(run_name, i): (_run_block, model_node.key, x_index(i),
                             None if len_arr is None else (len_arr.name, i))
             for i in range(len(b_chunks))}
    deps = [x, model_node] + ([] if len_arr is None else [len_arr])
    graph = HighLevelGraph.from_collections(run_name, layer, dependencies=deps)

    D, H, L = model.num_directions, model.hidden_size, model.num_layers
    P = getattr(model, "proj_size", 0) or H     # features of h and of each direction's output
    meta = np.empty((0, 0, 0), model.dtype)

    def part(label, position, chunks, b_at):
        name = f"{label}-{token}"
        index = (lambda i: (name, i, 0, 0)) if b_at == 0 else (lambda i: (name, 0, i, 0))
        tasks = {index(i): (_item, (run_name, i), position) for i in range(len(b_chunks))}
        g = HighLevelGraph({**graph.layers, name: tasks},
                           {**graph.dependencies, name: {run_name}})
        return da.Array(g, name, chunks, meta=meta)

    out_chunks = [None, None, (D * P,)]
    out_chunks[b_axis], out_chunks[t_axis] = b_chunks, (T,)
    out = part(f"fastrnn-out-{model._cell}", 0, tuple(out_chunks), b_axis)
    if not return_state:
        return out
    states = [part(f"fastrnn-{label}-{model._cell}", 1 + k, ((L * D,), b_chunks, (size,)), 1)
              for k, (label, size) in enumerate((("h_n", P), ("c_n", H))[:model._num_states])]
    return out, (tuple(states) if len(states) == 2 else states[0])


def _lengths_array(lengths, T, B, b_chunks):
    """``lengths`` as a dask array (B,) chunked like x's batch axis, checked where it can be."""
    if isinstance(lengths, da.Array):
        if lengths.ndim != 1 or lengths.shape[0] != B:
            raise ValueError(f"lengths must have shape ({B},) (the batch size of x), got "
                             f"{lengths.shape}")
        if np.dtype(lengths.dtype).kind not in "iu":
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        return lengths.rechunk((b_chunks,))
    try:
        values = np.asarray(lengths)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"lengths must be an integer array, got {type(lengths).__name__}") \
            from exc
    if values.dtype.kind not in "iu" and not (values.dtype == object and all(
            isinstance(v, numbers.Integral) for v in values.ravel())):
        raise TypeError(f"lengths must hold integers, got dtype {values.dtype}")
    values = values.astype(np.int64)
    if values.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},) (the batch size of x), got "
                         f"{values.shape}")
    if values.size and (values.min() < 0 or values.max() > T):
        raise ValueError(f"lengths must lie in [0, T={T}], got values from {values.min()} to "
                         f"{values.max()}")
    return da.from_array(values, chunks=(b_chunks,), name=f"fastrnn-lengths-{tokenize(values)}")
