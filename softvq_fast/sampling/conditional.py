"""A generator bound to class labels as the `fn(x, t)` the samplers call: dtype casting,
classifier-free guidance inside a guidance interval, and optional CUDA-graph replay."""
from __future__ import annotations

from typing import Callable

import torch

from softvq_fast.models.adaln_transformer import AdaLNTransformer

ModelCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CapturedCall:
    """`fn(x, t)` recorded once as a CUDA graph for fixed shapes and replayed on copies of the
    inputs: one launch per sampling step instead of hundreds of kernel launches. Runs without
    autograd, on x's device whichever device is current."""

    def __init__(self, fn: ModelCall, x: torch.Tensor, t: torch.Tensor) -> None:
        with torch.inference_mode(), torch.cuda.device(x.device):
            self.static_x, self.static_t = x.clone(), t.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: compiles Triton kernels, sets up cuBLAS workspaces
                for _ in range(2):
                    fn(self.static_x, self.static_t)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # A capture stream of our own on x's device: torch.cuda.graph's default one is created
            # once per process, on whichever device was current then.
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream()):
                self.static_out = fn(self.static_x, self.static_t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_x.shape or t.shape != self.static_t.shape:
            raise ValueError(
                f"CUDA graph captured for x {tuple(self.static_x.shape)}, t {tuple(self.static_t.shape)}; "
                f"got x {tuple(x.shape)}, t {tuple(t.shape)}"
            )
        with torch.inference_mode(), torch.cuda.device(self.static_x.device):
            self.static_x.copy_(x)
            self.static_t.copy_(t)
            self.graph.replay()
            return self.static_out.clone()


class ConditionalModel:
    """`fn(x, t: float) -> prediction` for `sample_flow` / `sample_diffusion`.

    x (B, ...) is cast to the model's dtype and the prediction back to float32. With
    cfg_scale != 1, evaluations whose t / time_scale lies in `guidance_interval` (inclusive) run
    conditional and unconditional halves in one batch and mix them (model.forward_with_cfg);
    others are conditional only. `time_scale` is 1 for SiT (t in [0, 1]) and 1000 for DiT
    (t a timestep index). `cuda_graph=True` replays CUDA graphs (one for guided, one for plain
    evaluations; the batch is fixed by `labels`).
    """

    def __init__(
        self,
        model: AdaLNTransformer,
        labels: torch.Tensor,
        *,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        time_scale: float = 1.0,
        cuda_graph: bool = False,
    ) -> None:
        low, high = guidance_interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got {guidance_interval}")
        if cuda_graph and labels.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, labels are on {labels.device}")
        if cfg_scale != 1.0:
            model.null_class  # noqa: B018  (raises early if the model has no null class)
        self.model, self.labels = model, labels
        self.cfg_scale, self.guidance_interval, self.time_scale = cfg_scale, (low, high), time_scale
        self.dtype = next(model.parameters()).dtype
        self.cuda_graph = cuda_graph
        self._captured: dict[bool, CapturedCall] = {}

    def is_guided(self, t: float) -> bool:
        low, high = self.guidance_interval
        return self.cfg_scale != 1.0 and low <= t / self.time_scale <= high

    def _plain(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, self.labels)

    def _guided(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model.forward_with_cfg(x, t, self.labels, self.cfg_scale)

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        guided = self.is_guided(t)
        fn = self._guided if guided else self._plain
        x_in = x.to(self.dtype)
        t_in = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        if not self.cuda_graph:
            return fn(x_in, t_in).float()
        if guided not in self._captured:
            self._captured[guided] = CapturedCall(fn, x_in, t_in)
        return self._captured[guided](x_in, t_in).float()
