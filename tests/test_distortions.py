"""Tests of qalign.data.distortions: the 25 KADID-10k distortion types (spec: shared/spec/kadid.md)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from qalign.data import distortions as D


def photo_like(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A deterministic stand-in for a photo: smooth random shading at several scales, a few sharp-edged
    shapes and fine texture, stretched to span exactly 0..255 (so the input min-max is the identity)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3))
    for sigma, gain in ((12, 1.0), (4, 0.5), (1.5, 0.2)):
        img += gain * ndimage.gaussian_filter(rng.standard_normal((height, width, 3)), (sigma, sigma, 0))
    img = (img - img.min()) / (img.max() - img.min())
    yy, xx = np.mgrid[0:height, 0:width]
    img[(yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (height / 5) ** 2] = (0.9, 0.3, 0.2)
    img[height // 8 : height // 3, width // 2 : width - 8] = (0.15, 0.35, 0.8)
    img = (img - img.min()) / (img.max() - img.min())
    out = np.floor(img * 255 + 0.5).astype(np.uint8)
    assert out.min() == 0 and out.max() == 255
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return photo_like()


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def gradient_energy(a: np.ndarray) -> float:
    grey = a.astype(np.float64).mean(axis=2)
    gy, gx = np.gradient(grey)
    return float(np.mean(gx**2 + gy**2))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- tables


def test_names_ids_and_families_cover_the_25_types():
    assert len(D.DISTORTION_NAMES) == 25 and len(set(D.DISTORTION_NAMES)) == 25
    assert D.DISTORTION_NAMES[0] == "GBLUR" and D.DISTORTION_NAMES[9] == "JPEG"
    assert D.DISTORTION_NAMES[24] == "Contrast Dist."
    assert D.name_of(22) == "Quantization"
    grouped = sorted(t for ids in D.FAMILIES.values() for t in ids)
    assert grouped == list(range(1, 26))  # every type in exactly one family
    assert set(D.FAMILIES) == {"blur", "colour", "compression", "noise", "brightness-contrast", "spatial", "sharpness"}
    assert all(len(D.LEVEL_PARAMETERS[t]) == 5 for t in D.TYPE_IDS)


def test_level_parameters_match_table_1():
    assert D.LEVEL_PARAMETERS[9] == (16, 32, 45, 120, 400)  # official JP2K (ARNIQA has 170 at L5)
    assert D.LEVEL_PARAMETERS[10] == (43, 36, 24, 7, 4)
    assert D.LEVEL_PARAMETERS[18] == (0.15, 0.08, 0.0, -0.08, -0.15)  # official order, not ARNIQA's
    assert D.LEVEL_PARAMETERS[25] == (0.3, 0.15, 0.0, -0.4, -0.6)
    assert D.LEVEL_PARAMETERS[3] == (1, 2, 4, 6, 10)  # ReIQA has 8 at L5
    assert D.LEVEL_PARAMETERS[22] == (20, 16, 13, 10, 7)


@pytest.mark.parametrize("type_id, level", [(0, 1), (26, 1), (1, 0), (1, 6), ("1", 1), (1.5, 1)])
def test_bad_type_or_level_raises(image, type_id, level):
    with pytest.raises(ValueError):
        D.apply(image, type_id, level, rng())


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float64)]
)
def test_bad_image_raises(bad):
    with pytest.raises(ValueError):
        D.apply(bad, 1, 1, rng())


# ----------------------------------------------------------------------------- every type


@pytest.mark.parametrize("type_id", D.TYPE_IDS)
def test_every_level_keeps_shape_and_changes_the_image_unless_identity(image, type_id):
    for level in D.LEVELS:
        out = D.apply(image, type_id, level, rng(level))
        assert out.shape == image.shape and out.dtype == np.uint8
        if (type_id, level) in D.IDENTITY_LEVELS:
            np.testing.assert_array_equal(out, image, err_msg=f"type {type_id} L{level} should be the identity")
        else:
            assert mse(out, image) > 0.01, f"type {type_id} L{level} left the image unchanged"


@pytest.mark.parametrize("shape", [(20, 24, 3), (7, 5, 3)])
def test_small_images_work_for_every_type(shape):
    small = photo_like(shape[0], shape[1], seed=3)
    for type_id in D.TYPE_IDS:
        out = D.apply(small, type_id, 5, rng())
        assert out.shape == shape and out.dtype == np.uint8


def test_constant_image_gives_no_nan():
    grey = np.full((40, 48, 3), 128, np.uint8)
    for type_id in D.TYPE_IDS:
        out = D.apply(grey, type_id, 3, rng())
        assert out.shape == grey.shape  # the uint8 cast would have turned a NaN into garbage silently
    np.testing.assert_array_equal(D.apply(grey, 1, 3, rng()), grey)  # a blur of a constant stays put


@pytest.mark.parametrize("type_id", [3, 5, 11, 12, 13, 14, 15, 19, 20, 23])
def test_random_types_are_deterministic_given_the_generator(image, type_id):
    a = D.apply(image, type_id, 4, rng(7))
    b = D.apply(image, type_id, 4, rng(7))
    c = D.apply(image, type_id, 4, rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_input_is_not_modified(image):
    before = image.copy()
    for type_id in D.TYPE_IDS:
        D.apply(image, type_id, 5, rng())
    np.testing.assert_array_equal(image, before)


# Types whose official levels go from mild to strong; signed ones (18, 25), non-eccentricity
# patches (later patches can undo earlier ones) and pixelate (nearest-neighbour resampling error is
# not monotonic in the factor between 0.5 and 1) are left out. Same seed at every level, so the
# random draws are shared and only the strength changes.
MONOTONIC = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 22, 23, 24)


@pytest.mark.parametrize("type_id", MONOTONIC)
def test_stronger_level_deviates_more(image, type_id):
    errors = [mse(D.apply(image, type_id, level, rng(1)), image) for level in D.LEVELS]
    assert all(a < b for a, b in zip(errors, errors[1:])), f"type {type_id}: MSE per level {errors}"


@pytest.mark.parametrize("type_id", [1, 2, 3])
def test_blur_removes_more_detail_at_stronger_levels(image, type_id):
    energies = [gradient_energy(D.apply(image, type_id, level, rng(2))) for level in D.LEVELS]
    assert all(a >= b for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < 0.5 * energies[0]


# ----------------------------------------------------------------------------- MATLAB primitives


@pytest.mark.parametrize("sigma, level", [(0.5, 2), (1, 3), (2, 4), (5, 5)])
def test_gaussian_blur_kernel_is_2_ceil_2sigma_plus_1_wide(sigma, level):
    assert D.LEVEL_PARAMETERS[1][level - 1] == sigma
    impulse = np.zeros((41, 41, 3), np.uint8)
    impulse[20, 20] = 255
    out = D.apply(impulse, 1, level, rng())
    rows, cols = np.nonzero(out[..., 0])
    width = 2 * int(np.ceil(2 * sigma)) + 1
    assert rows.max() - rows.min() + 1 == width and cols.max() - cols.min() + 1 == width


def test_gaussian_blur_replicates_the_border():
    half = np.zeros((30, 30, 3), np.uint8)
    half[:, :15] = 255  # white left half: with replicate padding the left edge stays pure white
    out = D.apply(half, 1, 5, rng())
    assert (out[:, 0] == 255).all() and (out[:, -1] == 0).all()


def test_disk_kernel_matches_fspecial_disk():
    k1 = D.disk_kernel(1.0)
    # MATLAB fspecial('disk', 1): 0.0251 / 0.1453 / 0.3183 (areas of a unit disk over pi)
    np.testing.assert_allclose(k1[1, 1], 1 / np.pi, atol=1e-4)
    np.testing.assert_allclose(k1[0, 1], 0.1453, atol=2e-4)
    np.testing.assert_allclose(k1[0, 0], 0.0251, atol=2e-4)
    for r, size in ((1, 3), (2, 5), (4, 9), (6, 13), (8, 17)):
        k = D.disk_kernel(float(r))
        assert k.shape == (size, size)
        np.testing.assert_allclose(k.sum(), 1.0)
        np.testing.assert_allclose(k, k.T)
        np.testing.assert_allclose(k, k[::-1, ::-1])


def test_motion_kernel_is_a_normalised_line():
    np.testing.assert_array_equal(D.motion_kernel(1.0, 37.0), [[1.0]])  # len 1 = identity
    horizontal = D.motion_kernel(5.0, 0.0)
    assert horizontal.shape[1] == 5 and horizontal.sum(axis=1).max() == pytest.approx(1.0)
    np.testing.assert_allclose(horizontal[horizontal.shape[0] // 2], 0.2)
    vertical = D.motion_kernel(5.0, 90.0)
    np.testing.assert_allclose(vertical, horizontal.T, atol=1e-12)
    diagonal = D.motion_kernel(6.0, 45.0)
    np.testing.assert_allclose(diagonal.sum(), 1.0)
    # counter-clockwise: at 45 degrees the line runs from bottom-left to top-right
    assert diagonal[0, -1] > 0 and diagonal[0, 0] == 0
    np.testing.assert_allclose(diagonal, diagonal[::-1, ::-1])  # point-symmetric


def test_lab_conversion_known_values_and_round_trip():
    np.testing.assert_allclose(D.rgb_to_lab(np.array([1.0, 1.0, 1.0])), [100, 0, 0], atol=1e-9)
    np.testing.assert_allclose(D.rgb_to_lab(np.array([0.0, 0.0, 0.0])), [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(D.rgb_to_lab(np.array([1.0, 0.0, 0.0])), [53.24, 80.09, 67.20], atol=0.02)
    x = np.random.default_rng(0).random((50, 3))
    np.testing.assert_allclose(D.lab_to_rgb(D.rgb_to_lab(x)), x, atol=1e-9)


def test_ycbcr_is_bt601_studio_range():
    np.testing.assert_allclose(D.rgb_to_ycbcr(np.array([1.0, 1.0, 1.0])), [235 / 255, 128 / 255, 128 / 255])
    np.testing.assert_allclose(D.rgb_to_ycbcr(np.array([0.0, 0.0, 0.0])), [16 / 255, 128 / 255, 128 / 255])
    x = np.random.default_rng(0).random((50, 3))
    np.testing.assert_allclose(D.ycbcr_to_rgb(D.rgb_to_ycbcr(x)), x, atol=1e-12)


def test_hsv_round_trip_and_negative_saturation_exceeds_value():
    x = np.random.default_rng(0).random((200, 3))
    np.testing.assert_allclose(D.hsv_to_rgb(D.rgb_to_hsv(x)), x, atol=1e-12)
    hsv = D.rgb_to_hsv(x)
    hsv[:, 1] *= -0.4
    assert (D.hsv_to_rgb(hsv).max(axis=1) >= hsv[:, 2] - 1e-12).all()


def test_tone_curves_pass_through_their_control_points():
    for c in (0.1, 0.45, 0.55, 0.85):
        assert D.parabola_curve(np.array(0.5), c) == pytest.approx(c)
        assert D.parabola_curve(np.array([0.0, 1.0]), c) == pytest.approx([0.0, 1.0])
    for a in D.LEVEL_PARAMETERS[25]:
        points = np.array([0.0, 0.3, 0.5, 0.7, 1.0])
        np.testing.assert_allclose(D.contrast_curve(points, a), [0, 0.25 - a / 4, 0.5, 0.75 + a / 4, 1], atol=1e-12)
    x = np.linspace(0, 1, 11)
    assert not np.allclose(D.contrast_curve(x, 0.0), x)  # L3 is a mild curve, not the identity


def test_otsu_thresholds_are_optimal():
    def between_class(hist, thresholds):
        p = hist / hist.sum()
        bins = np.arange(p.size)
        edges = [-1, *thresholds, p.size - 1]
        total = 0.0
        for lo, hi in zip(edges, edges[1:]):
            w = p[lo + 1 : hi + 1].sum()
            if w > 0:
                total += (p[lo + 1 : hi + 1] * bins[lo + 1 : hi + 1]).sum() ** 2 / w
        return total

    # three separated clusters: two thresholds must fall in the gaps
    hist = np.zeros(256)
    hist[20:30] = 5
    hist[120:125] = 9
    hist[200:230] = 2
    t1, t2 = D.otsu_thresholds(hist, 2)
    assert 29 <= t1 < 120 and 124 <= t2 < 200
    # exhaustive check on a random histogram, for 1 and 2 thresholds
    rand = np.random.default_rng(0).integers(0, 50, 40).astype(float)
    for count in (1, 2):
        best = max(
            between_class(rand, ts) for ts in itertools.combinations(range(39), count)
        )
        found = D.otsu_thresholds(rand, count)
        assert list(found) == sorted(set(found)) and len(found) == count
        assert between_class(rand, found) == pytest.approx(best)


def test_otsu_supports_20_thresholds_quickly():
    hist = np.bincount(photo_like().ravel(), minlength=256)
    t = D.otsu_thresholds(hist, 20)
    assert len(t) == 20 and np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < 255


# ----------------------------------------------------------------------------- per-type behaviour


def test_mean_shift_is_a_gain_up_and_a_crush_down(image):
    x = image / 255.0
    np.testing.assert_array_equal(D.apply(image, 18, 3, rng()), image)
    up = D.apply(image, 18, 1, rng()).astype(int)  # +0.15 -> min(x, 0.85) / 0.85
    expected_up = D.to_uint8(np.minimum(x, 0.85) / 0.85).astype(int)
    assert np.abs(up - expected_up).max() <= 1
    down = D.apply(image, 18, 5, rng()).astype(int)  # -0.15 -> max(x - 0.15, 0) / 0.85
    expected_down = D.to_uint8(np.maximum(x - 0.15, 0) / 0.85).astype(int)
    assert np.abs(down - expected_down).max() <= 1


def test_output_is_min_max_stretched():
    dark = (photo_like() // 2).astype(np.uint8)  # spans 0..127
    out = D.apply(dark, 18, 3, rng())  # identity distortion: only the two stretches act
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out, D.to_uint8(dark / 127.0))


def _pillow_roundtrip(img: np.ndarray, **options) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, **options)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("level", D.LEVELS)
def test_jpeg_matches_pillow_at_the_official_quality(image, level):
    quality = D.LEVEL_PARAMETERS[10][level - 1]
    decoded = _pillow_roundtrip(image, format="JPEG", quality=quality)
    expected = D.to_uint8(D.min_max(decoded / 255.0))
    np.testing.assert_array_equal(D.apply(image, 10, level, rng()), expected)


@pytest.mark.parametrize("ratio", [16, 120])
def test_jp2k_hits_the_compression_ratio(ratio):
    big = photo_like(192, 256, seed=1)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, **D.jp2k_options(ratio))
    assert len(buf.getvalue()) == pytest.approx(big.nbytes / ratio, rel=0.15)


def test_awgn_has_the_official_variance():
    flat = np.full((128, 128, 3), 128, np.uint8)
    flat[0, 0], flat[-1, -1] = 0, 255  # pin the range so the stretches are the identity
    out = D.apply(flat, 11, 5, rng()).astype(float) - flat
    assert out[2:-2].std() == pytest.approx(np.sqrt(0.01) * 255, rel=0.05)


def test_awgn_ycbcr_noise_is_smaller_and_coloured():
    flat = np.full((128, 128, 3), 128, np.uint8)
    flat[0, 0], flat[-1, -1] = 0, 255
    out = D.apply(flat, 12, 5, rng()).astype(float)[2:-2]
    assert 5 < out.std() < 30
    assert not np.allclose(out[..., 0], out[..., 1])


def test_impulse_noise_is_per_channel_salt_and_pepper(image):
    out = D.apply(image, 13, 5, rng())  # density 0.03
    changed = out != image
    assert changed.mean() == pytest.approx(0.03, rel=0.25)
    assert set(np.unique(out[changed])) <= {0, 255}
    per_pixel = changed.sum(axis=2)
    assert (per_pixel == 1).sum() > (per_pixel == 3).sum()  # channels hit independently


def test_multiplicative_noise_is_uniform_speckle():
    flat = np.full((128, 128, 3), 128, np.uint8)
    flat[0, 0], flat[-1, -1] = 0, 255
    out = D.apply(flat, 14, 5, rng()).astype(float)[2:-2] - 128  # variance 0.05 on x = 128/255
    half_width = np.sqrt(3 * 0.05) * 128
    assert np.abs(out).max() <= half_width + 1
    assert out.std() == pytest.approx(np.sqrt(0.05) * 128, rel=0.05)


def test_denoising_is_smoother_than_the_noise_it_removes(image):
    noisy = D.apply(image, 11, 5, rng(3))  # AWGN v = 0.01
    denoised = D.apply(image, 15, 1, rng(3))  # same v, then the denoiser
    assert gradient_energy(denoised) < 0.5 * gradient_energy(noisy)


def test_dct_denoise_with_zero_threshold_is_the_identity(image):
    x = image / 255.0
    np.testing.assert_allclose(D.dct_denoise(x, threshold=0.0), x, atol=1e-5)


def test_colour_shift_changes_only_green():
    img = photo_like(seed=4)
    img[0, 0, [0, 2]] = 0
    img[1, 1, [0, 2]] = 255
    out = D.apply(img, 5, 5, rng())
    np.testing.assert_array_equal(out[..., [0, 2]], img[..., [0, 2]])
    assert mse(out[..., 1], img[..., 1]) > 1


def test_colour_shift_mask_is_normalised(image):
    mask = D.color_shift_mask(image / 255.0)
    assert mask.min() == 0.0 and mask.max() == 1.0


def test_colour_quantisation_uses_n_colours_with_dithering(image):
    out = D.apply(image, 6, 5, rng())  # 8 colours
    colours = np.unique(out.reshape(-1, 3), axis=0)
    assert 2 < len(colours) <= 8
    plain = Image.fromarray(image).quantize(8, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    assert not np.array_equal(out, np.asarray(plain.convert("RGB")))


def test_hsv_saturation_zero_gives_grey_value(image):
    out = D.apply(image, 7, 4, rng()).astype(int)  # f = 0 -> R = G = B = max(R, G, B)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    v = image.max(axis=2).astype(float)
    expected = D.to_uint8((v - v.min()) / (v.max() - v.min())).astype(int)
    assert np.abs(out[..., 0] - expected).max() <= 1  # ties at .5 may round either way


def test_darken_and_brighten_move_the_mean(image):
    means = [D.apply(image, 17, level, rng()).mean() for level in D.LEVELS]
    assert all(a > b for a, b in zip(means, means[1:]))
    means = [D.apply(image, 16, level, rng()).mean() for level in D.LEVELS]
    assert all(a < b for a, b in zip(means, means[1:]))


def test_pixelate_intermediate_size_matches_matlab():
    h, w = 384, 512
    rows, cols = np.mgrid[0:h, 0:w]
    coded = np.stack([rows % 256, cols % 256, (rows // 256) * 60 + (cols // 256) * 120], axis=-1).astype(np.uint8)
    coded[0, 0], coded[-1, -1] = 0, 255
    # kadid.md: intermediate sizes ceil(z H) x ceil(z W). As in MATLAB's nearest-neighbour imresize,
    # the last intermediate row/column can repeat its neighbour's source, so one fewer may be distinct.
    errors = []
    for level, (small_h, small_w) in zip(D.LEVELS, [(341, 455), (302, 402), (269, 358), (219, 292), (112, 149)]):
        out = D.apply(coded, 21, level, rng())
        # every source row/column is distinct and kept in order, so count changes between neighbours
        distinct_rows = 1 + np.count_nonzero((out[1:] != out[:-1]).any(axis=(1, 2)))
        distinct_cols = 1 + np.count_nonzero((out[:, 1:] != out[:, :-1]).any(axis=(0, 2)))
        assert distinct_rows in (small_h - 1, small_h) and distinct_cols in (small_w - 1, small_w)
        errors.append(mse(out, coded))
    assert errors[-1] == max(errors)


def test_quantisation_keeps_at_most_n_plus_one_values(image):
    for level, count in zip(D.LEVELS, D.LEVEL_PARAMETERS[22]):
        out = D.apply(image, 22, level, rng())
        assert len(np.unique(out)) <= count + 1
        assert out.min() == 0 and out.max() == 255


def test_colour_blocks_are_32px_squares(image):
    big = photo_like(128, 160, seed=5)
    out = D.apply(big, 23, 1, rng(11))  # two blocks
    changed = (out != big).any(axis=2)
    assert 0 < changed.sum() <= 2 * 32 * 32
    rows, cols = np.nonzero(changed)
    assert rows.max() - rows.min() < 128 and cols.max() - cols.min() < 160


def test_non_eccentricity_touches_at_most_n_patches(image):
    out = D.apply(image, 20, 1, rng(5))  # 20 patches of 16x16
    changed = (out != image).any(axis=2).sum()
    assert 0 < changed <= 20 * 16 * 16


def test_jitter_scatter_with_zero_sigma_is_identity(image):
    planes = np.ascontiguousarray(image.transpose(2, 0, 1) / 255.0, dtype=np.float32)
    out = D._scatter_once(planes, 0.0, rng())
    np.testing.assert_allclose(out, planes, atol=1e-6)


def test_high_sharpen_leaves_flat_regions_alone():
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, 20:] = 255
    img[:, :20] = (90, 60, 0)  # the image spans 0..255, so both min-max stretches are the identity
    out = D.apply(img, 24, 5, rng())
    np.testing.assert_array_equal(out[:, :8], img[:, :8])  # far from the edge: nothing to sharpen
    assert mse(out[:, 14:26], img[:, 14:26]) > 10  # overshoot at the edge


def test_gaussian_blur_equals_an_edge_padded_sampled_gaussian():
    x = np.random.default_rng(0).random((30, 40, 3))
    for sigma in (0.5, 2.0, 5.0):
        r = int(np.ceil(2 * sigma))
        taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        taps /= taps.sum()
        padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
        rows = sum(w * padded[i : i + 30] for i, w in enumerate(taps))
        expected = sum(w * rows[:, j : j + 40] for j, w in enumerate(taps))
        np.testing.assert_allclose(D.gaussian_blur(x, sigma), expected, atol=1e-12)


def test_quantisation_maps_each_class_to_its_upper_threshold(image):
    x = image.astype(np.int64)
    thresholds = D.otsu_thresholds(np.bincount(x.ravel(), minlength=256), 7)
    out = D.apply(image, 22, 5, rng()).astype(np.int64)
    # kadid.md: 0 if <= t1; t_k if in (t_{k-1}, t_k]; 1 if > tN
    assert (out[x <= thresholds[0]] == 0).all() and (out[x > thresholds[-1]] == 255).all()
    for lower, upper in zip(thresholds, thresholds[1:]):
        in_class = (x > lower) & (x <= upper)
        assert in_class.any() and (out[in_class] == upper).all()


def test_colour_quantisation_dithers_a_smooth_ramp():
    ramp = np.repeat(np.linspace(0, 255, 128)[None, :, None], 64, axis=0).repeat(3, axis=2)
    ramp[..., 1] = ramp[..., 1][:, ::-1]
    out = D.apply(ramp.round().astype(np.uint8), 6, 5, rng())
    changes = (out[:, 1:] != out[:, :-1]).any(axis=2).mean()
    assert changes > 0.2  # without error diffusion 8 colours give a few bands, about 5 % changes


def test_impulse_noise_has_both_salt_and_pepper(image):
    out = D.apply(image, 13, 5, rng())
    changed = out != image
    salt, pepper = (out[changed] == 255).sum(), (out[changed] == 0).sum()
    assert salt == pytest.approx(pepper, rel=0.3)


def test_dct_denoise_keeps_dark_flat_areas():
    flat = 0.01 + 0.05 * np.random.default_rng(0).standard_normal((64, 64, 3))
    assert D.dct_denoise(flat).mean() == pytest.approx(0.01, abs=0.004)


def test_jitter_scatter_adds_up_over_five_passes():
    # On a ramp of slope s, a displacement d changes a value by s*d; five passes of std a give
    # about a*sqrt(5) (a single pass would give a).
    h, w = 64, 128
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = img[..., 1] = np.arange(w) * 2
    img[0, 0, 2] = 255  # pin the range so the stretches are the identity
    out = D.apply(img, 19, 5, rng()).astype(float)  # a = 1 px
    spread = (out - img)[8:-8, 8:-8, 0].std() / 2.0
    assert 1.8 < spread < 2.6


def test_colour_diffusion_multiplies_chroma_by_k():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = (140, 120, 110)  # a low-chroma colour, so x3 stays in gamut
    img[0, 0], img[-1, -1] = 0, 255
    lab_in = D.rgb_to_lab(img[32, 32] / 255.0)
    out = D.apply(img, 4, 2, rng())  # k = 3, sigma = 6.5
    lab_out = D.rgb_to_lab(out[28:36, 28:36] / 255.0).mean(axis=(0, 1))
    assert lab_out[0] == pytest.approx(lab_in[0], abs=0.5)
    np.testing.assert_allclose(lab_out[1:], 3 * lab_in[1:], rtol=0.1)


def test_colour_shift_blends_through_the_edge_mask():
    img = photo_like(seed=6)
    img[:, 64:] = (img[:, 64:] // 16 + 120).astype(np.uint8)  # right half: low contrast
    img[10:50, 10:50] = (255, 255, 255)  # left: a strong edge
    img[0, 0] = 0
    direction = rng(0).random(2)
    down, right = (int(v) for v in D.matlab_round(direction / np.linalg.norm(direction) * 12))
    green = img[..., 1].astype(float)
    shifted = green[np.clip(np.arange(96) - down, 0, 95)][:, np.clip(np.arange(128) - right, 0, 127)]
    out = D.apply(img, 5, 5, rng(0))[..., 1].astype(float)
    # G' = e * G_shifted + (1 - e) * G; R and B span 0..255, so the stretches are the identity
    mask = D.color_shift_mask(img / 255.0)
    assert np.abs(out - (mask * shifted + (1 - mask) * green)).max() <= 1
    flat = (slice(20, 90), slice(84, 120))  # low contrast: little of the shifted plane gets in
    assert np.abs(out - green)[flat].mean() < 0.5 * np.abs(shifted - green)[flat].mean()


def test_brighten_averages_rgb_and_lightness_curves():
    grey = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2).repeat(4, axis=0)
    out = D.apply(grey, 16, 5, rng()).astype(int)  # a = 1.1 -> c = 1.05
    x = grey[0, :, 0] / 255.0
    lab = D.rgb_to_lab(np.stack([x, x, x], axis=-1))
    lab[:, 0] = 100 * D.parabola_curve(lab[:, 0] / 100, 1.05)
    expected = (2 * D.parabola_curve(x, 1.05) + np.clip(D.lab_to_rgb(lab)[:, 0], 0, 1)) / 3
    assert np.abs(out[0, :, 0] - D.to_uint8(expected)).max() <= 1
    assert np.abs(out[0, :, 0] - D.to_uint8(D.parabola_curve(x, 1.05))).max() > 3  # the Lab half matters


def test_high_sharpen_kernel_reaches_six_pixels():
    img = np.zeros((24, 40, 3), np.uint8)
    img[:, 20:] = 255
    img[:, :20] = (90, 60, 0)
    out = D.apply(img, 24, 5, rng())  # sigma 3 -> 13x13 Gaussian: pixels 7+ px from the edge untouched
    np.testing.assert_array_equal(out[:, :14], img[:, :14])
    assert (out[:, 14] != img[:, 14]).any()


def test_awgn_ycbcr_adds_noise_to_luma_and_chroma():
    flat = np.full((96, 96, 3), 128, np.uint8)
    flat[0, 0], flat[-1, -1] = 0, 255
    out = D.apply(flat, 12, 5, rng())[2:-2, 2:-2] / 255.0  # v = 0.003 on Y, Cb and Cr
    ycc = D.rgb_to_ycbcr(out).reshape(-1, 3)
    np.testing.assert_allclose(ycc.std(axis=0), np.sqrt(0.003), rtol=0.1)


@pytest.mark.parametrize("level", [1, 3])
def test_colour_diffusion_blurs_chroma_with_sigma_1_5k_plus_2(image, level):
    k = D.LEVEL_PARAMETERS[4][level - 1]
    lab = D.rgb_to_lab(image / 255.0)
    r = int(np.ceil(2 * (1.5 * k + 2)))
    padded = np.pad(lab[..., 1:], ((r, r), (r, r), (0, 0)), mode="edge")
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / (1.5 * k + 2)) ** 2)
    taps /= taps.sum()
    rows = sum(w * padded[i : i + image.shape[0]] for i, w in enumerate(taps))
    lab[..., 1:] = k * sum(w * rows[:, j : j + image.shape[1]] for j, w in enumerate(taps))
    expected = D.to_uint8(D.min_max(np.clip(D.lab_to_rgb(lab), 0, 1))).astype(int)
    assert np.abs(D.apply(image, 4, level, rng()).astype(int) - expected).max() <= 1


def test_colour_shift_mask_zeroes_weak_gradients():
    img = np.full((64, 64, 3), 100, np.uint8)
    img[:, 32:] += (np.arange(32) % 2 * 3).astype(np.uint8)[None, :, None]  # faint texture (5 % gradients)
    img[8:24, 4:20] = 255  # one strong-edged square
    img[0, 0] = 0
    mask = D.color_shift_mask(img / 255.0)
    assert mask[:, 44:].max() == 0.0  # below 10 % of the peak: clipped to the floor, then to 0
    assert mask[16, 4] == pytest.approx(1.0, abs=0.2)
    assert mask[16, 25] > 0.05  # the sigma-4 blur carries the edge 5 px out (sigma 2 would not)


def test_colour_blocks_cover_32x32_each():
    big = photo_like(128, 160, seed=5)
    for seed in range(3):
        out = D.apply(big, 23, 1, rng(seed))  # two blocks, possibly overlapping
        changed = (out != big).any(axis=2).sum()
        assert 1000 <= changed <= 2 * 32 * 32
