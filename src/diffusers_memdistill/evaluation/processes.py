"""Where an audit runs: its processes under ``accelerate launch`` (or one), its device, its cache, its clock."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

from .store import write_json

CACHE_ENV = "MEMDISTILL_CACHE"  # where an audit caches the training sets' features when --cache_dir is not given


def default_cache_dir() -> str:
    """``$MEMDISTILL_CACHE``, else ``$XDG_CACHE_HOME/diffusers_memdistill``, else ``~/.cache/diffusers_memdistill``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "diffusers_memdistill")


# ----------------------------------------------------------------------------------------------------------------
# Processes.


class Timings:
    """Wall seconds of this process per phase of the audit (``sampling``, ``references``, ``features``, ``search``,
    ``summary``), written to ``OUTPUT_DIR/timings/process-<i>.json`` (kept out of ``metrics.json``, whose numbers do
    not depend on where or how fast they were computed)."""

    def __init__(self):
        self.seconds: dict = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def write(self, output_dir: str, procs) -> None:
        write_json(os.path.join(output_dir, "timings", f"process-{procs.index}.json"),
                   {"process": procs.index, "num_processes": procs.count, "seconds": self.seconds})


@dataclass
class Processes:
    """This process's place among the audit's processes (accelerate's state, or one process)."""

    index: int = 0
    count: int = 1
    barrier: object = None

    @classmethod
    def current(cls, device: torch.device) -> Processes:
        """The processes of ``accelerate launch`` (one when not launched); on the CPU they meet over gloo."""
        from accelerate import PartialState

        state = PartialState(cpu=device.type == "cpu")
        return cls(state.process_index, state.num_processes, state.wait_for_everyone)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        if self.count > 1 and self.barrier is not None:
            self.barrier()

    def mine(self, shards: list) -> list:
        return [k for k in range(len(shards)) if k % self.count == self.index]


def device_of(device):
    """The device this process measures on: the given one, else its own GPU under ``accelerate launch``, else the
    CPU."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from accelerate import PartialState

        return PartialState().device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available here; use --device cpu.")
    return device




__all__ = ["CACHE_ENV", "Processes", "Timings", "default_cache_dir", "device_of"]
