"""Triton kernels, one module per op family. Importable without Triton (the kernels are then absent)."""
