"""What the recurrent layers (:mod:`fastrnn.layers`) and cells (:mod:`fastrnn.cells`)
share: the cell kind and its options, torch's parameter names and shapes for one
layer and direction, the weights passed to the kernels, and ``repr``.
"""

from __future__ import annotations

import numpy as np

from . import backends
from ._module import Module, _check_bool, _check_positive_int, _init_uniform

_PARAM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def rnn_kind(nonlinearity) -> str:
    """The cell kind of an Elman RNN with ``nonlinearity`` ('tanh' or 'relu')."""
    kinds = {backends.CELLS[k].constructor_options().get("nonlinearity"): k
             for k in backends.CELLS if backends.CELLS[k].family == "RNN"}
    if not isinstance(nonlinearity, str) or nonlinearity not in kinds:
        raise ValueError(f"nonlinearity must be {' or '.join(map(repr, kinds))}, "
                         f"got {nonlinearity!r}")
    return kinds[nonlinearity]


def direction_suffix(layer, direction) -> str:
    """torch's parameter-name suffix of a layer and direction: '_l0', '_l1_reverse'."""
    return f"_l{layer}{'_reverse' if direction else ''}"


class Recurrent(Module):
    """A module that runs one cell kind's kernels (a layer or a cell).

    ``options`` are the kernel options of the cell kind (``backends.KERNEL_OPTIONS``:
    the GRU's ``reset_after``), validated and kept as one dict that reaches the
    kernels as keywords.
    """

    def __init__(self, cell, input_size, hidden_size, bias, backend, dtype, seed, **options):
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.bias = _check_bool("bias", bias)
        self._cell = cell
        self._kind = backends.cell_kind(cell)
        defaults = backends.KERNEL_OPTIONS.get(cell, {})
        self._options = {name: _check_bool(name, options.pop(name, default))
                         for name, default in defaults.items()}
        if options:
            raise TypeError(f"unexpected option(s) for {cell}: {', '.join(options)}")
        super().__init__(backend, dtype)
        self._set_params(self._initial_params(seed))

    def _initial_params(self, seed) -> dict:
        """PyTorch's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        return _init_uniform(self._param_shapes(), 1.0 / np.sqrt(self.hidden_size), seed, np,
                             self.dtype)

    @property
    def _num_states(self) -> int:
        return self._kind.states

    def _gate_shapes(self, suffix, layer_in) -> dict:
        """Names and shapes of one layer and direction's parameters, in torch's order."""
        G, H = self._kind.gates * self.hidden_size, self.hidden_size
        shapes = ((G, layer_in), (G, H), (G,), (G,))
        return {name + suffix: shape for name, shape in
                zip(_PARAM_NAMES[:4 if self.bias else 2], shapes)}

    def _weights_of(self, suffix):
        """``(w_ih, w_hh, b_ih, b_hh)`` of one layer and direction; biases None without bias."""
        p = self.params
        w = (p["weight_ih" + suffix], p["weight_hh" + suffix])
        return w + ((p["bias_ih" + suffix], p["bias_hh" + suffix]) if self.bias else (None, None))

    def _repr_fields(self) -> dict:
        """Constructor arguments that differ from their defaults (subclasses add theirs)."""
        fields = {} if self.bias else {"bias": False}
        if self._cell.startswith("rnn") and self._cell != rnn_kind("tanh"):
            fields["nonlinearity"] = self._kind.constructor_options()["nonlinearity"]
        fields.update({k: v for k, v in self._options.items()
                       if v != backends.KERNEL_OPTIONS[self._cell][k]})
        return fields

    def __repr__(self):
        extra = "".join(f", {k}={v!r}" for k, v in self._repr_fields().items())
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extra}, "
                f"backend={self.backend!r}, dtype={self.dtype.name})")
