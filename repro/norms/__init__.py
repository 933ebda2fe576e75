"""Normalizer registry. Importing this package registers every built-in normalizer module."""

from repro.norms import (  # noqa: F401  (registration side effect)
    batch_renorm,
    batchnorm,
    cbn,
    evonorm,
    fixup,
    frn,
    groupnorm,
    groupnorm1,
    identity,
    layernorm2d,
    mimicnorm,
    qbn,
)
from repro.norms.base import (
    NORMALIZERS,
    Normalizer,
    create_normalizer,
    register_normalizer,
    replace_batchnorms,
)

__all__ = ["NORMALIZERS", "Normalizer", "create_normalizer", "register_normalizer", "replace_batchnorms"]
