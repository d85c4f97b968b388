"""kitseg: two-stage kidney and kidney-tumor segmentation of abdominal CT (KiTS19 method).

The engine of napari-kits; importable without any GUI toolkit. Heavy submodules (torch) are
imported where used, so ``import kitseg`` stays cheap.
"""

__version__ = "0.1.0"
