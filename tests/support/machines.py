"""A fixture that makes softvq_fast.ops.cpu_rules see another machine (vendor, ISA, torch threads)
with an empty calibration folder, restoring this machine's rules afterwards."""
from __future__ import annotations

from typing import Callable, Iterator

import pytest
import torch

from softvq_fast.ops import cpu_rules


@pytest.fixture
def machine(monkeypatch, tmp_path) -> Iterator[Callable[[str, str, int], None]]:
    """machine(vendor, isa, threads): the CPU rules in force become those of that machine."""
    threads = torch.get_num_threads()
    monkeypatch.setenv(cpu_rules.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(cpu_rules.RULES_ENV, raising=False)

    def use(vendor: str, isa: str, torch_threads: int) -> None:
        monkeypatch.setattr(cpu_rules, "MACHINE", cpu_rules.Machine(vendor, "test CPU", isa))
        torch.set_num_threads(torch_threads)
        cpu_rules.reload()

    cpu_rules.reload()
    yield use
    monkeypatch.undo()
    torch.set_num_threads(threads)
    cpu_rules.reload()
