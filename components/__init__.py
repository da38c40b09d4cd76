"""KFP v2 components: the stage components generated from the registry, plus bookkeeping helpers."""

from components.generate import compare_component, plan_component, stage_component
from components.helpers import stage_from_refs

__all__ = ["compare_component", "plan_component", "stage_component", "stage_from_refs"]
