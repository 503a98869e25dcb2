"""How many threads the server runs, from the CPUs its pod may use rather than the node's.

onnxruntime sizes its intra-op pool by the host's cores (onnxruntime issue 29510): a pod with
a 2-CPU quota on a 64-core node would run 64 spinning threads per session and be throttled by
the kernel exactly when load rises. The plan divides the pod's CPU budget between the
sessions, keeps one inter-op thread (sessions run sequentially), turns spinning off when the
budget is below the host's cores (a spinning thread burns quota another thread needs), and
sizes the decode pool from the same budget. An explicit setting always wins; spinning can be
forced on or off (``--ort-spinning``), e.g. to reproduce onnxruntime's own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.cpu_budget import CpuBudget, cpu_budget
from server.config import SPINNING_CHOICES, ServerConfig


@dataclass(frozen=True)
class ThreadPlan:
    """Thread counts for every onnxruntime session and the image decode pool."""

    budget: CpuBudget
    intra_op_threads: int
    inter_op_threads: int
    allow_spinning: bool
    decode_workers: int

    def describe(self) -> str:
        """One line for the start-up log."""
        return (
            f"{self.budget.describe()}; onnxruntime {self.intra_op_threads} intra-op and "
            f"{self.inter_op_threads} inter-op thread(s) per session, spinning "
            f"{'on' if self.allow_spinning else 'off'}; {self.decode_workers} decode thread(s)"
        )


def plan_threads(  # noqa: PLR0913  the budget, then one keyword per thread setting it resolves
    budget: CpuBudget,
    *,
    instances: int,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    decode_workers: int = 0,
    spinning: str = "auto",
) -> ThreadPlan:
    """The plan for ``instances`` sessions per version; a setting of 0 means "from the budget".

    Args:
        spinning: one of SPINNING_CHOICES; "auto" spins only when the budget covers every
            host core, since below that a spinning thread burns quota another thread needs.
    """
    if spinning not in SPINNING_CHOICES:
        raise ValueError(f"spinning must be one of {SPINNING_CHOICES}, got {spinning!r}")
    allow_spinning = {"on": True, "off": False}.get(spinning, budget.cpus >= budget.host_cpus)
    return ThreadPlan(
        budget=budget,
        intra_op_threads=intra_op_threads or max(1, budget.cpus // max(1, instances)),
        inter_op_threads=inter_op_threads or 1,
        allow_spinning=allow_spinning,
        decode_workers=decode_workers or budget.cpus,
    )


def plan_from_settings(settings: ServerConfig) -> ThreadPlan:
    """The plan for this process's CPU budget and the server's thread settings."""
    return plan_threads(
        cpu_budget(),
        instances=settings.instances,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        decode_workers=settings.preprocess_workers,
        spinning=settings.ort_spinning,
    )
