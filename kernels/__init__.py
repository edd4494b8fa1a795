"""Triton kernels, installed as fastcv.kernels: @triton.jit kernels and their launchers, no autograd.

Each op's kernels live in kernels/<op>.py. On the CPU they run only under TRITON_INTERPRET=1 (tests).
"""
