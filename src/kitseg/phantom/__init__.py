"""Synthetic CT phantoms in Hounsfield units, with kidney/tumor labels.

- :func:`make_synthetic_case` (:mod:`.simple`): a procedural abdomen, fast, for tests and demos.
- :func:`make_sample_case` (:mod:`.sample`): the built-in sample case (procedural geometry,
  realistic CT).
- :func:`synthesize_ct`, :func:`generate_phantom_case`, :func:`generate_phantom_dataset`
  (:mod:`.realistic`): realistic CT built around real KiTS19 kidney/tumor masks, for training.
- :func:`add_synthetic_tumors` (:mod:`.extra_tumors`): more small tumors grown into a mask's
  kidneys, for training folders (``PhantomParams.extra_tumors``).
"""

from .extra_tumors import add_synthetic_tumors
from .params import PHASES, PhantomParams, Protocol
from .realistic import (
    MaskReadError,
    case_seed,
    generate_phantom_case,
    generate_phantom_dataset,
    iter_phantom_dataset,
    synthesize_ct,
    synthesize_ct_with_protocol,
)
from .sample import make_sample_case
from .simple import SyntheticCase, make_synthetic_case

__all__ = [
    "PHASES",
    "MaskReadError",
    "PhantomParams",
    "Protocol",
    "SyntheticCase",
    "add_synthetic_tumors",
    "case_seed",
    "generate_phantom_case",
    "generate_phantom_dataset",
    "iter_phantom_dataset",
    "make_sample_case",
    "make_synthetic_case",
    "synthesize_ct",
    "synthesize_ct_with_protocol",
]
