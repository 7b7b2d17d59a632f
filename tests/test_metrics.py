import numpy as np

from diffc.metrics import psnr, psnr_per_image


def test_per_image_psnr_shows_the_one_sample_the_batch_figure_hides():
    reference = np.full((4, 8, 8, 3), 0.5)
    images = reference.copy()
    images[:3] += 0.001
    images[3] = 1.0  # one sample flipped to other content
    per_image = psnr_per_image(images, reference)
    assert len(per_image) == 4
    assert np.allclose(per_image[:3], 60.0)
    assert np.isclose(per_image[3], psnr(images[3:], reference[3:])) and per_image[3] < 10
    assert min(per_image) <= psnr(images, reference) <= max(per_image)
    assert psnr_per_image(reference, reference) == [float("inf")] * 4
