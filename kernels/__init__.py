"""Triton kernels and their launchers, installed as `softvq_fast.kernels`.

Importing a module here needs triton; the ops in `softvq_fast.ops` import them lazily so the
package works without it.
"""
