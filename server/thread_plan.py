"""How many threads the server runs, from the CPUs its pod may use rather than the node's.

onnxruntime sizes its intra-op pool by the host's cores (onnxruntime issue 29510): a pod with
a 2-CPU quota on a 64-core node would run 64 spinning threads per session and be throttled by
the kernel exactly when load rises. The plan divides the pod's CPU budget between the
sessions, keeps one inter-op thread (sessions run sequentially), spins only when that leaves a
core free (below), and sizes the decode pool from the same budget.

Spinning: onnxruntime's idle pool threads spin instead of sleeping, which saves a wake-up per
parallel section but burns a core each. Below the host's cores that burns quota another thread
needs; and when the intra-op threads take every core of the budget, the spinning competes with
the event loop that receives, batches and answers the requests. Measured with perf_analyzer
on the same 2-core host (docs/benchmarks.md), turning it off raised the server's throughput
relative to in-process onnxruntime from 0.26 to 0.30 at 32 px (the mean server batch from
2.2 to 3.7: the event loop gathers while onnxruntime computes) and from 0.78 to 0.81 at 128 px.
An explicit setting always wins; spinning can be forced on or off (``--ort-spinning``), e.g.
to reproduce onnxruntime's own defaults.
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
            host core and the sessions' intra-op threads leave at least one of them free.
    """
    if spinning not in SPINNING_CHOICES:
        raise ValueError(f"spinning must be one of {SPINNING_CHOICES}, got {spinning!r}")
    intra = intra_op_threads or max(1, budget.cpus // max(1, instances))
    leaves_a_core = intra * max(1, instances) < budget.cpus
    allow_spinning = {"on": True, "off": False}.get(
        spinning, budget.cpus >= budget.host_cpus and leaves_a_core
    )
    return ThreadPlan(
        budget=budget,
        intra_op_threads=intra,
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
