"""Evaluation at scale: sampling N images into an ADM-suite .npz (`sampling`), reading and writing
that format (`npz`), and FID / Inception Score / precision-recall through torch-fidelity (`fid`,
the optional extra `eval`, imported only when measuring)."""
from softvq_fast.evaluation.fid import Scores, evaluate, frechet_distance
from softvq_fast.evaluation.sampling import SamplingError, SamplingResult, sample_to_npz

__all__ = ["Scores", "SamplingError", "SamplingResult", "evaluate", "frechet_distance", "sample_to_npz"]
