"""Models and how to split them: ParallelPlan, the (dp, pp, tp) mesh, and the recipe that applies them."""

from plait.parallel.plan import ParallelPlan, PlanError

__all__ = ["ParallelPlan", "PlanError"]
