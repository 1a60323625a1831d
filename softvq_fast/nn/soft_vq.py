"""SoftVectorQuantizer: drop-in for the authors' module of the same name, on the fused soft_vq op."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from softvq_fast.ops.soft_vq import check_temperature, soft_vq

USAGE_WINDOW = 65536  # codes remembered per codebook for the usage statistic (the authors' buffer width)


class SoftVectorQuantizer(nn.Module):
    """The authors' constructor, parameter `embedding` (C, n_e, e_dim) and returned tuple.

    forward(z): z (B, S, D) or (B, D, H, W) (flattened to (B, H*W, D), which is also the shape of
    the returned z_q, as in the authors' code). Returns
      z_q, (vq_loss, commit_loss, entropy_loss, codebook_usage),
           (None, None, indices, avg_probs, max_probs, z_q.detach(), z.detach(), zq_z_cos)
    with losses 0.0 / None in eval mode and indices (B, C, S // C) in the authors' layout (their
    codebook-major (C, B * S // C) argmax reshaped without a transpose).

    `backend` picks the soft_vq backend ("auto" by device). With show_usage, `codebook_used` keeps
    the last 65536 argmax codes of each codebook on the device (no host sync, no Python loop);
    codebook_usage is the mean over codebooks of the fraction of distinct codes in it. (The
    authors' update loop writes one token per codebook per step; this keeps every token.)
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        entropy_loss_ratio: float = 0.01,
        tau: float = 0.07,
        num_codebooks: int = 1,
        l2_norm: bool = False,
        show_usage: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("n_e", n_e), ("e_dim", e_dim), ("num_codebooks", num_codebooks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SoftVectorQuantizer: {name} must be a positive int, got {value!r}")
        for name, value in (("l2_norm", l2_norm), ("show_usage", show_usage)):
            if not isinstance(value, bool):
                raise TypeError(f"SoftVectorQuantizer: {name} must be True or False, got {value!r}")
        if isinstance(entropy_loss_ratio, bool) or not isinstance(entropy_loss_ratio, numbers.Real) \
                or not math.isfinite(entropy_loss_ratio):
            raise ValueError(f"SoftVectorQuantizer: entropy_loss_ratio must be a finite number, got {entropy_loss_ratio!r}")
        tau = check_temperature("tau", tau, where="SoftVectorQuantizer")
        self.n_e = n_e
        self.e_dim = e_dim
        self.entropy_loss_ratio = entropy_loss_ratio
        self.tau = tau
        self.num_codebooks = num_codebooks
        self.l2_norm = l2_norm
        self.show_usage = show_usage
        self.backend = backend
        self.embedding = nn.Parameter(torch.empty(num_codebooks, n_e, e_dim).uniform_(-1.0 / n_e, 1.0 / n_e))
        if l2_norm:
            self.embedding.data = F.normalize(self.embedding.data, p=2, dim=-1)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(num_codebooks, USAGE_WINDOW))

    def forward(self, z: torch.Tensor):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"SoftVectorQuantizer: z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() == 4:
            z = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, z.shape[1])
        if z.dim() != 3 or z.shape[-1] != self.e_dim:
            raise ValueError(
                f"SoftVectorQuantizer: z must be (B, S, {self.e_dim}) or (B, {self.e_dim}, H, W), got {tuple(z.shape)}"
            )
        B, S, _ = z.shape
        C = self.num_codebooks
        if S % C:
            raise ValueError(f"SoftVectorQuantizer: sequence length {S} is not divisible by num_codebooks={C}")
        z_q, stats = soft_vq(z, self.embedding, self.tau, l2_norm=self.l2_norm, return_stats=True,
                             entropy=self.training, backend=self.backend)
        codebook_major = stats.indices.reshape(B, C, S // C).transpose(0, 1).reshape(C, B * (S // C))
        if self.show_usage and self.training:
            self._remember(codebook_major)
        if self.training:
            vq_loss = commit_loss = 0.0
            entropy_loss = self.entropy_loss_ratio * stats.entropy_loss
        else:
            vq_loss = commit_loss = entropy_loss = None
        codebook_usage = self._usage() if self.show_usage else 0
        avg_probs = z_q.new_tensor(1.0 / self.n_e, dtype=torch.float32)  # every row of probs sums to 1
        return z_q, (vq_loss, commit_loss, entropy_loss, codebook_usage), (
            None,
            None,
            codebook_major.view(B, C, S // C),
            avg_probs,
            stats.max_prob,
            z_q.detach(),
            z.detach(),
            stats.cos,
        )

    @torch.no_grad()
    def _remember(self, codebook_major: torch.Tensor) -> None:
        """Shift this step's argmax codes (C, N) into the rolling window `codebook_used`."""
        recent = codebook_major[:, -USAGE_WINDOW:].to(self.codebook_used.dtype)
        kept = self.codebook_used[:, recent.shape[1]:]
        self.codebook_used.copy_(torch.cat([kept, recent], dim=1))

    @torch.no_grad()
    def _usage(self) -> torch.Tensor:
        seen = torch.zeros(self.num_codebooks, self.n_e, device=self.codebook_used.device)
        seen.scatter_(1, self.codebook_used.long(), 1.0)
        return seen.sum(dim=1).div(self.n_e).mean()
