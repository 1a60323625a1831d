"""oneDNN availability and a recorder of the calls of the oneDNN linear op."""
from __future__ import annotations

import pytest
import torch

ONEDNN = torch.backends.mkldnn.is_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")


class OneDNNCalls:
    """The weights (by data pointer) that went through the oneDNN linear op, in order."""

    def __init__(self) -> None:
        self.weights: list[int] = []

    def expect_every_linear_of(self, model: torch.nn.Module, *extra_weights: torch.Tensor) -> None:
        """Every softvq_fast.nn.Linear of `model` (and `extra_weights`) ran on oneDNN."""
        from softvq_fast.nn import Linear

        expected = {m.weight.data_ptr() for m in model.modules() if isinstance(m, Linear)}
        expected |= {w.data_ptr() for w in extra_weights}
        assert expected and set(self.weights) == expected
