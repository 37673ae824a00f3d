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


@pytest.mark.parametrize("augment", [True, False])
def test_uint8_output_normalised_as_a_batch_equals_the_float_output(augment):
    from vitef.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

    rng = np.random.default_rng(1)
    images = [torch.from_numpy(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).permute(2, 0, 1) for _ in range(4)]
    as_float = ImageTransform(32, augment, IMAGENET_MEAN, IMAGENET_STD)
    as_uint8 = ImageTransform(32, augment, IMAGENET_MEAN, IMAGENET_STD, output="uint8")
    want = torch.stack([as_float(im, random.Random(i)) for i, im in enumerate(images)])
    raw = torch.stack([as_uint8(im, random.Random(i)) for i, im in enumerate(images)])
    assert raw.dtype == torch.uint8 and raw.shape == (4, 3, 32, 32)
    assert torch.equal(as_uint8.normalizer(raw), want)
    with pytest.raises(TypeError):
        as_uint8.normalizer(want)
