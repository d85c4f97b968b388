"""Synthetic CT phantoms in Hounsfield units, with kidney/tumor labels.

- :func:`make_synthetic_case` (:mod:`.simple`): a procedural abdomen, fast, for tests and demos.
- :func:`synthesize_ct`, :func:`generate_phantom_case`, :func:`generate_phantom_dataset`
  (:mod:`.realistic`): realistic CT built around real KiTS19 kidney/tumor masks, for training.
"""

from .simple import SyntheticCase, make_synthetic_case

__all__ = ["SyntheticCase", "make_synthetic_case"]
