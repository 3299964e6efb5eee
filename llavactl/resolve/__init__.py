"""Profile x machine -> one resolved object: device, precision, world, free memory, model sources.

Entry point: :func:`resolve`. The machine rules live in :mod:`llavactl.resolve.run`, once.
"""

from llavactl.resolve.facts import GpuFacts, MachineFacts, WorldFacts
from llavactl.resolve.run import Precision, ResolvedProblem, ResolvedRun, World, resolve

__all__ = ["GpuFacts", "MachineFacts", "Precision", "ResolvedProblem", "ResolvedRun", "World", "WorldFacts", "resolve"]
