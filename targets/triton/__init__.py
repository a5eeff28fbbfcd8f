"""Target ``triton``: a Python module of fused low-bit Triton kernels for NVIDIA GPUs."""
