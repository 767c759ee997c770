"""The Lightning floor of lightning-hessian: the ``HessianSpectrum`` callback and what one probe needs.

* :mod:`~lightning_hessian.callback.spectrum`: the callback itself (hooks, state; thin glue);
* :mod:`~lightning_hessian.callback.config`: validated arguments (:class:`HessianConfigError`);
* :mod:`~lightning_hessian.callback.schedule`: when to probe, full or cheap, the overhead guard;
* :mod:`~lightning_hessian.callback.runner`: one probe (prepare, top eigenpairs, analyses, joint failure decisions);
* :mod:`~lightning_hessian.callback.analyses`: the analyses a probe runs (power law, trace, density, Jacobian law,
  condensation, per-layer);
* :mod:`~lightning_hessian.callback.probe`: the probe set (sampling, device transfer, RNG isolation);
* :mod:`~lightning_hessian.callback.loss`: the default probe loss (the module's ``training_step``);
* :mod:`~lightning_hessian.callback.monitors`: checks of ``EarlyStopping`` monitors;
* :mod:`~lightning_hessian.callback.publish`: where a probe's results go (``pl_module.log`` or the loggers, monitors,
  TensorBoard extras, the dashboard layout);
* :mod:`~lightning_hessian.callback.reporting`: metric names, the TensorBoard items, figures and layout;
* :mod:`~lightning_hessian.callback.progress`, :mod:`~lightning_hessian.callback.state`,
  :mod:`~lightning_hessian.callback.setup_checks`: progress bar, module-state snapshot and rank-0 buffers, setup checks.

The mathematics lives one floor down (:mod:`lightning_hessian.operators`, :mod:`lightning_hessian.lanczos`, ...) and
imports no Lightning.
"""

from lightning_hessian.callback.analyses import Analysis, AnalysisResult, ProbeContext, ProbeFailure
from lightning_hessian.callback.config import HessianConfigError
from lightning_hessian.callback.loss import default_loss
from lightning_hessian.callback.spectrum import HessianSpectrum

__all__ = [
    "Analysis",
    "AnalysisResult",
    "HessianConfigError",
    "HessianSpectrum",
    "ProbeContext",
    "ProbeFailure",
    "default_loss",
]
