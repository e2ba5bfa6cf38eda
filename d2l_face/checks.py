"""Argument checks that the chapter's saved helpers call.

A helper of the chapter states in one sentence what it accepts and calls the
check here, so that the cell a reader reads shows the idea and the library
still refuses a wrong argument with a message that names it. Each check
raises ValueError or TypeError and returns nothing.
"""
import math

import numpy as onp


# Datasets and pre-processing.


# Face-ResNet, margin losses and the parallel margin layer.


# Training, verification and deployment.

MIN_BATCH_PER_DEVICE = 2  # batch statistics need two values per feature


def check_pair_images(images):
    """Refuse images that are not (2, n, 3, h, w) with n > 0, as load_bin gives."""
    if images.ndim != 5 or images.shape[0] != 2 or images.shape[1] == 0:
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


def check_batch_size(batch_size, num_devices):
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
        if not value >= 1 or int(value) != value:
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
    off = onp.abs(onp.linalg.norm(rows, axis=1) - 1)
    if len(off) and off.max() > 1e-3:
        raise ValueError(f'{name} rows must be unit embeddings, one '
                         f'is {off.max():g} away from length 1')
