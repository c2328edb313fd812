"""What every fastrnn module shares: parameters, gradients, modes, state dicts, moves.

:class:`Module` is the base of the recurrent layers (:mod:`fastrnn.layers`),
the cells (:mod:`fastrnn.cells`) and the feed-forward layers
(:mod:`fastrnn.nn`). A subclass provides ``_param_shapes()`` (torch's names
and shapes) and ``forward``; it overrides ``_forget()`` when what a
train-mode call records is more than ``self._pending``.
"""

from __future__ import annotations

import copy as _copy
import numbers
import types

import numpy as np

from . import backends
from ._immutable import immutable_copy

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_dtype(dtype) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _check_positive_int(name, value):
    if type(value) is int and value > 0:     # the common case, before the ABC's slow check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_bool(name, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _rng(seed):
    """``np.random.default_rng(seed)`` with an error that names ``seed``."""
    if isinstance(seed, bool):
        raise TypeError(f"seed must be None or a non-negative integer, got {seed!r}")
    try:
        return np.random.default_rng(seed)
    except TypeError as exc:
        raise TypeError(f"seed must be None or a non-negative integer, got {seed!r}") from exc
    except ValueError as exc:
        raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}") from exc


def _load_params(owner, shapes, state_dict, xp, dtype) -> dict:
    """Validated copies of ``state_dict``'s arrays for :meth:`load_state_dict` (all or nothing).

    A non-mapping raises TypeError; missing or extra keys KeyError (naming
    them); a non-float value TypeError; a wrong shape ValueError (naming the key).
    """
    if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got "
                        f"{type(state_dict).__name__}")
    missing = [k for k in shapes if k not in state_dict]
    extra = [k for k in state_dict.keys() if k not in shapes]
    if missing or extra:
        raise KeyError(f"state_dict does not match {owner}: "
                       f"missing keys {missing}, unexpected keys {extra}")
    new = {}
    for name, shape in shapes.items():
        value = state_dict[name]
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        try:
            value = xp.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"state_dict[{name!r}] must be an array, got "
                            f"{type(value).__name__}") from exc
        if value.dtype.kind != "f":
            raise TypeError(f"state_dict[{name!r}] has dtype {value.dtype}, expected a "
                            f"floating dtype")
        if tuple(value.shape) != shape:
            raise ValueError(f"state_dict[{name!r}] has shape {tuple(value.shape)}, "
                             f"expected {shape}")
        new[name] = value.astype(dtype, order="C", copy=True)  # kernels want C rows
    return new


def _init_uniform(shapes, k, seed, xp, dtype) -> dict:
    """PyTorch's initialisation of RNNs and Linear: every parameter ~ U(-k, k)."""
    rng = _rng(seed)
    return {name: xp.asarray(rng.uniform(-k, k, shape).astype(dtype))
            for name, shape in shapes.items()}


def _other_backends(name) -> str:
    return " or ".join(f"backend={b!r}" for b in ("numba", "numpy") if b != name)


class Module:
    """Parameters and gradients (dicts under torch's names), train/eval modes,
    state dicts, and moves between backends and dtypes."""

    def __init__(self, backend="auto", dtype=np.float32):
        self.dtype = _check_dtype(dtype)
        self._refuse_backend(backend)
        self._backend = backends.get(backend)
        self.training = True
        self._pending = None
        self.params = {}
        self.grads = {}

    def _set_params(self, params):
        """Install ``params`` (converted to the module's dtype) and zero gradients."""
        self.params = {k: self._xp.asarray(v.astype(self.dtype, order="C"))
                       for k, v in params.items()}
        self.grads = {k: self._xp.zeros_like(v) for k, v in self.params.items()}

    def _unsupported(self, backend: str):
        """Why this module's configuration has no kernels on ``backend`` (a resolved
        name), or None: the one place a subclass names what a backend cannot run."""
        return None

    def _refuse_backend(self, backend):
        """NotImplementedError with :meth:`_unsupported`'s reason, before anything is
        loaded or changed; names that are not backends are left to ``backends.get``."""
        name = backends.auto_name() if backend == "auto" else backend
        why = self._unsupported(name) if name in backends.NAMES else None
        if why:
            raise NotImplementedError(f"{why}: the {name} backend has no kernels for it; "
                                      f"use {_other_backends(name)}")

    def _forget(self):
        """Drop what train-mode calls recorded for backward."""
        self._pending = None

    def _on_move(self):
        """Called after :meth:`to` changed the backend or dtype."""

    @property
    def frozen(self) -> bool:
        """Whether this is a :meth:`freeze` copy: inference only, its parameters checked
        once and (host backends) never changed; it holds the mapping it checked."""
        return self.__dict__.get("_frozen_params") is not None

    @property
    def backend(self) -> str:
        """Name of the backend that runs this module (``'auto'`` resolved)."""
        return self._backend.name

    @property
    def _xp(self):
        return self._backend.xp

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _refuse_frozen(self, what):
        """ValueError naming ``what`` (a call, an argument) where this module is frozen."""
        if self.frozen:
            raise ValueError(f"{what}: the module is frozen (Module.freeze), for inference "
                             f"only; call copy() for a module to train or change, and "
                             f"freeze() that")

    def train(self, mode: bool = True):
        """Train mode: a forward call records what backward needs."""
        mode = _check_bool("mode", mode)
        if mode:
            self._refuse_frozen("train()")
        self.training = mode
        return self

    def eval(self):
        """Eval mode: forward records nothing."""
        return self.train(False)

    def zero_grad(self):
        """Set every accumulated parameter gradient to zero."""
        for g in self.grads.values():
            g[...] = 0

    def state_dict(self) -> dict:
        """Copies of the parameters under torch's names, in torch's order."""
        return {k: v.copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Load parameters with torch's names and shapes (torch tensors work too).

        All or nothing: a non-mapping, a missing, extra or misshapen key, or a
        non-float value raises (TypeError, KeyError or ValueError naming it) and
        leaves the module unchanged. A successful load drops what was recorded.
        """
        self._refuse_frozen("load_state_dict()")
        self.params = _load_params(type(self).__name__, self._param_shapes(), state_dict,
                                   self._xp, self.dtype)
        self._forget()

    def to(self, backend=None, dtype=None):
        """Move the module to another backend and/or dtype, in place; returns self.

        Parameters and gradients are converted; what was recorded is dropped.
        """
        if backend is not None:
            self._refuse_backend(backend)
        new_backend = self._backend if backend is None else backends.get(backend)
        new_dtype = self.dtype if dtype is None else _check_dtype(dtype)

        def move(a):
            host = a.get() if hasattr(a, "get") else a   # cupy -> numpy
            return new_backend.xp.asarray(np.asarray(host).astype(new_dtype, order="C"))

        params = {k: move(v) for k, v in self.params.items()}
        grads = {k: move(v) for k, v in self.grads.items()}
        self._backend, self.dtype, self.params, self.grads = new_backend, new_dtype, params, grads
        if self.frozen:
            self._freeze_params()
        self._forget()
        self._on_move()
        return self

    def copy(self, backend=None, dtype=None):
        """A new module with the same configuration, parameters and gradients; of a
        frozen module, a module that can train again (gradients zero, eval mode)."""
        clone = _copy.copy(self)
        clone.params = {k: v.copy() for k, v in self.params.items()}
        clone.grads = {k: v.copy() for k, v in self.grads.items()} if not self.frozen else \
            {k: self._xp.zeros_like(v) for k, v in clone.params.items()}
        clone.__dict__.pop("_frozen_params", None)
        clone._forget()
        return clone.to(backend=backend, dtype=dtype)

    def freeze(self):
        """A frozen copy for inference: eval mode for good, no gradients, and parameters
        checked once (names, shapes, dtype), in a read-only mapping; on the host backends
        they are read-only arrays that can never change (writing one raises; on cuda they
        are copies that nothing else references).

        The numba backend packs a frozen module's float32 weights for its compiled loops
        once, at the first call, and keeps them with the module, as ONNX Runtime and
        OpenVINO pack a model's weights when they load it; an eval-mode module is packed
        at every call, since its weights may change between calls. The outputs are the
        eval-mode module's, bitwise; the layers call their kernels without the contract's
        per-call checks of the parameters, checked once here, and of the inputs, which the
        layer checks itself. ``train()``, ``load_state_dict()`` and an optimizer
        refuse a frozen module; ``copy()`` gives one that can train, ``to()`` moves it
        and keeps it frozen.
        """
        frozen = _copy.copy(self)
        frozen.training, frozen.grads = False, {}
        frozen._forget()
        frozen._freeze_params()
        return frozen

    def _freeze_params(self):
        """Replace the parameters by checked copies that can never change, in a read-only
        mapping (host backends; a device backend's arrays are copies, which its kernels
        never write). The layers call their kernels unchecked only while ``params`` is
        still this mapping (``_frozen_params``)."""
        params = _load_params(type(self).__name__, self._param_shapes(), self.params,
                              self._xp, self.dtype)
        if self._xp is np:
            params = {k: immutable_copy(v) for k, v in params.items()}
        self.params = self._frozen_params = types.MappingProxyType(params)
