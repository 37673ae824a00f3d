"""The train transform's crop-and-resize equals torchvision's ``resized_crop`` bit for bit (issue 13 speed-up)."""

import random

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from vitef.data.transforms import random_resized_crop_box, resized_crop


@pytest.mark.parametrize("shape", [(256, 341), (341, 256), (32, 32), (28, 40)])
@pytest.mark.parametrize("layout", ["hwc_view", "chw"])
def test_resized_crop_equals_torchvision(shape, layout):
    rng = np.random.default_rng(0)
    h, w = shape
    if layout == "hwc_view":  # how the sources and the cache serve images: a (3, H, W) view of H x W x 3
        image = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).permute(2, 0, 1)
    else:
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
    for seed in range(20):
        top, left, ch, cw = random_resized_crop_box(h, w, random.Random(seed))
        expected = TF.resized_crop(image, top, left, ch, cw, [224, 224], antialias=True)
        out = resized_crop(image, top, left, ch, cw, 224)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8 and out.is_contiguous()
        assert torch.equal(out, expected)
