"""P_v2t's patch merger: which patches become one LLM token, and the token count it implies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsight.config import apply_overrides, get_preset
from medsight.model.projectors import VisionToTextProjector


def test_merge_concatenates_each_2x2_block_of_the_row_major_grid():
    projector = VisionToTextProjector(encoder_width=1, region_dim=1, llm_dim=4, patch_merge=2)
    projector.merge = nn.Identity()  # look at the concatenated blocks themselves
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, value = row * 4 + col
    merged = projector.merge_patches(grid)
    assert merged.shape == (1, 4, 4)
    assert merged[0, 0].tolist() == [0, 1, 4, 5]  # top-left block
    assert merged[0, 1].tolist() == [2, 3, 6, 7]  # top-right block
    assert merged[0, 3].tolist() == [10, 11, 14, 15]  # bottom-right block


def test_merged_sequence_length_matches_the_placeholder_count():
    config = apply_overrides(get_preset("tiny"), ["model.patch_merge=2"])
    width, grid = config.model.encoder.width, config.model.encoder.grid_size
    projector = VisionToTextProjector(width, config.model.perceiver.dim, 16, patch_merge=2)
    out = projector(torch.rand(2, grid * grid, width), torch.rand(2, 5, config.model.perceiver.dim))
    assert out.shape == (2, config.model.num_patch_tokens + 5, 16)
    assert config.model.num_patch_tokens == grid * grid // 4


def test_merge_rejects_a_grid_it_cannot_tile():
    projector = VisionToTextProjector(8, 8, 16, patch_merge=2)
    with pytest.raises(ValueError, match="divisible by 2"):
        projector(torch.rand(1, 9, 8), None)
    with pytest.raises(ValueError, match="patch_merge must be >= 1"):
        VisionToTextProjector(8, 8, 16, patch_merge=0)
