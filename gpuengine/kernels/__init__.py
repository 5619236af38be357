"""CUDA kernel sources (.cu), compiled through CuPy. Built in issue 5."""
