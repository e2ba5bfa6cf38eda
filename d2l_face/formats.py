"""Framework-free facts about the chapter's data formats, each defined once.

The sections (both framework tabs), the stand-in generator, the safe data
path and the benchmarks all import these; nothing here imports a framework.

- the ArcFace landmark template of the 112x112 crops;
- the dataset folder layout: ``property`` and one ``%08d`` folder per identity;
- reading a file that must be a regular file of bounded size (never a FIFO or
  a device, which would block or never end);
- the size a JPEG claims in its header, read without decoding, so that a
  small file claiming a huge image is refused before it costs memory.
"""
import errno
import os
import re
import stat

import numpy as onp

# The five landmarks (left eye, right eye, nose tip, left and right mouth
# corner) of the mean face in InsightFace's 112x112 ArcFace crops.
ARCFACE_TEMPLATE = onp.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]], dtype=onp.float32)
TEMPLATE_SIZE = 112  # the crop size the template's coordinates refer to

PROPERTY_FILE = 'property'  # first line: num_classes,height,width
IMAGE_SUFFIX = '.jpg'

# Refuse larger images before decoding: even a wild photo of 8000x8000
# pixels stays below this.
MAX_IMAGE_PIXELS = 8000 * 8000
# A face crop (of a dataset folder, a pack or a .bin set) is 112 to a few
# hundred pixels wide; a training batch holds batch_size of them as floats.
MAX_CROP_PIXELS = 1024 * 1024
# JPEG segments before the frame header (EXIF, ICC profile, tables) take
# kilobytes in a few dozen segments; a header this far in, or after this
# many segments, is refused rather than searched for.
MAX_JPEG_HEADER_BYTES = 2 << 20
MAX_JPEG_SEGMENTS = 1024
# A face crop file is a few KB; a whole photo a few MB.
MAX_IMAGE_BYTES = 64 << 20
# The largest public training set, WebFace42M, has 2,059,906 identities; the
# classification layer holds a row of weights (and momentum) per class, so a
# count far beyond that is a damaged file, not a dataset.
MAX_CLASSES = 2_500_000


def identity_folder(label):
    """Return the folder name of identity `label`: eight digits."""
    label = int(label)
    if label < 0:
        raise ValueError(f'identity labels are non-negative, not {label}')
    return '%08d' % label


def format_property(num_classes, height, width):
    """Return the first line of a `property` file (without newline)."""
    return f'{int(num_classes)},{int(height)},{int(width)}'


def parse_property(line, where='property'):
    """Parse 'num_classes,height,width' into ((height, width), classes)."""
    fields = line.strip().split(',')
    # str.isdigit() accepts characters such as '²' that int() refuses.
    if len(fields) != 3 or not all(
            x.strip().isascii() and x.strip().isdigit() for x in fields):
        raise ValueError(f'{where}: first line should be '
                         f'"num_classes,height,width", not {line.strip()!r}')
    num_classes, height, width = (int(x) for x in fields)
    if min(num_classes, height, width) < 1:
        raise ValueError(f'{where}: counts must be positive: '
                         f'{line.strip()!r}')
    if num_classes > MAX_CLASSES:
        raise ValueError(f'{where}: {num_classes} classes, more than '
                         f'MAX_CLASSES ({MAX_CLASSES})')
    if height * width > MAX_CROP_PIXELS:
        raise ValueError(f'{where}: crops of {width}x{height} pixels, more '
                         f'than the {MAX_CROP_PIXELS} of a face crop')
    return (height, width), num_classes


def read_regular_file(path, max_bytes=MAX_IMAGE_BYTES, follow_links=True):
    """Return the bytes of `path`, refusing non-regular or oversized files.

    The file is opened without blocking, so a FIFO named like an image is
    refused instead of waiting forever for a writer. With `follow_links`
    false, a symbolic link is refused too (OSError)."""
    flags = os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0)
    if not follow_links:
        flags |= getattr(os, 'O_NOFOLLOW', 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a FIFO nobody writes to
            raise ValueError(f'{path}: not a regular file') from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f'{path}: not a regular file')
        if info.st_size > max_bytes:
            raise ValueError(f'{path}: {info.st_size} bytes, more than the '
                             f'{max_bytes} allowed for one image')
        # Read one byte more than the size, to notice a file that grows.
        with os.fdopen(fd, 'rb', closefd=False) as f:
            data = f.read(info.st_size + 1)
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise ValueError(f'{path}: changed size while it was read')
    return data


# JPEG start-of-frame markers (baseline, progressive, lossless, ...): every
# 0xFFCn except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# The segments libjpeg reads or skips by their length before a frame: DHT,
# DAC, DNL, DQT, DRI, APP0-15 and COM. It stops at any other marker, and it
# drops the pair FF 00 as stray data; skipping those by a "length" would
# hide from us a frame header that libjpeg goes on to read.
_SEGMENTS = frozenset([0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xFE,
                       *range(0xE0, 0xF0)])


def _frame_header(data):
    """(height, width, end) of a JPEG's frame header, or None.

    `end` is the byte after the width: the fewest first bytes from which
    the size can be read. One pass over the segments, each skipped by its
    length, runs of fill bytes at once; a frame header that does not start
    in the first MAX_JPEG_HEADER_BYTES, or after MAX_JPEG_SEGMENTS markers,
    is not looked for."""
    data = memoryview(data)[:MAX_JPEG_HEADER_BYTES + 9].tobytes()
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos + 4 > len(data) or pos > MAX_JPEG_HEADER_BYTES:
            return None
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes before a marker
            pos = _FILL.match(data, pos).end() - 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        if marker in _SOF_MARKERS:
            if length < 7 or pos + 9 > len(data):
                return None
            height = data[pos + 5] << 8 | data[pos + 6]
            width = data[pos + 7] << 8 | data[pos + 8]
            return height, width, pos + 9
        if marker not in _SEGMENTS or length < 2:  # a scan, the end, FF 00...
            return None
        pos += 2 + length
    return None


_FILL = re.compile(rb'\xff+')


def jpeg_size(data):
    """Return the (height, width) a JPEG's header claims, without decoding.

    Returns None when `data` is not a JPEG or its header is cut short."""
    header = _frame_header(data)
    return None if header is None else header[:2]


def jpeg_header_length(data):
    """The fewest first bytes of JPEG `data` from which its size can be read.

    None when `data` is not a JPEG or its header is cut short."""
    header = _frame_header(data)
    return None if header is None else header[2]


def check_jpeg_header(data, where, expected_size=None,
                      max_pixels=MAX_IMAGE_PIXELS):
    """Raise ValueError unless `data` is a JPEG of an acceptable size.

    `expected_size` (h, w), when given, must match exactly; otherwise the
    image may not claim more than `max_pixels` pixels."""
    size = jpeg_size(data)
    if size is None:
        raise ValueError(f'{where}: not a JPEG image (no frame header)')
    height, width = size
    if expected_size is not None and size != tuple(expected_size):
        raise ValueError(f'{where}: image is {width}x{height}, expected '
                         f'{expected_size[1]}x{expected_size[0]}')
    if height * width > max_pixels or height == 0 or width == 0:
        raise ValueError(f'{where}: the header claims {width}x{height} '
                         f'pixels, refused (at most {max_pixels})')
    return size
