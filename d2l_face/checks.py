"""Argument checks that the chapter's saved helpers call.

A helper of the chapter states in one sentence what it accepts and calls the
check here, so that the cell a reader reads shows the idea and the library
still refuses a wrong argument with a message that names it. Each check
raises ValueError or TypeError (FileNotFoundError for a missing file) and
returns nothing, unless it says what it returns.
"""
import math
import numbers
import os

import numpy as onp

from d2l_face import formats


# Datasets and pre-processing.

FACE_SOURCES = ('auto', 'real', 'standin')  # what D2L_FACE_SOURCE may say


def check_face_source(source):
    """Refuse a D2L_FACE_SOURCE other than those of FACE_SOURCES."""
    if source not in FACE_SOURCES:
        raise ValueError(f'D2L_FACE_SOURCE must be auto, real or standin, '
                         f'not {source!r}')


def check_standin_name(name):
    """Refuse a stand-in for a dataset other than the one it imitates."""
    if name != 'faces-casia-ultrasmall':
        raise ValueError(f'there is a stand-in for faces-casia-ultrasmall '
                         f'only, not for {name}')


def check_complete_jpeg(data, path):
    """Refuse JPEG bytes that lack the end marker: a truncated file."""
    # libjpeg decodes a cut-off file with only a warning; a JPEG ends with
    # the EOI marker, so its absence means the file was truncated.
    if not data.rstrip(b'\0').endswith(b'\xff\xd9'):
        raise ValueError(f'{path}: not a complete JPEG file (truncated?)')


def check_decoded(image, where, image_size=None):
    """Refuse a failed decode (None), or an image of another (h, w)."""
    # `where` names the file, or the record or item of a file.
    if image is None:
        raise ValueError(f'{where} cannot be decoded as an image')
    if image_size is not None and image.shape[:2] != tuple(image_size):
        # e.g. turned by the EXIF orientation that OpenCV applies
        raise ValueError(f'{where} decoded to {image.shape[1]}x'
                         f'{image.shape[0]}, expected {image_size[1]}x'
                         f'{image_size[0]}')


def check_identity_folder(folder, paths, num_classes):
    """Refuse an identity folder that is missing or holds no images."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{folder}: missing, although property '
                                f'says there are {num_classes} classes')
    if not paths:
        raise FileNotFoundError(f'{folder}: holds no .jpg images')


def check_bin_count(path, num_images, max_images):
    """Refuse more images than a .bin file of its size can plausibly hold."""
    # A pickle may list the same bytes many times while storing them once. A
    # face JPEG takes far more than a hundred bytes: more images than that
    # (beyond a first thousand) means the same bytes listed again.
    limit = min(max_images, max(1000, os.path.getsize(path) // 100))
    if num_images > limit:
        raise ValueError(f'{path}: {num_images} images, more than the '
                         f'{limit} allowed for a file of this size')


def check_batch_size(batch_size):
    """Refuse a batch size that is not a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(
            batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, not '
                         f'{batch_size!r}')


def check_landmarks(landmark):
    """Return landmarks as a float64 (5, 2) array, or raise ValueError.

    Refused: other shapes, values that are not real numbers (complex, text,
    integers beyond any float), NaN or infinity, points a million pixels or
    more from the origin (their squares could overflow to infinity in the
    sums below), and points that span no area: all within about a pixel of
    each other, or on one line. For such points the least-squares
    similarity transform is undefined or meaningless."""
    landmark = onp.asarray(landmark)
    if landmark.dtype.kind not in 'iuf':  # not complex, text or huge ints
        raise ValueError(f'landmark must hold real numbers, not '
                         f'{landmark.dtype}')
    landmark = landmark.astype(onp.float64)
    if landmark.shape != (5, 2):
        raise ValueError(f'landmark must have shape (5, 2), not '
                         f'{landmark.shape}')
    if not onp.isfinite(landmark).all():
        raise ValueError('landmark holds NaN or infinite values')
    if onp.abs(landmark).max() >= 1e6:  # far outside any photo
        raise ValueError(f'landmark coordinates must lie within a million '
                         f'pixels, not {onp.abs(landmark).max():g}')
    # Plain Python numbers: on five points NumPy's per-call cost dominates.
    xs, ys = landmark.T.tolist()
    mean_x, mean_y = sum(xs) / 5, sum(ys) / 5
    sxx = syy = sxy = 0.0
    for x, y in zip(xs, ys):
        x, y = x - mean_x, y - mean_y
        sxx, syy, sxy = sxx + x * x, syy + y * y, sxy + x * y
    # Eigenvalues of [[sxx, sxy], [sxy, syy]], the squared extents of the
    # centered points along their principal axes: the larger from the closed
    # form, the smaller as determinant / larger (which avoids subtracting
    # nearly equal numbers).
    large = (sxx + syy) / 2 + (((sxx - syy) / 2) ** 2 + sxy ** 2) ** 0.5
    small = max(sxx * syy - sxy ** 2, 0.0) / large if large > 0 else 0.0
    if large < 1:  # the points spread over less than about a pixel
        raise ValueError('landmark points all coincide (within a pixel)')
    if small < 1e-6 * large:  # one axis is 1000 times shorter than the other
        raise ValueError('landmark points are collinear')
    return landmark


# The element types OpenCV's warpAffine takes (not bool, int32 or float16).
WARP_DTYPES = ('uint8', 'uint16', 'int16', 'float32', 'float64')


def check_image(image):
    """Return `image` if OpenCV can warp it, else raise ValueError."""
    if not isinstance(image, onp.ndarray) or image.ndim not in (2, 3) \
            or image.size == 0 or image.ndim == 3 and image.shape[2] > 4:
        raise ValueError('image must be a non-empty numpy array of shape '
                         '(h, w) or (h, w, c) with at most 4 channels')
    if image.dtype.name not in WARP_DTYPES:
        raise ValueError(f'image of dtype {image.dtype}: OpenCV warps only '
                         f'{", ".join(WARP_DTYPES)}')
    if max(image.shape[:2]) >= 32767:  # SHRT_MAX, OpenCV's limit
        raise ValueError(f'image of {image.shape[1]}x{image.shape[0]} '
                         f'pixels: OpenCV warps sides below 32767 only')
    return image


def check_alignment(image, landmark, image_size):
    """Check face_align's arguments; return the landmarks as float64 (5, 2).

    The crop size must be a positive integer of at most a face crop's
    MAX_CROP_PIXELS, the image one that OpenCV can warp, and the landmarks
    a face (check_landmarks) on or near the image, within one image width
    or height of it: points farther out would crop only the black border."""
    if isinstance(image_size, bool) or not isinstance(
            image_size, (int, onp.integer)) or not 0 < image_size or \
            image_size ** 2 > formats.MAX_CROP_PIXELS:
        raise ValueError(f'image_size must be a positive integer of at most '
                         f'{math.isqrt(formats.MAX_CROP_PIXELS)}, not '
                         f'{image_size!r}')
    h, w = check_image(image).shape[:2]
    landmark = check_landmarks(landmark)
    if (abs(landmark - [w / 2, h / 2]) > [1.5 * w, 1.5 * h]).any():
        raise ValueError(f'landmark points lie more than a whole image '
                         f'outside the {w}x{h} image: no face to crop there')
    return landmark


MAX_PHOTO_PIXELS = 5000 * 5000  # MTCNN would take more than a gigabyte


def check_photo(image):
    """Return `image` if it is an RGB uint8 photo (h, w, 3), else raise."""
    if not isinstance(image, onp.ndarray) or image.ndim != 3 \
            or image.shape[2] != 3 or image.size == 0:
        shape = getattr(image, 'shape', type(image).__name__)
        raise ValueError(f'expected an RGB photo of shape (h, w, 3), not '
                         f'{shape}')
    if image.dtype != onp.uint8:
        raise ValueError(f'expected a uint8 photo (0..255), not {image.dtype}')
    if image.shape[0] * image.shape[1] > MAX_PHOTO_PIXELS:
        raise ValueError(f'a photo of {image.shape[1]}x{image.shape[0]} '
                         f'pixels, more than MAX_PHOTO_PIXELS '
                         f'({MAX_PHOTO_PIXELS}); scale it down first')
    return image


def check_detector(nets, min_face_size):
    """Refuse a face size below P-Net's window, and nets other than three."""
    if isinstance(min_face_size, bool) or not isinstance(
            min_face_size, (int, onp.integer)) or min_face_size < 12:
        raise ValueError(f'min_face_size must be an integer of at least 12 '
                         f'(P-Net\'s window), not {min_face_size!r}')
    if nets is not None and (not isinstance(nets, (list, tuple))
                             or len(nets) != 3):
        raise ValueError(f'nets must be the three networks P-Net, R-Net '
                         f'and O-Net that load_mtcnn returns, not {nets!r}')


# Face-ResNet, margin losses and the parallel margin layer.

def check_face_resnet(depth, depths, width):
    """Refuse a Face-ResNet depth not among `depths`, or a width <= 0."""
    if depth not in depths:
        raise ValueError(f'depth must be one of {sorted(depths)}, '
                         f'not {depth!r}')
    if not width > 0:
        raise ValueError(f'width must be positive, not {width!r}')


def check_margin(s, m1, m2, m3):
    """Refuse a scale or margins that make the logits infinite or NaN."""
    if not (math.isfinite(s) and s > 0 and math.isfinite(m1) and m1 > 0
            and 0 <= m2 < math.pi and math.isfinite(m3)):
        raise ValueError(f'need a finite s > 0, a finite m1 > 0, '
                         f'0 <= m2 < pi and a finite m3, not s={s}, m1={m1}, '
                         f'm2={m2}, m3={m3}')


def check_shards(num_classes, num_shards):
    """Refuse to split the classes into no shards or into empty ones."""
    if not 1 <= num_shards <= num_classes:
        raise ValueError(f'cannot split {num_classes} classes into '
                         f'{num_shards} non-empty shards')


def check_one_batch(num_images, batch_size, num_classes, source):
    """Refuse training data of fewer images than one batch."""
    # A worker without a whole batch would wait forever for its first one.
    if num_images < batch_size:
        raise ValueError(f'{source} has {num_images} images of the first '
                         f'{num_classes} identities, fewer than the batch '
                         f'size {batch_size}: not one batch to train on')


def check_equal_parts(batch_size, num_parts):
    """Refuse a batch that does not cut into `num_parts` equal parts."""
    if not num_parts >= 1:
        raise ValueError(f'num_parts must be at least 1, not {num_parts!r}')
    if batch_size % num_parts:
        raise ValueError(f'a batch of {batch_size} does not cut into '
                         f'{num_parts} equal parts')


def check_timed_steps(num_steps):
    """Refuse fewer than two steps: the speed is timed after the first."""
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2, not {num_steps}')



# Training, verification and deployment.

MIN_BATCH_PER_DEVICE = 2  # batch statistics need two values per feature


def check_pair_images(images):
    """Refuse images that are not (2, n, 3, h, w) with n > 0, as load_bin gives."""
    if images.ndim != 5 or images.shape[0] != 2 or images.shape[1] == 0 \
            or images.shape[2] != 3:
        raise ValueError(f'expected images of shape (2, n, 3, h, w) with '
                         f'n > 0, not {images.shape}')


def check_pair_embeddings(embeddings):
    """Refuse embeddings that are not two rows per pair."""
    if embeddings.ndim != 2 or len(embeddings) % 2:
        raise ValueError(f'expected two embeddings per pair, in rows, not '
                         f'an array of shape {embeddings.shape}')


def check_pairs(scores, issame, num_folds=1):
    """Refuse scores and labels that are not one finite real and one bool per pair.

    A NaN score (an embedding of zeros) is neither above nor below any
    threshold and sorts to one end, which would give a plausible, wrong
    accuracy; and every fold needs at least one pair.
    """
    if scores.dtype.kind not in 'iuf':  # not complex, text or objects
        raise ValueError(f'scores must be real numbers, not {scores.dtype}')
    if scores.ndim != 1 or issame.shape != scores.shape:
        raise ValueError(f'expected one score and one label per pair, not '
                         f'shapes {scores.shape} and {issame.shape}')
    if len(scores) < max(num_folds, 1):
        raise ValueError(f'{len(scores)} pairs are too few for '
                         f'{max(num_folds, 1)} fold(s)')
    finite = onp.isfinite(scores.astype(onp.float64))
    if not finite.all():
        bad = onp.flatnonzero(~finite)
        raise ValueError(f'{len(bad)} scores are NaN or infinite, the first '
                         f'of pair {bad[0]}: is an embedding all zeros?')
    if issame.dtype.kind not in 'biuf' or not onp.isin(issame, (0, 1)).all():
        raise ValueError('labels must be True/False or 1/0')


def check_finite_scores(scores):
    """Refuse an empty list of scores, or one with NaN or infinity."""
    if scores.size == 0 or not onp.isfinite(scores).all():
        raise ValueError('need at least one score, and no NaN or infinity')


def check_thresholds(thresholds):
    """Refuse thresholds that are not a non-empty 1-d list of finite numbers."""
    if thresholds.ndim != 1 or not thresholds.size or \
            not onp.isfinite(thresholds).all():
        raise ValueError('thresholds must be a non-empty list of finite '
                         'numbers')


def check_folds(num_pairs, num_folds):
    """Refuse fold counts that are not integers, below 2, or above the pairs."""
    if not all(isinstance(n, (int, onp.integer)) and not isinstance(n, bool)
               for n in (num_pairs, num_folds)):
        raise ValueError(f'the numbers of pairs and folds must be integers, '
                         f'not {num_pairs!r} and {num_folds!r}')
    if num_folds < 2 or num_pairs < num_folds:
        raise ValueError(f'need 2 or more folds, and at least one pair per '
                         f'fold: {num_pairs} pairs, {num_folds} folds')


def check_far(far):
    """Refuse a target false accept rate that is not a number in [0, 1]."""
    if onp.ndim(far) or onp.asarray(far).dtype.kind not in 'iuf' or \
            not 0 <= far <= 1:
        raise ValueError(f'far must be a number between 0 and 1, not {far!r}')


def check_both_kinds(issame, what):
    """Refuse labels without a same pair or without a different pair."""
    if issame.all() or not issame.any():
        raise ValueError(f'{what} need both same and different pairs')


def check_unit_embeddings(embeddings, num_images, where):
    """Refuse what is not one unit-length embedding per image."""
    if embeddings.shape[0] != num_images or not onp.allclose(
            onp.linalg.norm(embeddings, axis=1), 1, atol=1e-4):
        raise ValueError(f'{where}: embed must return one unit-length '
                         f'embedding per image, {num_images} in '
                         f'all, not an array of shape {embeddings.shape}')


def check_batch_per_device(batch_size, num_devices):
    """Refuse a batch that leaves a device fewer than two images.

    Batch normalization, in training, normalizes each feature by its mean
    and variance over the batch, which one image does not have.
    """
    if batch_size < MIN_BATCH_PER_DEVICE * num_devices:
        raise ValueError(
            f'a training batch of {batch_size} images on {num_devices} '
            f'device(s): batch normalization needs at least '
            f'{MIN_BATCH_PER_DEVICE} images per device')


def check_sgd_settings(lr, wd, momentum):
    """Refuse a learning rate, weight decay or momentum SGD cannot use."""
    for name, value, low in [('lr', lr, 'positive'),
                             ('wd', wd, 'non-negative'),
                             ('momentum', momentum, 'non-negative')]:
        ok = value > 0 if low == 'positive' else value >= 0
        if not (ok and math.isfinite(value)):
            raise ValueError(f'{name} must be a finite, {low} number, not '
                             f'{value!r}')


def describe_batches(train_iter):
    """How many images in batches of what size, where the iterator says."""
    pack = getattr(train_iter, 'pack', None)  # as FaceRecordIter has
    batch_size = getattr(train_iter, 'batch_size', None)
    if pack is None or batch_size is None:
        size = len(train_iter) if hasattr(train_iter, '__len__') else '?'
        return f'{type(train_iter).__name__} of length {size}'
    return (f'{len(pack)} images in batches of {batch_size}, the last '
            f'incomplete batch dropped')


def check_train_input(train_iter, num_steps, eval_every=1, log_every=1):
    """Refuse counts below 1, and training data without a single batch.

    An iterator drops its last incomplete batch, so a dataset with fewer
    images than a batch yields none, and a loop waiting for its steps would
    wait forever.
    """
    for name, value in [('num_steps', num_steps), ('eval_every', eval_every),
                        ('log_every', log_every)]:
        if not (value >= 1 and math.isfinite(value)) or int(value) != value:
            raise ValueError(f'{name} must be a whole number of at least 1, '
                             f'not {value!r}')
    if len(train_iter) == 0:
        raise ValueError(f'the training data yields no batch: '
                         f'{describe_batches(train_iter)}')


def check_face_image(image):
    """Refuse an image that is not one uint8 RGB face of shape (h, w, 3)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'expected an RGB image of shape (h, w, 3), not '
                         f'{image.shape}')
    if image.dtype != onp.uint8:  # casting would wrap or truncate, NaN too
        raise ValueError(f'expected a uint8 RGB image of shape (h, w, 3), '
                         f'not {image.dtype}: pixel values 0 to 255')


def check_gallery(probes, gallery, threshold):
    """Refuse probes and gallery that are not real (n, d) and non-empty (m, d)."""
    if probes.ndim != 2 or gallery.ndim != 2 or len(gallery) == 0 or \
            probes.shape[1] != gallery.shape[1] or \
            not {probes.dtype.kind, gallery.dtype.kind} <= set('iuf'):
        raise ValueError(f'expected real probes (n, d) and a non-empty '
                         f'gallery (m, d), not {probes.shape} {probes.dtype} '
                         f'and {gallery.shape} {gallery.dtype}')
    if threshold is not None and onp.isnan(float(threshold)):
        raise ValueError('the threshold is NaN')


def check_unit_rows(rows, name):
    """Refuse rows (finite ones) that are not unit embeddings."""
    # Rows with NaN or infinity are the callers' to drop; among the rest a
    # NaN would hide the largest distance.
    finite = rows[onp.isfinite(rows).all(axis=1)]
    with onp.errstate(over='ignore'):  # a norm past float's range is inf
        off = onp.abs(onp.linalg.norm(finite, axis=1) - 1)
    if len(off) and off.max() > 1e-3:
        raise ValueError(f'{name} rows must be unit embeddings, one '
                         f'is {off.max():g} away from length 1')
