"""Explain a PyTorch module directly: ``nnlin.torch.explain(module, x, **kw)``.

The module is exported with ``torch.onnx.export`` (the TorchScript exporter, with
batch-norm kept: ``dynamo=False, do_constant_folding=False``) into memory, and the ONNX
bytes are explained by :meth:`nnlin.Model.explain` with the same keyword arguments.
"""
import io
import warnings

import numpy as _np

from . import Model


def model(module, example):
    """The :class:`nnlin.Model` of ``module`` exported at ``example`` (a tensor of the input
    shape, batch axis 1)."""
    import torch  # noqa: PLC0415 - optional dependency

    buf = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter is deprecated in favour of dynamo, which folds
            # batch-norm into float32 weights; nnlin wants the module's own parameters
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, (example,), buf, dynamo=False, do_constant_folding=False,
                              input_names=["x"], output_names=["y"])
    finally:
        module.train(was_training)
    return Model(buf.getvalue())


def explain(module, x, **kw):
    """Exports ``module`` at the first instance of ``x`` (a torch tensor or array) and
    explains every instance; keyword arguments as :meth:`nnlin.Model.explain`."""
    import torch  # noqa: PLC0415

    xt = torch.as_tensor(_np.asarray(x.detach().cpu() if hasattr(x, "detach") else x))
    first = xt[:1].float() if xt.dim() > 1 else xt.float().unsqueeze(0)
    return model(module, first).explain(xt.double().numpy(), **kw)
