"""Triton kernels of tec_fast, installed as ``tec_fast.kernels``: one op per file."""
