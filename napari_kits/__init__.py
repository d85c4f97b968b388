"""napari-kits: the napari plugin over the :mod:`kitseg` engine (a thin adapter).

Importing this package, or any module the manifest (``napari.yaml``) names, must stay cheap:
no torch, no networks. Heavy engine modules are imported inside the functions that use them.
"""

__all__: list[str] = []
