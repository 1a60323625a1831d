"""Evaluation at scale: sampling N images into an ADM-suite .npz (`sampling`) and reading and
writing that format (`npz`)."""
from softvq_fast.evaluation.sampling import SamplingError, SamplingResult, sample_to_npz

__all__ = ["SamplingError", "SamplingResult", "sample_to_npz"]
