"""nnlin: one prediction of a trained ReLU-family network as an exact linear map.

For one input x, ``F(x) = W·x + b`` exactly (tangent mode: W is the Jacobian; secant mode:
the source paper's σ(z)/z rescale). Example::

    import numpy as np, nnlin
    m = nnlin.Model("model.onnx")              # or nnlin.Model(onnx_bytes)
    e = m.explain(x, rows="top1")              # x: one instance or a batch (N, ...)
    e.W, e.b, e.output, e.rows, e.residual, e.predicted
    op = m.operator(x)                         # W without forming it: op.matvec, op.rmatvec
    m.decompose(X, y)                          # the paper's W·x / b decomposition table
    m.region(x, norm="l2", verify=0)           # the linear region, as `nnlin region --json`

Errors (a bad file, a wrong shape, an unsupported operator) raise ``ValueError`` with the
command line's one-line message. ``nnlin.torch.explain(module, x)`` exports a PyTorch
module to ONNX in memory and explains it.
"""
import numpy as _np

from . import _nnlin
from ._nnlin import Explanation, Operator

__all__ = ["Model", "Explanation", "Operator", "__version__"]
__version__ = _nnlin.__version__


def _f64(x):
    return _np.ascontiguousarray(_np.asarray(x), dtype=_np.float64)


class Model:
    """An ONNX model (a path, ``os.PathLike`` or the model's bytes)."""

    def __init__(self, source):
        if isinstance(source, (bytearray, memoryview)):
            source = bytes(source)
        self._m = _nnlin.Model(source)

    @property
    def input_shape(self):
        """The input shape, batch axis (1) first."""
        return tuple(self._m.input_shape)

    @property
    def output_len(self):
        """The number of outputs."""
        return self._m.output_len

    def explain(self, x, rows=None, mode="tangent", precision="f64", strategy="auto",
                threads=None, batch=None):
        """W, b and F at every instance of ``x`` (float32 or float64; the input shape, with or
        without its batch axis, or a batch ``(N, ...)``).

        ``rows``: None (all outputs), ``"top1"``/``"topK"`` (the K largest outputs of each
        instance) or a list of output indices. Returns an :class:`Explanation` whose ``W``
        ``(N, m, n)``, ``b`` ``(N, m)``, ``output`` ``(N, outputs)``, ``rows`` ``(N, m)``,
        ``residual`` ``(N,)`` (max |W·x + b − F(x)|) and ``predicted`` ``(N,)`` are numpy
        arrays; with ``precision="f32"`` W and b are float32. ``batch``: how many instances
        share one reverse pass (their rows stacked through every shared layer, as ``vmap``
        does); None or ``"auto"`` lets the planner choose (wide for perceptrons, 1 where
        sparse convolutions carry the work), an integer forces it.
        """
        return self._m.explain(_f64(x), rows, mode, precision, strategy, threads, batch)

    def operator(self, x, rows=None, mode="tangent"):
        """W at one instance as a matrix-free :class:`Operator` (``matvec``, ``rmatvec``,
        ``shape``, ``svd(k)``); ``scipy.sparse.linalg.aslinearoperator(op)`` accepts it."""
        return self._m.operator(_f64(x), rows, mode)

    def region(self, x, norm="both", verify=0, input_box=None, threads=None):
        """The linear region (Lemma 1) around every instance of ``x``, as ``nnlin region
        --json`` reports it: a list of dicts, one per instance, with the exact radii
        (``radius_l2``, ``radius_linf``, and the same excluding units at a kink), the binding
        boundaries, the activation pattern and, with ``verify=K``, K points sampled in the
        region checked for ``F(x') = W·x' + b``. ``norm``: ``"l2"``, ``"linf"`` or
        ``"both"``; ``input_box=(lo, hi)`` bounds every input element. Smooth networks have
        no linear region: their dicts hold the linearization error along a random direction
        (``sweep``)."""
        box = None if input_box is None else (float(input_box[0]), float(input_box[1]))
        return self._m.region(_f64(x), norm, int(verify), box, threads)

    def decompose(self, X, y, mode="tangent", threads=None):
        """The source paper's decomposition over instances ``X`` with integer labels ``y``:
        a dict with n, accuracy, wx_accuracy, wx_lfr, b_accuracy, b_lfr."""
        labels = [int(v) for v in _np.asarray(y).reshape(-1)]
        return self._m.decompose(_f64(X), labels, mode, threads)

    def __repr__(self):
        return repr(self._m)
