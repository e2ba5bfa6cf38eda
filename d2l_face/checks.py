"""Argument checks that the chapter's saved helpers call.

A helper of the chapter states in one sentence what it accepts and calls the
check here, so that the cell a reader reads shows the idea and the library
still refuses a wrong argument with a message that names it. Each check
raises ValueError or TypeError (FileNotFoundError for a missing file) and
returns nothing, unless it says what it returns.
"""
import math
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
    if not isinstance(batch_size, int) or batch_size < 1:
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


# Training, verification and deployment.
