"""A checked path for the data this chapter fetches: downloads and archives.

* ``download`` streams into a temporary file beside the target, checks the
  length the server announced, stops a body that grows past ``max_bytes`` (by
  default most of the free disk space), checks the SHA-1 *after* the transfer,
  and only then renames the file into place: an interrupted or corrupted
  download never sits under the final name. A transfer that runs past
  ``DOWNLOAD_DEADLINE`` seconds, or whose average rate stays below
  ``MIN_RATE`` after the first ``RATE_GRACE`` seconds, is stopped: a server
  that sends a byte now and then is never silent long enough for a timeout.
* ``extract`` reads every member name of a zip or tar archive before writing a
  byte and refuses absolute paths, ``..``, drive letters and backslashes, links
  that leave the target folder (or pass through another link), device or FIFO
  members, encrypted members, compression methods Python cannot read, and names
  too long for the file system. It adds up the members' sizes and refuses an
  archive that would not fit in the free disk space (zipfile stops at each
  member's declared size and tar headers hold exact sizes, so the sum is
  binding). It unpacks into a hidden staging folder and moves the result in only
  when the archive was read to its end and passed every check its format has
  (zip CRCs; tar header checksums and the end-of-archive blocks; gzip, bzip2
  and xz checksums), so a damaged archive leaves nothing behind.

Every failure of the network or of a file arrives as a ``DataError`` naming
the file and the cause (a URL without a file name is a ``ValueError``): a
``DownloadError`` (also an ``OSError``) for the network and for downloaded
archives that do not unpack, an ``ArchiveError`` (also ``ValueError``) for
bad archives; :mod:`d2l_face.binsets` adds ``BinFormatError`` for bad ``.bin``
files. Temporary files and folders are named
``.d2l-face-<host>-<pid>-<random>.<kind>`` and moved into place by
``d2l_face.publish``; a later call removes those whose process is dead, and
nothing else. Files get the user's umask.
"""
import bz2
import hashlib
import lzma
import os
import re
import shutil
import sys
import tarfile
import time
import zipfile
from urllib.parse import unquote, urlsplit

import requests
import urllib3

from d2l_face import publish

__all__ = [
    'DataError', 'DownloadError', 'ArchiveError', 'UnsafeArchiveError',
    'DownloadedArchiveError', 'download', 'extract', 'download_extract',
    'sha1_file',
]

STANDIN_HINT = 'set D2L_FACE_SOURCE=standin to use the generated stand-in data'

# ``timeout`` bounds each wait for data, not a whole transfer. A download ends
# within DOWNLOAD_DEADLINE seconds, and after RATE_GRACE seconds it must have
# averaged MIN_RATE bytes a second (a 100 MB archive in under 3 hours).
DOWNLOAD_DEADLINE = 4 * 3600
MIN_RATE = 10_000
RATE_GRACE = 30


class DataError(Exception):
    """Data that could not be fetched, unpacked or read; the message says which and why."""


class DownloadError(DataError, OSError):
    """A download failed or its content did not verify.

    An ``OSError`` so that code already prepared for I/O failures (a missing
    file, a full disk) also handles an unreachable or corrupted source.
    """


class ArchiveError(DataError, ValueError):
    """An archive is of an unknown type, damaged, or lacks an expected folder."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would be written outside the target folder."""


class DownloadedArchiveError(ArchiveError, DownloadError):
    """A downloaded archive could not be unpacked.

    Both an ``ArchiveError`` and a ``DownloadError``: a caller that falls back
    to other data when the download fails also falls back when what arrived is
    unusable.
    """


def _cause(exc):
    return f'{type(exc).__name__}: {exc}'


# ---------------------------------------------------------------- temporaries

# Our temporary names (d2l_face.publish) end in '.part' (a download being
# written) or '.extracting' (an archive being unpacked).
_TEMP_NAME_LENGTH = publish.longest_name(suffix='.extracting')


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
    """A short human cause for an exception raised while downloading."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f'HTTP {exc.response.status_code} {exc.response.reason}'
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f'the transfer broke off ({exc})'
    if isinstance(exc, requests.Timeout):
        return f'no answer within {timeout} s'
    if isinstance(exc, requests.ConnectionError):
        return f'connection failed ({exc})'
    return _cause(exc)


def _announced_length(resp, url):
    """The body length the server announced, ``None`` if it announced none."""
    if resp.headers.get('Content-Encoding', 'identity').lower() != 'identity':
        return None  # the length is of the encoded body; the SHA-1 still guards us
    raw = resp.headers.get('Content-Length')
    if raw is None:
        return None
    if not re.fullmatch(r'[0-9]{1,20}', raw.strip(), re.ASCII):
        raise DownloadError(f'{url}: the server sent an invalid Content-Length '
                            f'{raw!r}; try again, or {STANDIN_HINT}')
    return int(raw)


def _chunks(resp, chunk_size):
    """Yield the body as it arrives, each read returning what is there.

    Unlike ``iter_content``, which waits until `chunk_size` bytes are in,
    so that the caller can look at its clock while data trickles in. The
    errors are those ``iter_content`` raises."""
    while True:
        try:
            chunk = resp.raw.read1(chunk_size, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as e:
            raise requests.exceptions.ReadTimeout(e) from e
        except urllib3.exceptions.ProtocolError as e:
            raise requests.exceptions.ChunkedEncodingError(e) from e
        except urllib3.exceptions.DecodeError as e:
            raise requests.exceptions.ContentDecodingError(e) from e
        if not chunk:
            return
        yield chunk


def _check_pace(url, done, start, deadline, min_rate, rate_grace):
    """Refuse a transfer past its deadline, or too slow after its grace."""
    elapsed = time.monotonic() - start
    if elapsed > deadline:
        raise DownloadError(f'{url}: not done after {deadline} s ({done} '
                            f'bytes received); stopped and discarded. Try '
                            f'again later, or {STANDIN_HINT}')
    if elapsed > rate_grace and done < min_rate * elapsed:
        raise DownloadError(f'{url}: {done} bytes in {elapsed:.1f} s, below '
                            f'the minimum average of {min_rate} bytes a '
                            f'second; stopped and discarded. Try again later, '
                            f'or {STANDIN_HINT}')


def _fetch(url, tmp, timeout, chunk_size, name, limit, pace):
    """Stream ``url`` into the open file ``tmp``; return the SHA-1 (hex) of what was written.

    ``pace``: (deadline, min_rate, rate_grace), as ``_check_pace`` takes them."""
    sha1, done, start = hashlib.sha1(), 0, time.monotonic()
    # Ask for the bytes as stored, so Content-Length counts what we write.
    with requests.get(url, stream=True, timeout=timeout,
                      headers={'Accept-Encoding': 'identity'}) as resp:
        resp.raise_for_status()
        total = _announced_length(resp, url)
        if total is not None and total > limit:
            raise DownloadError(f'{url} announces {total} bytes, more than the '
                                f'{limit} allowed here; nothing was kept')
        progress = _Progress(name, total or 0)
        try:
            for chunk in _chunks(resp, chunk_size):
                done += len(chunk)
                if done > limit:  # a body that never ends must not fill the disk
                    raise DownloadError(f'{url} sent more than the {limit} bytes '
                                        f'allowed here; stopped and discarded')
                _check_pace(url, done, start, *pace)
                tmp.write(chunk)
                sha1.update(chunk)
                progress.update(done)
        finally:
            progress.close()
    if total is not None and done != total:
        raise DownloadError(f'incomplete download of {url}: received {done} of '
                            f'{total} bytes; try again, or {STANDIN_HINT}')
    return sha1.hexdigest()


def _default_limit(folder):
    """The free space in ``folder`` less a reserve (a tenth of it, at most 1 GiB)."""
    free = shutil.disk_usage(folder).free
    return free - min(free // 10, 1 << 30)


def _pace(deadline, min_rate, rate_grace):
    """The limits of a transfer, the module's where None; checked."""
    pace = (DOWNLOAD_DEADLINE if deadline is None else deadline,
            MIN_RATE if min_rate is None else min_rate,
            RATE_GRACE if rate_grace is None else rate_grace)
    if not (pace[0] > 0 and pace[1] >= 0 and pace[2] >= 0):
        raise ValueError(f'need deadline > 0, min_rate >= 0 and rate_grace '
                         f'>= 0, not {pace}')
    return pace


def download(url, folder, sha1_hash=None, timeout=30, chunk_size=1 << 20,
             max_bytes=None, deadline=None, min_rate=None, rate_grace=None):
    """Download ``url`` into ``folder`` and return the path of the file.

    The file is named after the URL's last path component. If it already exists
    and matches ``sha1_hash``, it is returned without any network access; with no
    hash there is nothing to trust it by, so it is fetched again. ``timeout``
    bounds connecting and each wait for data, not the whole transfer;
    ``deadline`` (seconds) bounds the whole body's transfer, and after
    ``rate_grace`` seconds its average rate must be at least ``min_rate``
    bytes a second (None: ``DOWNLOAD_DEADLINE``, ``MIN_RATE`` and
    ``RATE_GRACE``); ``max_bytes`` bounds the body (by default: the free disk
    space less a reserve). Raises ``DownloadError`` for HTTP errors, network
    failures, bad or unmet ``Content-Length``, oversized bodies, transfers
    too slow or too long, checksum mismatches and local I/O errors; the final
    name is only ever written by a complete, verified download.
    """
    pace = _pace(deadline, min_rate, rate_grace)
    name = _file_name(url)
    folder = os.fspath(folder)
    path = os.path.join(folder, name)
    expected = sha1_hash.lower() if sha1_hash else None
    try:
        os.makedirs(folder, exist_ok=True)
        if expected and os.path.isfile(path) and sha1_file(path) == expected:
            return path
        limit = _default_limit(folder) if max_bytes is None else max_bytes
        # Renamed to `path` only when the block ends normally, else removed.
        with publish.writing(path, suffix='.part') as tmp:
            actual = _fetch(url, tmp, timeout, chunk_size, name, limit, pace)
            if expected and actual != expected:
                raise DownloadError(f'SHA-1 mismatch for {url}: expected '
                                    f'{expected}, got {actual}; the file was '
                                    f'discarded. Try again, or {STANDIN_HINT}')
    except DownloadError:
        raise
    except Exception as e:  # network, protocol, header or local I/O: all one kind for the caller
        raise DownloadError(f'could not download {url} to {path}: '
                            f'{_describe(e, timeout)}; check the address, your '
                            f'network and the disk, or {STANDIN_HINT}') from e
    return path


# ---------------------------------------------------------------- archives

_TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tbz2', '.tar.xz', '.txz')
_DRIVE = re.compile(r'^[A-Za-z]:')
# The methods Python's zipfile decompresses; Deflate64 (9) and others raise
# NotImplementedError only once a member is read.
_ZIP_METHODS = {zipfile.ZIP_STORED: 'stored', zipfile.ZIP_DEFLATED: 'deflate',
                zipfile.ZIP_BZIP2: 'bzip2', zipfile.ZIP_LZMA: 'lzma'}
_ZIP_METHOD_NAMES = {9: 'Deflate64', 10: 'PKWARE implode', 93: 'Zstandard',
                     98: 'PPMd', 99: 'AES encryption'}
# Deeper than any dataset; os.makedirs recurses once per level and would hit
# Python's recursion limit near a thousand.
_MAX_DEPTH = 100
# A tar ends with zero blocks, padded with zeros to its record size (10 KiB by
# default, a few MiB for big blocking factors); more than this is not padding.
_MAX_TAR_TAIL = 32 << 20


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


def _existing_ancestor(folder):
    path = os.path.abspath(folder)
    while not os.path.exists(path):  # the folder may not exist yet
        path = os.path.dirname(path)
    return path


def _path_limits(folder):
    """``(longest name, longest member path)``, in bytes, that ``folder`` can take."""
    try:
        where = _existing_ancestor(folder)
        name_max = os.pathconf(where, 'PC_NAME_MAX')
        path_max = os.pathconf(where, 'PC_PATH_MAX')
    except (AttributeError, ValueError, OSError):
        name_max, path_max = 255, 4096
    # Members are written below the staging folder; the kernel counts a NUL too.
    staging = len(os.fsencode(os.path.abspath(folder))) + 1 + _TEMP_NAME_LENGTH + 1
    return name_max, path_max - staging - 1


def _check_length(parts, name, archive, limits):
    """Refuse a name the file system would reject (ENAMETOOLONG) before writing anything."""
    name_max, path_max = limits
    longest = max((len(os.fsencode(p)) for p in parts), default=0)
    if longest > name_max:
        raise ArchiveError(f'{archive}: member {name[:80]!r}... has a name of '
                           f'{longest} bytes; this file system allows {name_max}')
    if len(parts) > _MAX_DEPTH or len(os.fsencode('/'.join(parts))) > path_max:
        raise ArchiveError(f'{archive}: member {name[:80]!r}... is nested too deep '
                           f'or named too long to extract here ({len(parts)} '
                           f'levels, at most {_MAX_DEPTH}, and {path_max} bytes of path)')


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


def _check_tar(tar, archive, limits):
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
        _check_length(parts, m.name, archive, limits)


def _check_tar_end(tar, archive):
    """Refuse a tar whose member list stopped before the archive's end.

    ``tarfile`` ends the member list silently at the first header it cannot
    read after the first one (a bad checksum, a cut at a block boundary), so a
    damaged archive would pass for a shorter whole one. A complete archive
    ends with at least one zero block and nothing but zeros after it. Reading
    to the end of the stream also makes gzip, bzip2 and xz check their CRCs and
    lengths, which they do only at the end.
    """
    f = tar.fileobj
    f.seek(tar.offset)  # forward after extraction, so no compressed stream rewinds
    tail = 0
    for chunk in iter(lambda: f.read(1 << 16), b''):
        if chunk.count(0) != len(chunk):
            raise ArchiveError(f'{archive}: damaged member header at byte '
                               f'{tar.offset} of the tar stream (the archive '
                               f'goes on after it); nothing was extracted')
        tail += len(chunk)
        if tail > _MAX_TAR_TAIL:
            raise ArchiveError(f'{archive}: more than {_MAX_TAR_TAIL} bytes of '
                               f'padding after the last member; nothing was extracted')
    if tail < tarfile.BLOCKSIZE:
        raise ArchiveError(f'{archive} is truncated: it ends at byte {tar.offset + tail} '
                           f'of the tar stream without an end-of-archive block; '
                           f'nothing was extracted')
    _check_no_dropped_stream(f, archive)


def _check_no_dropped_stream(f, archive):
    """Refuse bzip2 or xz data that the decompressor skipped at the end.

    After a complete stream, Python's bz2 and lzma readers start the next
    one, and when it does not begin like a stream (damaged, or not one at
    all) they stop as if the file ended there; gzip refuses such data.
    The skipped stream's decompressor then never reached its end.
    """
    if not isinstance(f, (bz2.BZ2File, lzma.LZMAFile)):
        return  # gzip refuses such data itself; a plain tar has no streams
    reader = getattr(getattr(f, '_buffer', None), 'raw', None)
    decompressor = getattr(reader, '_decompressor', None)
    if decompressor is not None and not getattr(decompressor, 'eof', True):
        raise ArchiveError(f'{archive}: data after the compressed stream is '
                           f'damaged or not part of the archive; nothing was '
                           f'extracted')


def _check_zip(zf, archive, limits):
    # zipfile never creates symlinks (it writes a link's target as file content),
    # so names, encryption and compression methods are all there is to check.
    for info in zf.infolist():
        parts = _parts(info.filename, archive)
        if not parts and not info.is_dir():
            raise UnsafeArchiveError(f'{archive}: member {info.filename!r} would '
                                     f'replace the target folder itself')
        if info.flag_bits & 0x1:
            raise ArchiveError(f'{archive}: member {info.filename!r} is encrypted; '
                               f'this project reads unencrypted archives only')
        if info.compress_type not in _ZIP_METHODS:
            method = _ZIP_METHOD_NAMES.get(info.compress_type, 'unknown')
            raise ArchiveError(f'{archive}: member {info.filename!r} uses compression '
                               f'method {info.compress_type} ({method}), which '
                               f'Python cannot decompress; repack it with deflate')
        _check_length(parts, info.filename, archive, limits)
    _check_zip_directory(zf, archive)


def _check_zip_directory(zf, archive):
    """Refuse a central directory that lists fewer members than its end record counts.

    zipfile reads the directory up to its size in bytes, so one damaged entry
    (a comment length grown by a flipped bit, say) can swallow the entries
    after it without an error, and the archive would pass for a smaller one.
    """
    try:  # zipfile's own reader of the end record (and of its zip64 form)
        expected = zipfile._EndRecData(zf.fp)[zipfile._ECD_ENTRIES_TOTAL]
    except (AttributeError, IndexError, TypeError):  # a Python without it
        return
    if len(zf.infolist()) != expected:
        raise ArchiveError(f'{archive}: damaged central directory: it lists '
                           f'{len(zf.infolist())} members but counts '
                           f'{expected}; nothing was extracted')


def _data_filter_with_umask(member, path):
    """tarfile's 'data' filter, then no ``chmod`` of regular files.

    The 'data' filter (Python >= 3.11.4) repeats the path checks and drops
    setuid bits and foreign ownership, but it sets each file's mode from the
    archive, ignoring the umask. Without a mode, tarfile leaves a file as
    ``open`` made it, so it gets the user's umask, as zip members do.
    """
    member = tarfile.data_filter(member, path)
    if member is not None and member.isreg():
        member = member.replace(mode=None, deep=False)
    return member


_TAR_FILTER = ({'filter': _data_filter_with_umask}
               if hasattr(tarfile, 'data_filter') else {})
_TAR_FILTER_ERROR = getattr(tarfile, 'FilterError', ())


def _unpacked_size(arc, kind):
    """Bytes the members will take once extracted, from their headers."""
    if kind == 'zip':
        return sum(info.file_size for info in arc.infolist())
    return sum(m.size for m in arc.getmembers() if m.isreg())


def _check_space(arc, kind, archive, folder):
    needed = _unpacked_size(arc, kind)
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    if needed > free:
        raise ArchiveError(f'{archive} unpacks to {needed / 2**20:.1f} MiB but '
                           f'only {free / 2**20:.1f} MiB are free in {folder}; '
                           f'nothing was extracted')


def _make_folders(folder):
    """``os.makedirs(folder)``; return the folders it created, deepest first."""
    created, path = [], os.path.abspath(folder)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return created


def _remove_folders(created):
    """Undo ``_make_folders`` as far as the folders are still empty."""
    for path in created:
        try:
            os.rmdir(path)
        except OSError:
            return


def _unpack(archive, kind, folder):
    """Check every member, extract into a fresh staging folder inside ``folder``, check the end."""
    limits = _path_limits(folder)
    if kind == 'zip':
        arc = zipfile.ZipFile(archive)
        check, extract_all = _check_zip, arc.extractall
    else:
        arc = tarfile.open(archive, 'r:*')
        check, extract_all = _check_tar, lambda dest: arc.extractall(dest, **_TAR_FILTER)
    with arc:
        check(arc, archive, limits)
        _check_space(arc, kind, archive, folder)
        created = _make_folders(folder)
        staging = None
        try:
            publish.remove_stale(folder)
            staging = publish.create_dir(folder, suffix='.extracting',
                                         mode=0o700)
            extract_all(staging)  # zipfile checks each member's CRC as it reads it
            if kind == 'tar':
                _check_tar_end(arc, archive)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            _remove_folders(created)
            raise
    return staging


def _move_into_place(staging, folder):
    """Move the top-level entries of ``staging`` into ``folder``, all or none.

    Same-named entries are replaced (``publish.move_all`` sets them aside
    first and puts them back if anything fails)."""
    try:
        publish.move_all([(os.path.join(staging, name), os.path.join(folder, name))
                          for name in os.listdir(staging)])
        os.rmdir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def extract(archive, folder):
    """Extract a zip or tar(.gz/.bz2/.xz) ``archive`` into ``folder``; return ``folder``.

    Every member is checked before anything is written (``UnsafeArchiveError``
    names the first offender). The archive's top-level entries replace entries of
    the same name in ``folder``; other entries of ``folder`` are left alone.
    A damaged, truncated or unreadable archive, and any failure to write it out,
    raises ``ArchiveError`` naming the file and the cause, and leaves ``folder``
    as it was.
    """
    archive, folder = os.fspath(archive), os.fspath(folder)
    kind = _archive_kind(archive)
    try:
        staging = _unpack(archive, kind, folder)
        _move_into_place(staging, folder)
    except ArchiveError:
        raise
    except _TAR_FILTER_ERROR as e:
        raise UnsafeArchiveError(f'{archive}: {e}') from e
    except Exception as e:
        # BadZipFile, TarError, EOFError (a cut stream), zlib.error, lzma.LZMAError,
        # OSError (bzip2 data, names the file system refuses, a full disk),
        # NotImplementedError and RuntimeError from zipfile: all one kind here.
        raise ArchiveError(f'cannot extract {archive}: damaged, truncated or '
                           f'unwritable ({_cause(e)}); nothing was extracted') from e
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
    is known, nothing is downloaded or extracted again. Every failure is a
    ``DownloadError``; one that happens after the download (a damaged archive,
    a missing folder) is a ``DownloadedArchiveError``, an ``ArchiveError`` too.
    """
    name = _file_name(url)
    dataset = os.path.join(folder, subdir if subdir is not None else _archive_stem(name))
    if sha1_hash and os.path.exists(os.path.join(dataset, f'.extracted-{sha1_hash.lower()}')):
        return dataset
    archive = download(url, folder, sha1_hash)
    try:
        marker = os.path.join(dataset, f'.extracted-{sha1_file(archive)}')
        if os.path.exists(marker):
            return dataset
        extract(archive, folder)
        if not os.path.isdir(dataset):
            raise ArchiveError(f'{archive} does not contain the folder '
                               f'{subdir or _archive_stem(name)!r}')
        publish.write_marker(marker, {'url': url})
    except (ArchiveError, OSError) as e:
        raise DownloadedArchiveError(f'{url} was downloaded but cannot be used: '
                                     f'{e}; {STANDIN_HINT}') from e
    return dataset
