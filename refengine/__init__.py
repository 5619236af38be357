"""Reference engine (NumPy/Numba): the definition of correct. `load_model` is its Python API."""
from refengine.api import Model, load_model  # noqa: F401  (the public API)
