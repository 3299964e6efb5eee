"""The dry-run planner: what a run costs, worked out without weights.

Meta-device builds, the memory and FLOP trace of one training step on fake tensors
(:mod:`llavactl.plan.memory`), token counts from the data, and the overrides that make a run fit
(:mod:`llavactl.plan.build`). Training never imports it; `dry-run` and doctor's memory check do.
"""

from llavactl.plan.build import STEP_EFFICIENCY, Plan, build_plan, plan_memory

__all__ = ["STEP_EFFICIENCY", "Plan", "build_plan", "plan_memory"]
