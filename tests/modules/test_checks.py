"""d2l_face.checks: each argument check passes good arguments and refuses,
with the exception and message it promises, the bad ones, at the edges.

Every check is called directly, with NumPy arrays, files in `tmp_path` and
small fakes of a training iterator, so no framework is needed.
"""
import math
import re
import types

import numpy as onp
import pytest

from d2l_face import checks, formats
from synthetic import jpeg

NAN, INF = float('nan'), float('inf')
TEMPLATE = formats.ARCFACE_TEMPLATE.astype(onp.float64)  # a real face


def refused(error, fragment):
    """pytest.raises for `error` whose message holds `fragment` verbatim."""
    return pytest.raises(error, match=re.escape(fragment))


# --- Datasets and pre-processing --------------------------------------------

@pytest.mark.parametrize('source', checks.FACE_SOURCES)
def test_face_source_takes_the_three_settings(source):
    assert checks.check_face_source(source) is None


@pytest.mark.parametrize('source', ['', 'Real', 'stand-in', None])
def test_face_source_refuses_others_by_name(source):
    with refused(ValueError, f'must be auto, real or standin, not '
                             f'{source!r}'):
        checks.check_face_source(source)


def test_standin_exists_for_casia_ultrasmall_only():
    assert checks.check_standin_name('faces-casia-ultrasmall') is None
    with refused(ValueError, 'faces-casia-ultrasmall only, not for '
                             'faces-casia-small'):
        checks.check_standin_name('faces-casia-small')


@pytest.mark.parametrize('tail, complete', [
    (b'', True),
    (b'\0\0\0\0', True),  # zero padding after the end marker
    (b'junk', False),
], ids=['whole', 'zero-padded', 'trailing-junk'])
def test_complete_jpeg_needs_the_end_marker_last(tail, complete):
    data = jpeg(8, 8) + tail
    if complete:
        assert checks.check_complete_jpeg(data, 'a.jpg') is None
    else:
        with refused(ValueError, 'a.jpg: not a complete JPEG file'):
            checks.check_complete_jpeg(data, 'a.jpg')


@pytest.mark.parametrize('cut', [1, 2, 100], ids=lambda n: f'{n}-bytes-cut')
def test_truncated_jpeg_is_refused(cut):
    data = jpeg(8, 8)
    with refused(ValueError, 'b.jpg: not a complete JPEG file (truncated?)'):
        checks.check_complete_jpeg(data[:-cut], 'b.jpg')


def test_empty_file_is_no_complete_jpeg():
    with refused(ValueError, 'c.jpg: not a complete JPEG'):
        checks.check_complete_jpeg(b'', 'c.jpg')


@pytest.mark.parametrize('shape, image_size', [
    ((10, 20, 3), None), ((10, 20, 3), (10, 20)), ((10, 20), [10, 20]),
], ids=['any-size', 'tuple-size', 'gray-list-size'])
def test_decoded_image_of_the_expected_size_passes(shape, image_size):
    image = onp.zeros(shape, onp.uint8)
    assert checks.check_decoded(image, 'a.jpg', image_size) is None


def test_failed_decode_is_named():
    with refused(ValueError, 'rec 7 cannot be decoded as an image'):
        checks.check_decoded(None, 'rec 7', (112, 112))


@pytest.mark.parametrize('shape', [(20, 10, 3), (10, 21, 3), (112, 112)])
def test_decoded_image_of_another_size_is_refused(shape):
    image = onp.zeros(shape, onp.uint8)
    with refused(ValueError, f'a.jpg decoded to {shape[1]}x{shape[0]}, '
                             f'expected 20x10'):
        checks.check_decoded(image, 'a.jpg', (10, 20))


def test_identity_folder_with_images_passes(tmp_path):
    assert checks.check_identity_folder(
        str(tmp_path), [str(tmp_path / '0.jpg')], 3) is None


def test_missing_identity_folder_is_refused(tmp_path):
    missing = str(tmp_path / '00000002')
    with refused(FileNotFoundError, f'{missing}: missing, although property '
                                    f'says there are 3 classes'):
        checks.check_identity_folder(missing, [], 3)
    (tmp_path / 'a-file').write_bytes(b'')  # a file is no folder either
    with refused(FileNotFoundError, 'missing'):
        checks.check_identity_folder(str(tmp_path / 'a-file'), ['x.jpg'], 3)


def test_empty_identity_folder_is_refused(tmp_path):
    with refused(FileNotFoundError, f'{tmp_path}: holds no .jpg images'):
        checks.check_identity_folder(str(tmp_path), [], 3)


@pytest.mark.parametrize('file_size, max_images, limit', [
    (0, 5000, 1000),          # a small file may still list a thousand
    (199_999, 5000, 1999),    # beyond that, one image per hundred bytes
    (200_000, 5000, 2000),
    (200_000, 1500, 1500),    # and never more than max_images
], ids=['small-file', 'just-below-2000', 'size-limit', 'max-images'])
def test_bin_count_allows_up_to_the_limit(tmp_path, file_size, max_images,
                                          limit):
    path = tmp_path / 'lfw.bin'
    with open(path, 'wb') as f:
        f.truncate(file_size)
    assert checks.check_bin_count(str(path), limit, max_images) is None
    with refused(ValueError, f'{path}: {limit + 1} images, more than the '
                             f'{limit} allowed'):
        checks.check_bin_count(str(path), limit + 1, max_images)


def test_bin_count_of_a_missing_file_raises_file_not_found(tmp_path):
    with refused(FileNotFoundError, 'gone.bin'):
        checks.check_bin_count(str(tmp_path / 'gone.bin'), 1, 10)


@pytest.mark.parametrize('batch_size', [1, 256, onp.int64(8)],
                         ids=['one', 'many', 'numpy-int'])
def test_positive_integer_batch_size_passes(batch_size):
    assert checks.check_batch_size(batch_size) is None


@pytest.mark.parametrize('batch_size', [0, -1, 2.0, '8', None, True])
def test_other_batch_sizes_are_refused(batch_size):
    with refused(ValueError, f'batch_size must be a positive integer, not '
                             f'{batch_size!r}'):
        checks.check_batch_size(batch_size)


# --- Landmarks, images and photos -------------------------------------------

def line_with_bump(bump):
    """Five points 10 pixels apart on the x-axis, the middle one `bump` up."""
    return [[0, 0], [10, 0], [20, bump], [30, 0], [40, 0]]


@pytest.mark.parametrize('landmark', [
    TEMPLATE, TEMPLATE.astype(onp.float32), TEMPLATE.round().astype(int),
    TEMPLATE.tolist(), TEMPLATE * 0.03,  # still over a pixel across
    TEMPLATE - 1000,
    TEMPLATE - TEMPLATE.max() + (1e6 - 1),  # just within a million
    line_with_bump(0.05),  # far from a line, on this scale
], ids=['float64', 'float32', 'int', 'list', 'small-face', 'negative',
        'near-a-million', 'almost-collinear'])
def test_landmarks_of_a_face_come_back_as_float64(landmark):
    result = checks.check_landmarks(landmark)
    assert result.dtype == onp.float64 and result.shape == (5, 2)
    onp.testing.assert_allclose(result, onp.asarray(landmark, onp.float64))


@pytest.mark.parametrize('landmark, message', [
    (TEMPLATE[:4], 'must have shape (5, 2), not (4, 2)'),
    (TEMPLATE.T, 'must have shape (5, 2), not (2, 5)'),
    (TEMPLATE.ravel(), 'must have shape (5, 2), not (10,)'),
    (TEMPLATE + 0j, 'must hold real numbers, not complex128'),
    (TEMPLATE.astype(str), 'must hold real numbers, not <U'),
    (TEMPLATE > 50, 'must hold real numbers, not bool'),
    ([[2 ** 70, 0]] * 5, 'must hold real numbers, not object'),
    (onp.where(onp.eye(5, 2), NAN, TEMPLATE), 'holds NaN or infinite'),
    (onp.where(onp.eye(5, 2), -INF, TEMPLATE), 'holds NaN or infinite'),
    (TEMPLATE - TEMPLATE.max() + 1e6, 'within a million pixels, not 1e+06'),
    (TEMPLATE - TEMPLATE.max() - 1e6, 'within a million pixels'),
    ([[5, 5]] * 5, 'points all coincide'),
    (TEMPLATE * 0.02, 'points all coincide'),  # under a pixel across
    (line_with_bump(0), 'points are collinear'),
    (line_with_bump(0.02), 'points are collinear'),
    ([[0, 0], [1e4, 1e4], [2e4, 2e4], [3e4, 3e4], [4e4, 4e4]],
     'points are collinear'),
], ids=['4-points', 'transposed', 'flat', 'complex', 'text', 'bool',
        'huge-ints', 'nan', 'infinity', 'a-million', 'minus-a-million',
        'one-point', 'under-a-pixel', 'on-a-line', 'nearly-on-a-line',
        'diagonal-line'])
def test_landmarks_that_are_no_face_are_refused(landmark, message):
    with refused(ValueError, message):
        checks.check_landmarks(landmark)


@pytest.mark.parametrize('shape', [(4, 5), (4, 5, 1), (4, 5, 3), (4, 5, 4),
                                   (1, 32766)])
@pytest.mark.parametrize('dtype', checks.WARP_DTYPES)
def test_an_image_opencv_warps_comes_back(shape, dtype):
    image = onp.zeros(shape, dtype)
    assert checks.check_image(image) is image


@pytest.mark.parametrize('image, message', [
    ([[0, 0], [0, 0]], 'must be a non-empty numpy array'),
    (onp.zeros(4, onp.uint8), 'of shape (h, w) or (h, w, c)'),
    (onp.zeros((1, 4, 4, 3), onp.uint8), 'of shape (h, w) or (h, w, c)'),
    (onp.zeros((0, 4, 3), onp.uint8), 'must be a non-empty numpy array'),
    (onp.zeros((4, 4, 0), onp.uint8), 'must be a non-empty numpy array'),
    (onp.zeros((4, 4, 5), onp.uint8), 'with at most 4 channels'),
    (onp.zeros((4, 4), bool), 'image of dtype bool: OpenCV warps only uint8'),
    (onp.zeros((4, 4), onp.int32), 'image of dtype int32'),
    (onp.zeros((4, 4), onp.float16), 'image of dtype float16'),
    (onp.zeros((4, 4), onp.int8), 'image of dtype int8'),
    (onp.zeros((1, 32767), onp.uint8), 'image of 32767x1 pixels'),
    (onp.zeros((32767, 1), onp.uint8), 'image of 1x32767 pixels'),
], ids=['list', '1-d', '4-d', 'no-rows', 'no-channels', '5-channels',
        'bool', 'int32', 'float16', 'int8', 'too-wide', 'too-high'])
def test_an_image_opencv_cannot_warp_is_refused(image, message):
    with refused(ValueError, message):
        checks.check_image(image)


def placed(x_max=None, y_max=None, x_min=None, y_min=None):
    """The face template moved so that one coordinate is exactly a value."""
    points = TEMPLATE.copy()
    for axis, value, extreme in [(0, x_max, max), (1, y_max, max),
                                 (0, x_min, min), (1, y_min, min)]:
        if value is not None:
            # Subtract first: the extreme becomes 0, then exactly `value`.
            points[:, axis] = points[:, axis] - extreme(points[:, axis]) \
                + value
    return points


# A 200x100 image (w x h): its centre is (100, 50), and landmarks may lie up
# to 1.5 widths (300) across and 1.5 heights (150) down from it.
WIDE = onp.zeros((100, 200, 3), onp.uint8)


@pytest.mark.parametrize('landmark', [
    TEMPLATE, placed(x_max=400), placed(x_min=-200), placed(y_max=200),
    placed(y_min=-100),
], ids=['inside', 'right-edge', 'left-edge', 'bottom-edge', 'top-edge'])
@pytest.mark.parametrize('image_size', [1, 112, 1024, onp.int64(112)],
                         ids=['1', '112', '1024', 'numpy-int'])
def test_alignment_on_or_near_the_image_passes(landmark, image_size):
    result = checks.check_alignment(WIDE, landmark, image_size)
    assert result.dtype == onp.float64
    onp.testing.assert_array_equal(result, landmark)


@pytest.mark.parametrize('image_size', [0, -112, 1025, 112.0, True, '112'])
def test_alignment_refuses_a_crop_size_that_is_no_crop(image_size):
    with refused(ValueError, f'image_size must be a positive integer of at '
                             f'most 1024, not {image_size!r}'):
        checks.check_alignment(WIDE, TEMPLATE, image_size)


@pytest.mark.parametrize('landmark', [
    placed(x_max=400.01), placed(x_min=-200.01), placed(y_max=200.01),
    placed(y_min=-100.01),
], ids=['right', 'left', 'below', 'above'])
def test_alignment_refuses_landmarks_a_whole_image_away(landmark):
    with refused(ValueError, 'more than a whole image outside the 200x100 '
                             'image'):
        checks.check_alignment(WIDE, landmark, 112)


def test_alignment_checks_image_and_landmarks_too():
    with refused(ValueError, 'image of dtype int32'):
        checks.check_alignment(WIDE.astype(onp.int32), TEMPLATE, 112)
    with refused(ValueError, 'points are collinear'):
        checks.check_alignment(WIDE, line_with_bump(0), 112)


def big_photo(height, width):
    """A uint8 RGB photo of this size that takes no memory (a view)."""
    return onp.broadcast_to(onp.zeros(3, onp.uint8), (height, width, 3))


@pytest.mark.parametrize('image', [
    onp.zeros((1, 1, 3), onp.uint8), onp.zeros((480, 640, 3), onp.uint8),
    big_photo(5000, 5000),
], ids=['one-pixel', 'vga', 'max-pixels'])
def test_rgb_uint8_photo_comes_back(image):
    assert checks.check_photo(image) is image


@pytest.mark.parametrize('image, message', [
    ([[[0, 0, 0]]], 'of shape (h, w, 3), not list'),
    (onp.zeros((4, 4), onp.uint8), 'of shape (h, w, 3), not (4, 4)'),
    (onp.zeros((4, 4, 4), onp.uint8), 'of shape (h, w, 3), not (4, 4, 4)'),
    (onp.zeros((0, 4, 3), onp.uint8), 'of shape (h, w, 3), not (0, 4, 3)'),
    (onp.zeros((4, 4, 3), onp.float32), 'uint8 photo (0..255), not float32'),
    (big_photo(5000, 5001), 'a photo of 5001x5000 pixels, more than '
                            'MAX_PHOTO_PIXELS (25000000)'),
], ids=['list', 'gray', 'rgba', 'empty', 'float', 'one-column-too-many'])
def test_what_is_no_rgb_uint8_photo_is_refused(image, message):
    with refused(ValueError, message):
        checks.check_photo(image)


NETS = (object(), object(), object())  # stand-ins for P-Net, R-Net, O-Net


@pytest.mark.parametrize('nets', [None, NETS, list(NETS)],
                         ids=['default', 'tuple', 'list'])
@pytest.mark.parametrize('min_face_size', [12, 20, onp.int64(12)])
def test_detector_takes_three_nets_and_faces_of_12_or_more(nets,
                                                           min_face_size):
    assert checks.check_detector(nets, min_face_size) is None


@pytest.mark.parametrize('min_face_size', [11, 0, 12.0, True, None])
def test_detector_refuses_faces_below_pnets_window(min_face_size):
    with refused(ValueError, f"min_face_size must be an integer of at least "
                             f"12 (P-Net's window), not {min_face_size!r}"):
        checks.check_detector(None, min_face_size)


@pytest.mark.parametrize('nets', [NETS[:2], NETS * 2, 'PRO', {1: 2, 3: 4,
                                                               5: 6}],
                         ids=['two', 'six', 'text', 'dict'])
def test_detector_refuses_nets_other_than_three(nets):
    with refused(ValueError, 'nets must be the three networks P-Net, R-Net '
                             'and O-Net'):
        checks.check_detector(nets, 20)


# --- Face-ResNet, margin losses and the parallel margin layer ---------------

DEPTHS = {50, 18, 34}


@pytest.mark.parametrize('depth, width', [(18, 1), (50, 0.5), (34, 64)])
def test_face_resnet_of_a_known_depth_and_positive_width_passes(depth,
                                                                width):
    assert checks.check_face_resnet(depth, DEPTHS, width) is None


@pytest.mark.parametrize('depth, width, message', [
    (101, 64, 'depth must be one of [18, 34, 50], not 101'),
    ('50', 64, "depth must be one of [18, 34, 50], not '50'"),
    (50, 0, 'width must be positive, not 0'),
    (50, -1, 'width must be positive, not -1'),
    (50, NAN, 'width must be positive, not nan'),
], ids=['unknown-depth', 'text-depth', 'zero-width', 'negative-width',
        'nan-width'])
def test_face_resnet_of_another_depth_or_width_is_refused(depth, width,
                                                          message):
    with refused(ValueError, message):
        checks.check_face_resnet(depth, DEPTHS, width)


@pytest.mark.parametrize('s, m1, m2, m3', [
    (64, 1, 0.5, 0),          # ArcFace
    (64, 1, 0, 0.35),         # CosFace
    (64, 1.35, 0, 0),         # SphereFace
    (1e-3, 1e-3, 0, -1e3),    # small, and a negative additive margin
    (64, 1, math.nextafter(math.pi, 0), 0),  # just below pi
], ids=['arcface', 'cosface', 'sphereface', 'tiny', 'm2-below-pi'])
def test_margins_with_finite_logits_pass(s, m1, m2, m3):
    assert checks.check_margin(s, m1, m2, m3) is None


@pytest.mark.parametrize('s, m1, m2, m3', [
    (0, 1, 0.5, 0), (-64, 1, 0.5, 0), (INF, 1, 0.5, 0), (NAN, 1, 0.5, 0),
    (64, 0, 0.5, 0), (64, -1, 0.5, 0), (64, INF, 0.5, 0), (64, NAN, 0.5, 0),
    (64, 1, -0.01, 0), (64, 1, math.pi, 0), (64, 1, NAN, 0),
    (64, 1, 0.5, INF), (64, 1, 0.5, -INF), (64, 1, 0.5, NAN),
], ids=['s-zero', 's-negative', 's-inf', 's-nan', 'm1-zero', 'm1-negative',
        'm1-inf', 'm1-nan', 'm2-negative', 'm2-pi', 'm2-nan', 'm3-inf',
        'm3-minus-inf', 'm3-nan'])
def test_margins_that_break_the_logits_are_refused(s, m1, m2, m3):
    with refused(ValueError, f'0 <= m2 < pi and a finite m3, not s={s}, '
                             f'm1={m1}, m2={m2}, m3={m3}'):
        checks.check_margin(s, m1, m2, m3)


@pytest.mark.parametrize('num_classes, num_shards, ok', [
    (10, 1, True), (10, 10, True), (1, 1, True),
    (10, 0, False), (10, -1, False), (10, 11, False), (0, 1, False),
])
def test_shards_are_between_one_and_the_number_of_classes(num_classes,
                                                          num_shards, ok):
    if ok:
        assert checks.check_shards(num_classes, num_shards) is None
    else:
        with refused(ValueError, f'cannot split {num_classes} classes into '
                                 f'{num_shards} non-empty shards'):
            checks.check_shards(num_classes, num_shards)


def test_one_batch_of_images_is_enough_one_image_less_is_not():
    assert checks.check_one_batch(8, 8, 3, 'train.rec') is None
    assert checks.check_one_batch(9, 8, 3, 'train.rec') is None
    with refused(ValueError, 'train.rec has 7 images of the first 3 '
                             'identities, fewer than the batch size 8'):
        checks.check_one_batch(7, 8, 3, 'train.rec')


@pytest.mark.parametrize('batch_size, num_parts, ok', [
    (8, 1, True), (8, 4, True), (8, 8, True), (0, 3, True),
    (8, 3, False), (8, 16, False), (7, 2, False),
])
def test_batch_cuts_into_equal_parts_or_is_refused(batch_size, num_parts,
                                                   ok):
    if ok:
        assert checks.check_equal_parts(batch_size, num_parts) is None
    else:
        with refused(ValueError, f'a batch of {batch_size} does not cut '
                                 f'into {num_parts} equal parts'):
            checks.check_equal_parts(batch_size, num_parts)


@pytest.mark.parametrize('num_parts', [0, -2])
def test_no_parts_is_refused(num_parts):
    with refused(ValueError, f'num_parts must be at least 1, not '
                             f'{num_parts}'):
        checks.check_equal_parts(8, num_parts)


def test_timing_needs_two_steps():
    assert checks.check_timed_steps(2) is None
    assert checks.check_timed_steps(100) is None
    for num_steps in (1, 0, -3):
        with refused(ValueError, f'num_steps must be at least 2, not '
                                 f'{num_steps}'):
            checks.check_timed_steps(num_steps)


# --- Verification -----------------------------------------------------------

@pytest.mark.parametrize('shape', [(2, 1, 3, 4, 4), (2, 6, 3, 112, 112)])
def test_pair_images_as_load_bin_gives_pass(shape):
    assert checks.check_pair_images(onp.zeros(shape, onp.uint8)) is None


@pytest.mark.parametrize('shape', [(2, 0, 3, 4, 4), (1, 2, 3, 4, 4),
                                   (3, 2, 3, 4, 4), (2, 2, 3, 4),
                                   (4, 3, 4, 4), (1, 2, 2, 3, 4, 4),
                                   (2, 2, 1, 4, 4)],
                         ids=['no-pairs', 'one-side', 'three-sides', '4-d',
                              'flat-pairs', '6-d', 'gray'])
def test_pair_images_of_another_shape_are_refused(shape):
    with refused(ValueError, f'expected images of shape (2, n, 3, h, w) '
                             f'with n > 0, not {shape}'):
        checks.check_pair_images(onp.zeros(shape, onp.uint8))


def test_embeddings_come_two_rows_per_pair():
    assert checks.check_pair_embeddings(onp.zeros((4, 8))) is None
    for shape in [(3, 8), (8,), (2, 2, 2)]:
        with refused(ValueError, f'two embeddings per pair, in rows, not an '
                                 f'array of shape {shape}'):
            checks.check_pair_embeddings(onp.zeros(shape))


@pytest.mark.parametrize('scores, issame, num_folds', [
    ([0.1, 0.9], [False, True], 1),
    ([0.1, 0.9], [0, 1], 2),          # labels as integers, one per fold
    ([1, -3, 2], [1.0, 0.0, 1.0], 3),  # integer scores, float labels
    ([0.5], [True], 0),               # zero folds still need one pair
    ([0.5, 0.5], [True, True], 1),    # both kinds is another check's job
], ids=['bool-labels', 'int-labels', 'int-scores', 'no-folds', 'one-kind'])
def test_finite_scores_and_binary_labels_pass(scores, issame, num_folds):
    assert checks.check_pairs(onp.array(scores), onp.array(issame),
                              num_folds) is None


@pytest.mark.parametrize('scores, issame, num_folds, message', [
    ([0.1j, 0.9], [0, 1], 1, 'scores must be real numbers, not complex128'),
    (['0.1', '0.9'], [0, 1], 1, 'scores must be real numbers, not <U3'),
    ([True, False], [0, 1], 1, 'scores must be real numbers, not bool'),
    ([[0.1, 0.9]], [[0, 1]], 1,
     'one score and one label per pair, not shapes (1, 2) and (1, 2)'),
    ([0.1, 0.9], [0, 1, 1], 1,
     'one score and one label per pair, not shapes (2,) and (3,)'),
    ([], [], 1, '0 pairs are too few for 1 fold(s)'),
    ([], [], 0, '0 pairs are too few for 1 fold(s)'),
    ([0.1, 0.9], [0, 1], 3, '2 pairs are too few for 3 fold(s)'),
    ([0.1, NAN, 0.3, INF], [0, 1, 0, 1], 1,
     '2 scores are NaN or infinite, the first of pair 1: is an embedding '
     'all zeros?'),
    ([0.1, 0.9], [0, 2], 1, 'labels must be True/False or 1/0'),
    ([0.1, 0.9], [0, 0.5], 1, 'labels must be True/False or 1/0'),
    ([0.1, 0.9], ['0', '1'], 1, 'labels must be True/False or 1/0'),
    ([0.1, 0.9], onp.array([0, 1], object), 1,
     'labels must be True/False or 1/0'),
    ([0.1, 0.9], [0, NAN], 1, 'labels must be True/False or 1/0'),
], ids=['complex', 'text', 'bool-scores', '2-d', 'mismatched', 'no-pairs',
        'no-pairs-no-folds', 'too-few-for-folds', 'nan-and-inf', 'label-2',
        'label-half', 'text-labels', 'object-labels', 'nan-label'])
def test_scores_and_labels_that_give_no_accuracy_are_refused(
        scores, issame, num_folds, message):
    with refused(ValueError, message):
        checks.check_pairs(onp.array(scores), onp.array(issame), num_folds)


def test_scores_need_one_value_and_no_nan_or_infinity():
    assert checks.check_finite_scores(onp.array([0.5])) is None
    assert checks.check_finite_scores(onp.array([[-1, 2], [3, 4]])) is None
    for scores in ([], [0.5, NAN], [INF, 0.5], [-INF]):
        with refused(ValueError, 'need at least one score, and no NaN or '
                                 'infinity'):
            checks.check_finite_scores(onp.array(scores))


@pytest.mark.parametrize('thresholds, ok', [
    (onp.linspace(-1, 1, 401), True), (onp.array([0.3]), True),
    (onp.arange(3), True),
    (onp.array([]), False), (onp.array(0.3), False),
    (onp.zeros((2, 3)), False), (onp.array([0.1, NAN]), False),
    (onp.array([-INF, 0.1]), False),
], ids=['linspace', 'one', 'ints', 'empty', 'scalar', '2-d', 'nan', 'inf'])
def test_thresholds_are_a_non_empty_list_of_finite_numbers(thresholds, ok):
    if ok:
        assert checks.check_thresholds(thresholds) is None
    else:
        with refused(ValueError, 'thresholds must be a non-empty list of '
                                 'finite numbers'):
            checks.check_thresholds(thresholds)


@pytest.mark.parametrize('num_pairs, num_folds', [
    (10, 2), (10, 10), (6000, 10), (onp.int64(10), onp.int32(5)),
])
def test_two_to_num_pairs_folds_pass(num_pairs, num_folds):
    assert checks.check_folds(num_pairs, num_folds) is None


@pytest.mark.parametrize('num_pairs, num_folds, message', [
    (10, 1, 'need 2 or more folds, and at least one pair per fold: '
            '10 pairs, 1 folds'),
    (10, 0, '10 pairs, 0 folds'),
    (10, 11, '10 pairs, 11 folds'),
    (0, 2, '0 pairs, 2 folds'),
    (10.0, 2, 'must be integers, not 10.0 and 2'),
    (10, 2.0, 'must be integers, not 10 and 2.0'),
    (10, True, 'must be integers, not 10 and True'),
    ('10', 2, "must be integers, not '10' and 2"),
], ids=['one-fold', 'no-folds', 'more-folds-than-pairs', 'no-pairs',
        'float-pairs', 'float-folds', 'bool-folds', 'text-pairs'])
def test_other_fold_counts_are_refused(num_pairs, num_folds, message):
    with refused(ValueError, message):
        checks.check_folds(num_pairs, num_folds)


@pytest.mark.parametrize('far', [0, 1, 0.5, 1e-3, onp.float32(0.1),
                                 onp.float64(1.0), onp.int64(0)])
def test_far_between_0_and_1_passes(far):
    assert checks.check_far(far) is None


@pytest.mark.parametrize('far', [-0.01, 1.01, NAN, INF, True, '0.1', None,
                                 0.1j, [0.1], onp.array([0.1])])
def test_other_far_is_refused(far):
    with refused(ValueError, f'far must be a number between 0 and 1, not '
                             f'{far!r}'):
        checks.check_far(far)


def test_evaluation_needs_same_and_different_pairs():
    assert checks.check_both_kinds(onp.array([True, False]), 'lfw') is None
    assert checks.check_both_kinds(onp.array([0, 0, 1]), 'lfw') is None
    for issame in ([True, True], [False, False], [], [1]):
        with refused(ValueError, 'fold 3 need both same and different '
                                 'pairs'):
            checks.check_both_kinds(onp.array(issame, bool), 'fold 3')


def unit_rows(n, d=8, seed=0):
    """`n` random rows of length 1."""
    rows = onp.random.default_rng(seed).normal(size=(n, d))
    return rows / onp.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize('embeddings, num_images', [
    (unit_rows(4), 4), (unit_rows(4) * (1 + 5e-5), 4), (unit_rows(0), 0),
], ids=['unit', 'within-1e-4', 'none'])
def test_one_unit_embedding_per_image_passes(embeddings, num_images):
    assert checks.check_unit_embeddings(embeddings, num_images,
                                        'lfw') is None


@pytest.mark.parametrize('embeddings, num_images, shape', [
    (unit_rows(4), 5, '(4, 8)'), (unit_rows(4), 3, '(4, 8)'),
    (unit_rows(4) * (1 + 3e-4), 4, '(4, 8)'),
    (onp.vstack([unit_rows(3), onp.zeros((1, 8))]), 4, '(4, 8)'),
    (onp.full((2, 8), NAN), 2, '(2, 8)'),
], ids=['too-few', 'too-many', 'too-long', 'a-zero-row', 'nan'])
def test_what_is_no_unit_embedding_per_image_is_refused(embeddings,
                                                        num_images, shape):
    with refused(ValueError, f'lfw: embed must return one unit-length '
                             f'embedding per image, {num_images} in all, not '
                             f'an array of shape {shape}'):
        checks.check_unit_embeddings(embeddings, num_images, 'lfw')


@pytest.mark.parametrize('batch_size, num_devices, ok', [
    (2, 1, True), (4, 2, True), (64, 8, True), (16, 8, True),
    (1, 1, False), (3, 2, False), (15, 8, False), (0, 1, False),
])
def test_every_device_needs_two_images_for_batch_norm(batch_size,
                                                      num_devices, ok):
    if ok:
        assert checks.check_batch_per_device(batch_size, num_devices) is None
    else:
        with refused(ValueError, f'a training batch of {batch_size} images '
                                 f'on {num_devices} device(s): batch '
                                 f'normalization needs at least 2'):
            checks.check_batch_per_device(batch_size, num_devices)


@pytest.mark.parametrize('lr, wd, momentum', [
    (0.1, 5e-4, 0.9), (1e-9, 0, 0), (0.1, 0.0, 0.0), (1, 1, 1.5),
])
def test_usable_sgd_settings_pass(lr, wd, momentum):
    assert checks.check_sgd_settings(lr, wd, momentum) is None


@pytest.mark.parametrize('lr, wd, momentum, message', [
    (0, 5e-4, 0.9, 'lr must be a finite, positive number, not 0'),
    (-0.1, 5e-4, 0.9, 'lr must be a finite, positive number, not -0.1'),
    (INF, 5e-4, 0.9, 'lr must be a finite, positive number, not inf'),
    (NAN, 5e-4, 0.9, 'lr must be a finite, positive number, not nan'),
    (0.1, -1e-4, 0.9, 'wd must be a finite, non-negative number, not '
                      '-0.0001'),
    (0.1, INF, 0.9, 'wd must be a finite, non-negative number, not inf'),
    (0.1, NAN, 0.9, 'wd must be a finite, non-negative number, not nan'),
    (0.1, 5e-4, -0.9, 'momentum must be a finite, non-negative number, '
                      'not -0.9'),
    (0.1, 5e-4, INF, 'momentum must be a finite, non-negative number, '
                     'not inf'),
    (0.1, 5e-4, NAN, 'momentum must be a finite, non-negative number, '
                     'not nan'),
], ids=['lr-zero', 'lr-negative', 'lr-inf', 'lr-nan', 'wd-negative',
        'wd-inf', 'wd-nan', 'momentum-negative', 'momentum-inf',
        'momentum-nan'])
def test_unusable_sgd_settings_are_named(lr, wd, momentum, message):
    with refused(ValueError, message):
        checks.check_sgd_settings(lr, wd, momentum)


# --- Training input ---------------------------------------------------------

class PackIter:
    """A fake of FaceRecordIter: a pack of images, a batch size, a length."""
    def __init__(self, num_images, batch_size):
        self.pack, self.batch_size = [None] * num_images, batch_size

    def __len__(self):
        return len(self.pack) // self.batch_size


def no_length():
    yield 'a batch'


@pytest.mark.parametrize('train_iter, description', [
    (PackIter(30, 8), '30 images in batches of 8, the last incomplete '
                      'batch dropped'),
    (PackIter(5, 8), '5 images in batches of 8, the last incomplete batch '
                     'dropped'),
    ([('X', 'y')] * 3, 'list of length 3'),
    (types.SimpleNamespace(pack=[1, 2], batch_size=None),
     'SimpleNamespace of length ?'),
    (no_length(), 'generator of length ?'),
], ids=['pack', 'pack-below-a-batch', 'list', 'no-batch-size', 'generator'])
def test_describe_batches_says_what_the_iterator_tells(train_iter,
                                                       description):
    assert checks.describe_batches(train_iter) == description


@pytest.mark.parametrize('train_iter', [[('X', 'y')], PackIter(8, 8)],
                         ids=['list', 'pack'])
@pytest.mark.parametrize('counts', [(1, 1, 1), (10, 5, 2), (3.0, 1, 1),
                                    (onp.int64(2), 2, onp.int32(1))],
                         ids=['ones', 'many', 'whole-float', 'numpy-ints'])
def test_train_input_with_a_batch_and_whole_counts_passes(train_iter,
                                                          counts):
    assert checks.check_train_input(train_iter, *counts) is None


@pytest.mark.parametrize('position, name', [
    (0, 'num_steps'), (1, 'eval_every'), (2, 'log_every')])
@pytest.mark.parametrize('value', [0, -1, 0.5, 2.5, NAN, float('inf')],
                         ids=['zero', 'negative', 'half', 'fraction', 'nan',
                              'infinity'])
def test_train_input_refuses_counts_below_one_or_not_whole(position, name,
                                                           value):
    counts = [1, 1, 1]
    counts[position] = value
    with refused(ValueError, f'{name} must be a whole number of at least 1, '
                             f'not {value!r}'):
        checks.check_train_input([('X', 'y')], *counts)


@pytest.mark.parametrize('train_iter, description', [
    ([], 'list of length 0'),
    (PackIter(7, 8), '7 images in batches of 8'),
], ids=['empty-list', 'pack-below-a-batch'])
def test_train_input_without_a_batch_is_refused(train_iter, description):
    with refused(ValueError, f'the training data yields no batch: '
                             f'{description}'):
        checks.check_train_input(train_iter, 10)


# --- Deployment -------------------------------------------------------------

@pytest.mark.parametrize('shape', [(1, 1, 3), (112, 112, 3), (480, 640, 3)])
def test_uint8_rgb_face_image_passes(shape):
    assert checks.check_face_image(onp.zeros(shape, onp.uint8)) is None


@pytest.mark.parametrize('image, message', [
    (onp.zeros((4, 4), onp.uint8), 'shape (h, w, 3), not (4, 4)'),
    (onp.zeros((4, 4, 4), onp.uint8), 'shape (h, w, 3), not (4, 4, 4)'),
    (onp.zeros((1, 4, 4, 3), onp.uint8), 'shape (h, w, 3), not (1, 4, 4, 3)'),
    (onp.zeros((4, 4, 3), onp.float32), 'not float32: pixel values 0 to 255'),
    (onp.zeros((4, 4, 3), onp.int64), 'not int64: pixel values 0 to 255'),
], ids=['gray', 'rgba', 'batch', 'float', 'int64'])
def test_what_is_no_uint8_rgb_face_is_refused(image, message):
    with refused(ValueError, message):
        checks.check_face_image(image)


@pytest.mark.parametrize('probes, gallery, threshold', [
    (unit_rows(2), unit_rows(3, seed=1), 0.3),
    (unit_rows(2), unit_rows(1, seed=1), None),
    (unit_rows(0), unit_rows(3), onp.float32(-1)),  # no probes: no matches
    (onp.ones((2, 8), onp.int64), unit_rows(3).astype(onp.float32), INF),
], ids=['float', 'no-threshold', 'no-probes', 'int-probes'])
def test_real_probes_and_non_empty_gallery_pass(probes, gallery, threshold):
    assert checks.check_gallery(probes, gallery, threshold) is None


@pytest.mark.parametrize('probes, gallery', [
    (unit_rows(2), unit_rows(0)),
    (unit_rows(2, d=4), unit_rows(3, d=8)),
    (unit_rows(2)[0], unit_rows(3)),
    (unit_rows(2), unit_rows(3)[None]),
    (unit_rows(2) + 0j, unit_rows(3)),
    (unit_rows(2), unit_rows(3) > 0),
    (unit_rows(2).astype(str), unit_rows(3)),
], ids=['empty-gallery', 'other-width', '1-d-probes', '3-d-gallery',
        'complex', 'bool', 'text'])
def test_probes_and_gallery_that_do_not_match_are_refused(probes, gallery):
    with refused(ValueError, f'expected real probes (n, d) and a non-empty '
                             f'gallery (m, d), not {probes.shape} '
                             f'{probes.dtype} and {gallery.shape} '
                             f'{gallery.dtype}'):
        checks.check_gallery(probes, gallery, 0.3)


@pytest.mark.parametrize('threshold', [NAN, onp.float32('nan'),
                                       onp.array(NAN)])
def test_nan_threshold_is_refused(threshold):
    with refused(ValueError, 'the threshold is NaN'):
        checks.check_gallery(unit_rows(2), unit_rows(3), threshold)


@pytest.mark.parametrize('rows', [
    unit_rows(3), unit_rows(3) * (1 + 9e-4), unit_rows(3) * (1 - 9e-4),
    unit_rows(0),
], ids=['unit', 'a-bit-long', 'a-bit-short', 'none'])
def test_unit_rows_pass(rows):
    assert checks.check_unit_rows(rows, 'gallery') is None


@pytest.mark.parametrize('scale, off', [(1.0011, '0.0011'), (0.998, '0.002'),
                                        (0.5, '0.5'), (0, '1'),
                                        (1e300, 'inf')])
def test_a_row_off_unit_length_is_refused_with_how_far(scale, off):
    rows = unit_rows(3)
    rows[1] *= scale
    with refused(ValueError, f'gallery rows must be unit embeddings, one '
                             f'is {off} away from length 1'):
        checks.check_unit_rows(rows, 'gallery')


def test_a_nan_row_does_not_hide_a_row_off_unit_length():
    rows = unit_rows(3)
    rows[0] = NAN  # ignored: the callers drop such rows
    rows[2] *= 2
    with refused(ValueError, 'gallery rows must be unit embeddings, one '
                             'is 1 away from length 1'):
        checks.check_unit_rows(rows, 'gallery')
