"""Normalizer registry. Importing this package registers every built-in normalizer module."""

from repro.norms import batch_renorm, batchnorm, cbn, groupnorm, identity  # noqa: F401  (registration side effect)
from repro.norms.base import (
    NORMALIZERS,
    Normalizer,
    create_normalizer,
    register_normalizer,
    replace_batchnorms,
)

__all__ = ["NORMALIZERS", "Normalizer", "create_normalizer", "register_normalizer", "replace_batchnorms"]
