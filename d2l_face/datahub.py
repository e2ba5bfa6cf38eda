"""A checked path for the data this chapter fetches: downloads, archives, ``.bin`` pairs.

* ``download`` streams into a ``.part`` file beside the target, checks the length
  the server announced and the SHA-1 *after* the transfer, and only then renames
  the file into place: an interrupted or corrupted download never sits under the
  final name. Network failures raise ``DownloadError`` with the stand-in hint.
* ``extract`` reads every member name of a zip or tar archive before writing a
  byte and refuses absolute paths, ``..``, drive letters and backslashes, links
  that leave the target folder (or pass through another link), and device or
  FIFO members. It also adds up the members' sizes and refuses an archive that
  would not fit in the free disk space (a "zip bomb" among them): zipfile stops
  at each member's declared size and tar headers hold exact sizes, so the sum
  is binding. It unpacks into a hidden staging folder and moves the result in
  only when complete, so a failure leaves the previous extraction untouched;
  ``download_extract`` marks a finished extraction and skips it next time.
* ``load_bin_pairs`` reads InsightFace verification files (a pickle of
  ``(bins, issame_list)``) without running code from them: the unpickler knows
  no globals besides inert stand-ins for numpy bools and Python 2 bytes, and the
  result must be exactly ``2 * n`` non-empty byte strings and ``n`` booleans.
"""
import hashlib
import io
import os
import pickle
import pickletools
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from urllib.parse import unquote, urlsplit

import requests

__all__ = [
    'DownloadError', 'ArchiveError', 'UnsafeArchiveError', 'BinFormatError',
    'download', 'extract', 'download_extract', 'load_bin_pairs',
    'save_bin_pairs', 'sha1_file',
]

STANDIN_HINT = 'set D2L_FACE_SOURCE=standin to use the generated stand-in data'


class DownloadError(OSError):
    """A download failed or its content did not verify.

    An ``OSError`` so that code already prepared for I/O failures (a missing
    file, a full disk) also handles an unreachable or corrupted source.
    """


class ArchiveError(ValueError):
    """An archive is of an unknown type, corrupt, or lacks an expected folder."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would be written outside the target folder."""


class BinFormatError(ValueError):
    """A verification ``.bin`` file is not a well-formed ``(bins, issame)`` pickle."""


# ---------------------------------------------------------------- downloads

def sha1_file(path, chunk_size=1 << 20):
    """Return the hex SHA-1 of a file, read in chunks to bound memory."""
    sha1 = hashlib.sha1()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            sha1.update(chunk)
    return sha1.hexdigest()


def _file_name(url):
    """The last path component of ``url``, refusing names that are not a plain file name."""
    name = unquote(urlsplit(url).path.rsplit('/', 1)[-1])
    # An encoded '%2F' or '..' would otherwise let the URL pick a path outside `folder`.
    if name in ('', '.', '..') or '/' in name or '\\' in name or '\0' in name:
        raise ValueError(f'cannot derive a file name from URL {url!r}')
    return name


class _Progress:
    """One self-overwriting line on stderr, shown only once a download takes over a second."""

    def __init__(self, name, total):
        self.name, self.total = name, total
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, done):
        now = time.monotonic()
        if now - self.start < 1 or now - self.last < 0.25:
            return  # quiet for quick downloads; throttled for slow ones
        self.last, self.shown = now, True
        line = f'\r{self.name}: {done / 1e6:.1f}'
        if self.total:
            line += f' / {self.total / 1e6:.1f} MB ({100 * done / self.total:.0f}%)'
        else:
            line += ' MB'
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self):
        if self.shown:
            sys.stderr.write('\n')
            sys.stderr.flush()


def _describe(exc, timeout):
    """A short human cause for a ``requests`` exception."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f'HTTP {exc.response.status_code} {exc.response.reason}'
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f'the transfer broke off ({exc})'
    if isinstance(exc, requests.Timeout):
        return f'no answer within {timeout} s'
    if isinstance(exc, requests.ConnectionError):
        return f'connection failed ({exc})'
    return f'{type(exc).__name__}: {exc}'


def _fetch(url, tmp, timeout, chunk_size, name):
    """Stream ``url`` into the open file ``tmp``; return the SHA-1 (hex) of what was written."""
    sha1, done = hashlib.sha1(), 0
    # Ask for the bytes as stored, so Content-Length counts what we write.
    with requests.get(url, stream=True, timeout=timeout,
                      headers={'Accept-Encoding': 'identity'}) as resp:
        resp.raise_for_status()
        total = int(resp.headers.get('Content-Length') or 0)
        if resp.headers.get('Content-Encoding', 'identity') != 'identity':
            total = 0  # the length is of the encoded body; the SHA-1 still guards us
        progress = _Progress(name, total)
        try:
            for chunk in resp.iter_content(chunk_size):
                tmp.write(chunk)
                sha1.update(chunk)
                done += len(chunk)
                progress.update(done)
        finally:
            progress.close()
    if total and done != total:
        raise DownloadError(f'incomplete download of {url}: received {done} of '
                            f'{total} bytes; try again, or {STANDIN_HINT}')
    return sha1.hexdigest()


def download(url, folder, sha1_hash=None, timeout=30, chunk_size=1 << 20):
    """Download ``url`` into ``folder`` and return the path of the file.

    The file is named after the URL's last path component. If it already exists
    and matches ``sha1_hash``, it is returned without any network access; with no
    hash there is nothing to trust it by, so it is fetched again. ``timeout``
    bounds connecting and each wait for data, not the whole transfer. Raises
    ``DownloadError`` for HTTP errors, network failures, short transfers and
    checksum mismatches; the final name is only ever written by a complete,
    verified download.
    """
    os.makedirs(folder, exist_ok=True)
    name = _file_name(url)
    path = os.path.join(folder, name)
    expected = sha1_hash.lower() if sha1_hash else None
    if expected and os.path.isfile(path) and sha1_file(path) == expected:
        return path
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=name + '.',
                                      suffix='.part', delete=False)
    try:
        with tmp:
            try:
                actual = _fetch(url, tmp, timeout, chunk_size, name)
            except requests.RequestException as e:
                raise DownloadError(f'could not download {url}: '
                                    f'{_describe(e, timeout)}; check the address '
                                    f'and your network, or {STANDIN_HINT}') from e
        if expected and actual != expected:
            raise DownloadError(f'SHA-1 mismatch for {url}: expected {expected}, '
                                f'got {actual}; the file was discarded. Try again, '
                                f'or {STANDIN_HINT}')
        os.replace(tmp.name, path)
    finally:
        # After os.replace the temporary name is gone; on any error we remove it.
        if os.path.exists(tmp.name):
            os.remove(tmp.name)
    return path


# ---------------------------------------------------------------- archives

_TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tbz2', '.tar.xz', '.txz')
_DRIVE = re.compile(r'^[A-Za-z]:')


def _archive_kind(archive):
    lower = archive.lower()
    if lower.endswith('.zip'):
        return 'zip'
    if lower.endswith(_TAR_SUFFIXES):
        return 'tar'
    raise ArchiveError(f'unknown archive type: {archive} (expected .zip or one '
                       f'of {", ".join(_TAR_SUFFIXES)})')


def _parts(name, archive):
    """Split a member name into path components, refusing every unsafe form."""
    if not name or '\0' in name or '\\' in name:
        raise UnsafeArchiveError(f'{archive}: unsafe member name {name!r} '
                                 f'(empty, NUL byte or backslash)')
    if name.startswith('/') or _DRIVE.match(name):
        raise UnsafeArchiveError(f'{archive}: member {name!r} has an absolute path')
    parts = [p for p in name.split('/') if p not in ('', '.')]
    if '..' in parts:
        raise UnsafeArchiveError(f'{archive}: member {name!r} contains ".."')
    return parts


def _check_through_links(parts, links, name, archive):
    """Refuse a path whose leading components are a symlink from the archive.

    Writing through such a link would follow it; refusing this also stops
    chains like ``a -> .`` followed by ``a/b -> ..``.
    """
    for i in range(1, len(parts)):
        if '/'.join(parts[:i]) in links:
            raise UnsafeArchiveError(f'{archive}: member {name!r} passes through '
                                     f'the symlink {"/".join(parts[:i])!r}')


def _resolve_link(start, target, links, name, archive):
    """Walk ``target`` from the components ``start``; refuse leaving the root or crossing a link."""
    if not target or target.startswith('/') or _DRIVE.match(target) or '\\' in target:
        raise UnsafeArchiveError(f'{archive}: link {name!r} points to {target!r}, '
                                 f'outside the target folder')
    here = list(start)
    for part in target.split('/'):
        if part in ('', '.'):
            continue
        if '/'.join(here) in links:  # stepping on from (or back out of) a link: give up
            raise UnsafeArchiveError(f'{archive}: link {name!r} resolves through '
                                     f'the symlink {"/".join(here)!r}')
        if part == '..':
            if not here:
                raise UnsafeArchiveError(f'{archive}: link {name!r} points to '
                                         f'{target!r}, outside the target folder')
            here.pop()
        else:
            here.append(part)


def _check_tar(tar, archive):
    members = [(m, _parts(m.name, archive)) for m in tar.getmembers()]
    links = {'/'.join(parts) for m, parts in members if m.issym()}
    for m, parts in members:
        if not parts and not m.isdir():
            raise UnsafeArchiveError(f'{archive}: member {m.name!r} would '
                                     f'replace the target folder itself')
        _check_through_links(parts, links, m.name, archive)
        if m.issym():
            _resolve_link(parts[:-1], m.linkname, links, m.name, archive)
        elif m.islnk():  # hard link targets are named from the archive root
            _resolve_link([], m.linkname, links, m.name, archive)
        elif not (m.isreg() or m.isdir()):
            raise UnsafeArchiveError(f'{archive}: member {m.name!r} is a device '
                                     f'or FIFO; refusing to create it')


def _check_zip(zf, archive):
    # zipfile never creates symlinks (it writes a link's target as file content),
    # so names are all there is to check.
    for info in zf.infolist():
        if not _parts(info.filename, archive) and not info.is_dir():
            raise UnsafeArchiveError(f'{archive}: member {info.filename!r} would '
                                     f'replace the target folder itself')


# The 'data' filter (Python >= 3.11.4) repeats the path checks and also drops
# setuid bits and foreign ownership; FilterError is what it raises.
_TAR_FILTER = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
_TAR_FILTER_ERROR = getattr(tarfile, 'FilterError', ())


def _unpacked_size(arc, kind):
    """Bytes the members will take once extracted, from their headers."""
    if kind == 'zip':
        return sum(info.file_size for info in arc.infolist())
    return sum(m.size for m in arc.getmembers() if m.isreg())


def _check_space(arc, kind, archive, folder):
    on_disk = os.path.abspath(folder)
    while not os.path.exists(on_disk):  # the folder may not exist yet
        on_disk = os.path.dirname(on_disk)
    needed, free = _unpacked_size(arc, kind), shutil.disk_usage(on_disk).free
    if needed > free:
        raise ArchiveError(f'{archive} unpacks to {needed / 2**20:.1f} MiB but '
                           f'only {free / 2**20:.1f} MiB are free in {folder}; '
                           f'nothing was extracted')


def _unpack(archive, kind, folder):
    """Check every member, then extract into a fresh staging folder inside ``folder``."""
    if kind == 'zip':
        arc = zipfile.ZipFile(archive)
        check, extract_all = _check_zip, arc.extractall
    else:
        arc = tarfile.open(archive, 'r:*')
        check, extract_all = _check_tar, lambda dest: arc.extractall(dest, **_TAR_FILTER)
    with arc:
        check(arc, archive)
        _check_space(arc, kind, archive, folder)
        os.makedirs(folder, exist_ok=True)
        staging = tempfile.mkdtemp(dir=folder, prefix='.extracting-')
        try:
            extract_all(staging)
        except BaseException:
            shutil.rmtree(staging)
            raise
    return staging


def _move_into_place(staging, folder):
    """Move each top-level entry of ``staging`` into ``folder``, replacing same-named ones."""
    for name in os.listdir(staging):
        src, dst = os.path.join(staging, name), os.path.join(folder, name)
        if os.path.lexists(dst):
            # Set the old entry aside first so that a name is never half-written.
            aside = tempfile.mkdtemp(dir=folder, prefix='.replaced-')
            os.rename(dst, os.path.join(aside, name))
            os.rename(src, dst)
            shutil.rmtree(aside)
        else:
            os.rename(src, dst)
    os.rmdir(staging)


def extract(archive, folder):
    """Extract a zip or tar(.gz/.bz2/.xz) ``archive`` into ``folder``; return ``folder``.

    Every member is checked before anything is written (``UnsafeArchiveError``
    names the first offender). The archive's top-level entries replace entries of
    the same name in ``folder``; other entries of ``folder`` are left alone.
    A corrupt archive raises ``ArchiveError`` naming the file.
    """
    archive, folder = os.fspath(archive), os.fspath(folder)
    kind = _archive_kind(archive)
    try:
        staging = _unpack(archive, kind, folder)
    except _TAR_FILTER_ERROR as e:
        raise UnsafeArchiveError(f'{archive}: {e}') from e
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        # EOFError: a truncated gzip/bz2/xz stream.
        raise ArchiveError(f'corrupt or truncated archive {archive}: {e}') from e
    _move_into_place(staging, folder)
    return folder


def _archive_stem(path):
    name = os.path.basename(path)
    for suffix in ('.zip',) + _TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def download_extract(url, sha1_hash, folder, subdir=None):
    """Download an archive into ``folder``, extract it there, return the dataset folder.

    The dataset folder is ``folder/subdir`` (by default the archive's name without
    its extension). A marker file ``.extracted-<sha1>`` inside it records a
    complete extraction of exactly that archive; when it is present and the hash
    is known, nothing is downloaded or extracted again.
    """
    name = _file_name(url)
    dataset = os.path.join(folder, subdir if subdir is not None else _archive_stem(name))
    if sha1_hash and os.path.exists(os.path.join(dataset, f'.extracted-{sha1_hash.lower()}')):
        return dataset
    archive = download(url, folder, sha1_hash)
    marker = os.path.join(dataset, f'.extracted-{sha1_file(archive)}')
    if os.path.exists(marker):
        return dataset
    extract(archive, folder)
    if not os.path.isdir(dataset):
        raise ArchiveError(f'{archive} does not contain the folder {subdir or _archive_stem(name)!r}')
    with open(marker, 'w') as f:
        f.write(url + '\n')
    return dataset


# ---------------------------------------------------------------- .bin pairs

class _NumpyDType:
    """Inert stand-in for ``numpy.dtype`` inside a pickle: it only remembers the code."""

    def __init__(self, code=None, *args):
        self.code = code.decode('ascii', 'replace') if isinstance(code, bytes) else code

    def __setstate__(self, state):
        pass  # byte order and flags are irrelevant for a one-byte bool


def _numpy_scalar(dtype, data=None):
    """Stand-in for ``numpy.core.multiarray.scalar``: accepts only bools, returns ``bool``."""
    if not (isinstance(dtype, _NumpyDType) and dtype.code in ('b1', '?')
            and data in (b'\x00', b'\x01')):
        raise pickle.UnpicklingError('only numpy bool scalars are supported')
    return data == b'\x01'


def _codecs_encode(text, encoding='utf-8', *rest):
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use for bytes."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1') or rest:
        raise pickle.UnpicklingError('unsupported _codecs.encode call')
    return text.encode('latin1')


# The only globals a .bin file may name; each maps to an inert local stand-in,
# so no numpy (or any other) code runs while loading.
_ALLOWED_GLOBALS = {
    ('numpy', 'dtype'): _NumpyDType,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,  # numpy >= 2
    ('_codecs', 'encode'): _codecs_encode,
}


class _PairsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f'refusing to load the global {module}.{name}') from None


def _check_memo(data):
    """Refuse memo indices far beyond what a pickler writes, before unpickling.

    CPython's unpickler allocates a memo table as large as the biggest index it
    sees, so a few crafted bytes could claim gigabytes. Picklers number memo
    entries 0, 1, 2... so an index can never exceed the opcodes read so far.
    """
    for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
        if op.name in ('PUT', 'BINPUT', 'LONG_BINPUT') and int(arg) > count:
            raise pickle.UnpicklingError(f'memo index {arg} out of range')


def _is_bool(x):
    return type(x) is bool or (type(x).__module__ == 'numpy'
                               and type(x).__name__ in ('bool_', 'bool'))


def _check_pairs(bins, issame, where, byte_types=(bytes, bytearray)):
    """Validate and normalise to (list of bytes, list of bool); raise BinFormatError."""
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise BinFormatError(f'{where}: bins and issame must be lists, got '
                             f'{type(bins).__name__} and {type(issame).__name__}')
    if not issame:
        raise BinFormatError(f'{where}: contains no pairs')
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


def load_bin_pairs(path):
    """Load an InsightFace verification file; return ``(bins, issame)``.

    ``bins`` is a list of ``2 * n`` encoded images (bytes), ``issame`` a list of
    ``n`` plain bools. No code from the file is run: besides containers, bytes and
    bools only numpy bool scalars and Python 2 style bytes are understood, through
    inert stand-ins. Anything else raises ``BinFormatError`` naming the file.
    """
    with open(path, 'rb') as f:
        data = f.read()  # in memory, so a length field cannot make a read allocate more
    try:
        _check_memo(data)
        # encoding='bytes' keeps Python 2 str objects (the original files) as bytes.
        obj = _PairsUnpickler(io.BytesIO(data), encoding='bytes').load()
    except Exception as e:  # nothing from the file has run, so any failure means "malformed"
        raise BinFormatError(f'{path}: not a valid verification pickle '
                             f'({type(e).__name__}: {e})') from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        size = f' of length {len(obj)}' if isinstance(obj, (tuple, list)) else ''
        raise BinFormatError(f'{path}: expected a pair (bins, issame), got a '
                             f'{type(obj).__name__}{size}')
    # Only bytes, not bytearray: a file can reference one bytearray a million times
    # through the memo, and converting each reference would copy it a million times.
    return _check_pairs(obj[0], obj[1], path, byte_types=(bytes,))


def save_bin_pairs(path, bins, issame):
    """Write ``(bins, issame)`` in the InsightFace format (pickle protocol 4).

    The input is validated like a loaded file and written atomically, so a
    reader never sees a half-written file.
    """
    bins, issame = _check_pairs(list(bins), list(issame), path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.NamedTemporaryFile(dir=folder, suffix='.part', delete=False)
    try:
        with tmp:
            pickle.dump((bins, issame), tmp, protocol=4)
        os.replace(tmp.name, path)
    finally:
        if os.path.exists(tmp.name):
            os.remove(tmp.name)
