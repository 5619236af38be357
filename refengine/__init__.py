"""Reference engine (NumPy/Numba): quant formats, loaders, the transformer. Built in issue 3."""
