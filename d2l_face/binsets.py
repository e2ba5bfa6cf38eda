"""InsightFace's ``.bin`` verification sets, read without running code from them.

A set is a pickle of ``(bins, issame_list)``: ``2 * n`` encoded images and
``n`` "same person" flags (the chapter's ``lfw_small.bin``, InsightFace's
``lfw.bin``...). ``load_bin_pairs`` reads one with an unpickler that knows no
globals besides inert stand-ins for numpy bools and Python 2 bytes; the result
must be exactly ``2 * n`` non-empty byte strings and ``n`` booleans, with
``n`` at most ``MAX_PAIRS`` and the images adding up to no more than the file
could hold without repeating itself. Anything else raises ``BinFormatError``
(a ``DataError`` of :mod:`d2l_face.downloads`, and a ``ValueError``) naming the
file. ``save_bin_pairs`` writes a set the same checks accept, whole or not at
all (``d2l_face.publish``), with the user's umask. Packs of images are
:mod:`d2l_face.recordio`'s.
"""
import io
import os
import pickle
import pickletools

from d2l_face import formats, publish
from d2l_face.downloads import DataError

__all__ = ['BinFormatError', 'MAX_PAIRS', 'load_bin_pairs', 'save_bin_pairs']


class BinFormatError(DataError, ValueError):
    """A verification ``.bin`` file is not a well-formed ``(bins, issame)`` pickle."""


# InsightFace's verification sets hold 6,000-7,000 pairs; this bounds what a
# file may ask a reader to decode.
MAX_PAIRS = 100_000
_MAX_BIN_BYTES = 2 << 30
# A pickle written from separate byte strings stores each image once, plus a
# few bytes per object, so its images and objects add up to less than its size;
# one that shares an image between a few pairs (as Python 3 pickles shared
# objects) adds up to a little more. We allow four times the size.
_EXPANSION = 4
_MAX_DTYPE_CODE = 8  # numpy codes such as 'b1' or '|b1'


class _NumpyDType:
    """Inert stand-in for ``numpy.dtype`` inside a pickle: it only remembers a short code."""

    def __init__(self, code=None, *args):
        if isinstance(code, (bytes, str)) and len(code) > _MAX_DTYPE_CODE:
            raise pickle.UnpicklingError(f'numpy dtype code of {len(code)} characters')
        self.code = code.decode('ascii', 'replace') if isinstance(code, bytes) else code

    def __setstate__(self, state):
        pass  # byte order and flags are irrelevant for a one-byte bool


def _numpy_scalar(dtype, data=None):
    """Stand-in for ``numpy.core.multiarray.scalar``: accepts only bools, returns ``bool``."""
    if not (isinstance(dtype, _NumpyDType) and dtype.code in ('b1', '?')
            and data in (b'\x00', b'\x01')):
        raise pickle.UnpicklingError('only numpy bool scalars are supported')
    return data == b'\x01'


class _PairsUnpickler(pickle.Unpickler):
    """Knows only inert stand-ins, and bounds the bytes their calls may allocate.

    Without the bound, a pickle could call ``_codecs.encode`` on one memoized
    long string thousands of times, a few bytes per call, and cost gigabytes.
    """

    def __init__(self, data):
        # encoding='bytes' keeps Python 2 str objects (the original files) as bytes.
        super().__init__(io.BytesIO(data), encoding='bytes')
        self._budget = _EXPANSION * len(data)
        self._globals = {
            ('numpy', 'dtype'): _NumpyDType,
            ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
            ('numpy._core.multiarray', 'scalar'): _numpy_scalar,  # numpy >= 2
            ('_codecs', 'encode'): self._codecs_encode,
        }

    def _codecs_encode(self, text, encoding='utf-8', *rest):
        """Stand-in for ``_codecs.encode``, which protocol-2 pickles use for bytes."""
        if not isinstance(text, str) or encoding not in ('latin1', 'latin-1') or rest:
            raise pickle.UnpicklingError('unsupported _codecs.encode call')
        self._budget -= len(text)
        if self._budget < 0:
            raise pickle.UnpicklingError('the byte strings it builds outgrow the '
                                         'file many times over')
        return text.encode('latin1')

    def find_class(self, module, name):
        # The only globals a .bin file may name; none runs numpy or any other code.
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f'refusing to load the global {module}.{name}') from None


# Opcodes that build dicts, sets or objects: a (bins, issame) pickle has none,
# and a dict key nested a hundred thousand tuples deep crashes CPython's
# unpickler when it hashes the key (the C stack overflows), at 130 KB of file.
_REFUSED_OPCODES = frozenset([
    'EMPTY_DICT', 'DICT', 'SETITEM', 'SETITEMS', 'EMPTY_SET', 'ADDITEMS',
    'FROZENSET', 'INST', 'OBJ', 'NEWOBJ', 'NEWOBJ_EX', 'PERSID', 'BINPERSID',
    'EXT1', 'EXT2', 'EXT4', 'BYTEARRAY8', 'NEXT_BUFFER', 'READONLY_BUFFER'])


def _check_opcodes(data):
    """Refuse, before unpickling, opcodes a .bin never needs and wild memo indices.

    CPython's unpickler allocates a memo table as large as the biggest index it
    sees, so a few crafted bytes could claim gigabytes. Picklers number memo
    entries 0, 1, 2... so an index can never exceed the opcodes read so far.
    Walking the opcodes also refuses, without allocating, a length field that
    claims more bytes than the file holds.
    """
    for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
        if op.name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f'opcode {op.name}, which a '
                                         f'verification file does not use')
        if op.name in ('PUT', 'BINPUT', 'LONG_BINPUT') and int(arg) > count:
            raise pickle.UnpicklingError(f'memo index {arg} out of range')


def _is_bool(x):
    return type(x) is bool or (type(x).__module__ == 'numpy'
                               and type(x).__name__ in ('bool_', 'bool'))


def _check_pairs(bins, issame, where, byte_types=(bytes, bytearray), max_pairs=MAX_PAIRS):
    """Validate and normalize to (list of bytes, list of bool); raise BinFormatError."""
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise BinFormatError(f'{where}: bins and issame must be lists, got '
                             f'{type(bins).__name__} and {type(issame).__name__}')
    if not issame:
        raise BinFormatError(f'{where}: contains no pairs')
    if len(issame) > max_pairs:
        raise BinFormatError(f'{where}: {len(issame)} pairs, more than the '
                             f'{max_pairs} allowed')
    if len(bins) != 2 * len(issame):
        raise BinFormatError(f'{where}: {len(bins)} images for {len(issame)} pairs '
                             f'(expected {2 * len(issame)})')
    for i, b in enumerate(bins):
        if not isinstance(b, byte_types):
            raise BinFormatError(f'{where}: bins[{i}] has type {type(b).__name__}, expected bytes')
        if not b:
            raise BinFormatError(f'{where}: bins[{i}] is empty')
    for i, s in enumerate(issame):
        if not _is_bool(s):
            raise BinFormatError(f'{where}: issame[{i}] has type {type(s).__name__}, expected bool')
    return [bytes(b) for b in bins], [bool(s) for s in issame]


def _check_expansion(bins, issame, file_size, where):
    """Refuse images that add up to more than the file could hold.

    A pickle can name one stored image thousands of times for two bytes each;
    every reader would then decode it thousands of times.
    """
    total = sum(map(len, bins)) + len(bins) + len(issame)
    if total > _EXPANSION * file_size:
        raise BinFormatError(f'{where}: its {len(bins)} images and {len(issame)} '
                             f'labels add up to {total} bytes from a file of '
                             f'{file_size}; it repeats images by reference')


def _read_bin(path):
    """The bytes of ``path``: a regular file of bounded size (a FIFO would block forever)."""
    try:
        size = os.stat(path).st_size
        if size > _MAX_BIN_BYTES:
            raise BinFormatError(f'{path}: {size} bytes, more than the '
                                 f'{_MAX_BIN_BYTES} a verification file may have')
        # Bounded by the size just seen: the reader allocates its limit up front.
        return formats.read_regular_file(path, max_bytes=size)
    except ValueError as e:  # not a regular file, or it grew while read
        raise BinFormatError(f'{path}: cannot be read as a verification file ({e})') from e


def load_bin_pairs(path, max_pairs=MAX_PAIRS):
    """Load an InsightFace verification file; return ``(bins, issame)``.

    ``bins`` is a list of ``2 * n`` encoded images (bytes), ``issame`` a list of
    ``n`` plain bools, ``n <= max_pairs``. No code from the file is run: besides
    containers, bytes and bools only numpy bool scalars and Python 2 style bytes
    are understood, through inert stand-ins. Memory stays within a small
    multiple of the file's size. Anything else raises ``BinFormatError``
    naming the file.
    """
    data = _read_bin(path)  # in memory, so a length field cannot make a read allocate more
    try:
        _check_opcodes(data)
        obj = _PairsUnpickler(data).load()
    except Exception as e:  # nothing from the file has run, so any failure means "malformed"
        raise BinFormatError(f'{path}: not a valid verification pickle '
                             f'({type(e).__name__}: {e})') from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        size = f' of length {len(obj)}' if isinstance(obj, (tuple, list)) else ''
        raise BinFormatError(f'{path}: expected a pair (bins, issame), got a '
                             f'{type(obj).__name__}{size}')
    # Only bytes, not bytearray: a file can reference one bytearray a million times
    # through the memo, and converting each reference would copy it a million times.
    bins, issame = _check_pairs(obj[0], obj[1], path, (bytes,), max_pairs)
    _check_expansion(bins, issame, len(data), path)
    return bins, issame


def _unshared(bins):
    """Copies of repeated byte-string objects, so that pickle stores every image in full.

    A file that names one image many times by reference is what
    ``_check_expansion`` refuses; what we write must load.
    """
    seen, out = set(), []
    for b in bins:
        if id(b) in seen:
            b = bytes(bytearray(b))
        seen.add(id(b))
        out.append(b)
    return out


def save_bin_pairs(path, bins, issame):
    """Write ``(bins, issame)`` in the InsightFace format (pickle protocol 4).

    The input is validated like a loaded file and written atomically, so a
    reader never sees a half-written file; the file gets the user's umask.
    An image passed several times is stored several times, so the file loads.
    """
    bins, issame = _check_pairs(list(bins), list(issame), path)
    bins = _unshared(bins)
    with publish.writing(os.fspath(path), suffix='.part') as f:
        pickle.dump((bins, issame), f, protocol=4)
