"""The bookkeeping of the packs d2l_face makes from a folder dataset.

A pack ``prefix.rec`` / ``prefix.idx`` (see :mod:`d2l_face.recordio`) made
by the chapter's ``pack_face_records`` carries a *marker*,
``prefix.d2l-pack.json``, written last. It holds the number of records, the
sizes of the two files and a fingerprint of the sources (a digest of
``property`` and of the path, label, size, modification and change times and
inode of every image: ``os.utime`` can set the modification time back, but
not the change time, and a file renamed over another has a new inode). The
marker is read and written as :mod:`d2l_face.publish` reads and writes every
marker (a bounded regular file, never through a link). It answers two questions:

- *Is the pack fresh?* Only when the marker is complete, of exactly the
  right shape and types, and everything in it matches the folder and the
  files as they are now (:func:`is_fresh`).
- *Is the pack ours to replace?* Only when every pack file that exists has
  a size the marker records for it (:func:`foreign_reason`). A pack without
  our marker (InsightFace's, say) or whose files were changed since we
  wrote them is someone else's: it is only ever read, never replaced
  (``publish.ForeignError``), since we could not make it again.

A pack is written under temporary names (:func:`staging`, named and cleaned
up by :mod:`d2l_face.publish`) and moved into place by :func:`publish`
(with ``publish.move_all``).
Just before the renames, the marker is replaced by a *claim* that lists,
for each file, both its old and its new size: whether the run completes or
is killed between the renames, the files stay ours (never fresh until the
complete marker is written). Files get the user's umask.
"""
import contextlib
import hashlib
import os
import stat

from d2l_face import formats, publish as _publish

MARKER = '.d2l-pack.json'
FORMAT = 'd2l_face pack'
VERSION = 1  # the version of the pack and its marker
FILES = ('.rec', '.idx')
_SIZE_KEYS = {'.rec': 'rec_bytes', '.idx': 'idx_bytes'}
_MAX_PROPERTY_BYTES = 1 << 16


def fingerprint(data_dir, items):
    """Digest of `property` and of each image's path, label, size and times.

    `items` is the [(path, label)] list of the images."""
    digest = hashlib.sha1(formats.read_regular_file(
        os.path.join(data_dir, formats.PROPERTY_FILE),
        max_bytes=_MAX_PROPERTY_BYTES))
    for path, label in items:
        info = os.stat(path)
        line = (f'{os.path.relpath(path, data_dir)}\t{label}\t'
                f'{info.st_size}\t{info.st_mtime_ns}\t{info.st_ctime_ns}\t'
                f'{info.st_ino}\n')
        digest.update(line.encode('utf-8', 'surrogateescape'))
    return digest.hexdigest()


def _size(path):
    """The size of regular file `path`, None if absent, 'other' if not one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else 'other'


def expected_marker(prefix, num_records, sources):
    """The marker a fresh pack `prefix` must carry (None: no such files)."""
    sizes = [_size(prefix + ext) for ext in FILES]
    if not all(isinstance(size, int) for size in sizes):
        return None
    return {'format': FORMAT, 'version': VERSION, 'num_records': num_records,
            'rec_bytes': sizes[0], 'idx_bytes': sizes[1], 'sources': sources}


def is_fresh(prefix, num_records, sources):
    """Whether pack `prefix` is complete and made from these sources."""
    marker = _publish.read_marker(prefix + MARKER)
    expected = expected_marker(prefix, num_records, sources)
    if marker is None or expected is None or set(marker) != set(expected):
        return False
    # `type` too: in JSON, `true` is no count and 1.0 no size.
    return all(type(marker[k]) is type(v) and marker[k] == v
               for k, v in expected.items())


def _recorded_sizes(marker, ext):
    """The sizes a marker allows for file `ext`: one, or a claim's list."""
    value = marker.get(_SIZE_KEYS[ext])
    values = value if isinstance(value, list) else [value]
    return [v for v in values if type(v) is int]


def foreign_reason(prefix):
    """Why pack `prefix` is not ours to replace; None when it is (or absent)."""
    sizes = {ext: _size(prefix + ext) for ext in FILES}
    if all(size is None for size in sizes.values()):
        return None  # nothing there to lose
    for ext, size in sizes.items():
        if size == 'other':
            return f'not made by d2l_face ({prefix}{ext} is not a file)'
    marker = _publish.read_marker(prefix + MARKER)
    if marker is None or marker.get('format') != FORMAT:
        what = ('no marker' if not os.path.lexists(prefix + MARKER) else
                f'{os.path.basename(prefix + MARKER)} is not its marker')
        return f'not made by d2l_face ({what})'
    for ext, size in sizes.items():
        recorded = _recorded_sizes(marker, ext)
        if size is not None and size not in recorded:
            return (f'not made by d2l_face as they are now: {prefix}{ext} '
                    f'holds {size} bytes, but its marker records '
                    f'{" or ".join(map(str, recorded)) or "no size"}')
    return None


def check_ours(prefix):
    """Raise publish.ForeignError unless pack `prefix` is ours to replace."""
    reason = foreign_reason(prefix)
    if reason is not None:
        raise _publish.ForeignError(
            f'{prefix}.rec/.idx', reason, 'Read them with FaceRecordIter, or '
            'pack the folders under another name.')


def remove_stale(prefix):
    """Remove what killed packers left beside pack `prefix` (d2l_face.publish).

    Also when the pack itself is fresh, so that a run killed while another
    finished the pack leaves nothing behind for good."""
    _publish.remove_stale(os.path.dirname(prefix) or '.')


@contextlib.contextmanager
def staging(prefix):
    """Yield a temporary prefix beside pack `prefix`; its files go at exit.

    Whatever happens inside, a full disk included, every file written under
    the temporary prefix is removed at the end (those renamed into place
    are gone already). Temporaries that dead processes left in the folder
    are removed first."""
    folder, name = os.path.split(prefix)
    folder = folder or '.'
    remove_stale(prefix)
    tmp = _publish.temp_path(folder, suffix='.' + name)
    try:
        yield tmp
    finally:
        start = os.path.basename(tmp) + '.'
        with os.scandir(folder) as entries:
            ours = [entry.path for entry in entries
                    if entry.name.startswith(start)
                    and entry.is_file(follow_symlinks=False)]
        for path in ours:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def publish(tmp, prefix, num_records, sources):
    """Move the pack written under `tmp` to `prefix`; its marker last."""
    check_ours(prefix)  # again: someone may have put a pack there meanwhile
    old = {ext: _size(prefix + ext) for ext in FILES}
    new = {ext: _size(tmp + ext) for ext in FILES}
    claim = {'format': FORMAT, 'version': VERSION, 'packing': True}
    claim.update({_SIZE_KEYS[ext]: [old[ext], new[ext]] for ext in FILES})
    _publish.write_marker(prefix + MARKER, claim)
    _publish.move_all((tmp + ext, prefix + ext) for ext in FILES)
    _publish.write_marker(prefix + MARKER,
                          expected_marker(prefix, num_records, sources))
