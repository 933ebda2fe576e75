"""Test-time adaptation methods behind one registry and one interface.

``create_method(name, model, **options)`` wraps a trained model; ``method.predict(batch)`` returns logits for
one normalized test batch (adapting as it goes), ``method.predict_frozen(batch)`` without adapting,
``method.reset()`` restores the state right after wrapping. The caller decides the reset policy (the settings
of ``repro.adapt.evaluate``: episodic, continual, mixed, label_shift); the ``episodic`` option of tent, SAR
and EATA resets before every batch. ``repro.adapt.evaluate`` runs methods over corruption × severity views
and returns tidy rows (error, ECE, NLL, Brier, cost); ``repro.adapt.metrics`` summarizes them (mean error,
mCE, relative mCE). The methods: ``source``, ``ptbn``, ``bn_adapt``, ``tent``, ``sar``, ``eata`` (entropy
minimization of norm affine parameters, see their modules), ``tbr`` and ``rbn`` (test statistics with memory).

What each method does, per normalizer:

| normalizer                 | source            | ptbn            | bn_adapt           | tent                     |
|----------------------------|-------------------|-----------------|--------------------|--------------------------|
| bn (incl. BatchNormAct2d)  | running stats     | batch stats     | λ-mix              | batch stats, γ/β stepped |
| BN2d subclasses (1)        | own eval forward  | batch stats     | λ-mix              | batch stats, γ/β stepped |
| MimicNorm (2)              | running stats     | source (2)      | source (2)         | source (2)               |
| gn, fixup, none            | as trained        | = source (3)    | = source (3)       | = source (3)             |

(1) Batch Renorm, Cross-Iteration BN and any other ``nn.BatchNorm2d`` subclass: adaptation normalizes with
    the test batch's statistics as plain BN does (no renorm r/d correction, no cross-iteration compensation);
    ``bn_adapt`` mixes with the layer's running statistics.
(2) Its only BN is a ``BatchNorm1d`` on the logits (affine=False). 1d BNs are adapted only with
    ``adapt_1d=True`` (default off, as in the official TENT and robusta code, which adapt 2d BNs only); with
    it, ptbn/bn_adapt use batch/mixed statistics there and tent uses batch statistics but has no γ/β to step.
(3) No BN: instead of raising, the method falls back to ``source`` so a sweep over normalizers × methods runs
    through; the fallback is recorded (``method.adapts`` is False, and so is the ``adapted`` column of the
    result rows). GroupNorm's γ/β are not adapted by tent; SAR adapts them (and LayerNorm's), EATA with
    ``norm_layers="all"``. ``tbr`` and ``rbn`` treat BN layers as ``ptbn`` does in this table and fall back
    the same way.

In every case the source running statistics are left as trained: read by ``source`` and ``bn_adapt``, never
updated (a BN in train mode would overwrite them).
"""

from repro.adapt import bn_adapt, eata, ptbn, rbn, sar, source, tbr, tent  # noqa: F401  (registration side effect)
from repro.adapt.base import ADAPTATION_METHODS, AdaptationMethod, create_method, register_method

__all__ = ["ADAPTATION_METHODS", "AdaptationMethod", "create_method", "register_method"]
