"""KID in the audit's feature space: ~0 for two draws of one distribution, ordered by how far a set departs."""

import numpy as np

from shared.c2l.audit import image_features, kid, kid_floor
from shared.c2l.toy import draw_patches


def _real(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return draw_patches(rng.uniform(size=n), rng.uniform(size=n), 32, rng)


def test_kid_orders_same_mild_and_noise():
    real, other = image_features(_real(300, 0), 32), image_features(_real(300, 1), 32)
    rng = np.random.default_rng(2)
    mild = np.clip(_real(300, 1).astype(float) * 0.85 + 25, 0, 255).astype(np.uint8)  # a slightly paler stain
    noise = rng.integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
    same, same_std = kid(real, other)
    near = kid(real, image_features(mild, 32))[0]
    far = kid(real, image_features(noise, 32))[0]
    assert abs(same) < 3 * same_std + 0.05  # unbiased: ~0, may be slightly negative
    assert near > 3 * same_std + abs(same)
    assert far > 100 * near
    assert np.isfinite(far) and far < 1e8  # the 1e-8 std of an always-empty histogram bin no longer explodes it


def test_kid_floor_matches_real_vs_real_and_uses_the_reference_scale():
    real = image_features(_real(400, 3), 32)
    floor = kid_floor(real)
    assert abs(floor) < 0.05
    # standardising with the reference's statistics, not each call's own: a rescaled copy of the features
    # stays far from the real set when the real set is the reference
    assert kid(real, real * 3.0, reference=real)[0] > 100 * max(abs(floor), 0.01)
