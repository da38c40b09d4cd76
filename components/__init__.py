"""KFP v2 lightweight components: one per stage, each delegating to medsight.platform.component_runtime.

``STAGE_COMPONENTS`` maps registry stage names to components; tests check it covers the registry.
"""

from components.helpers import compare_variants, merge_overrides, stage_from_refs, stand_in, tag_variant
from components.stages import STAGE_COMPONENTS

__all__ = ["STAGE_COMPONENTS", "compare_variants", "merge_overrides", "stage_from_refs", "stand_in", "tag_variant"]
