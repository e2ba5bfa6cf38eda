"""Write under a temporary name, then publish: how d2l_face puts data in place.

Everything d2l_face publishes (a download, an extracted archive, a pack, the
stand-in, a model file) is written under a temporary name first and renamed
into place when complete, so that a final name never holds a partial result:

- :func:`writing` for one file (``with publish.writing(path) as f``);
- :func:`move_all` for staged files and folders, all of them or none: an
  entry already at a target is set aside first (a file by a hard link, so
  that its name never goes missing; a folder by a rename) and put back if
  anything fails;
- :func:`read_marker` / :func:`write_marker` for the *marker* that says a
  file or folder is ours: a small JSON object, written whole or not at all,
  read only from a bounded regular file (never through a link, never a FIFO)
  and compared as JSON text (:func:`same_json`);
- :class:`ForeignError`, raised when a target holds what d2l_face did not
  make (no valid marker of ours): such data is only ever read, never
  replaced.

A process killed with SIGKILL runs no clean-up, so every temporary name
carries the machine and the process that made it::

    <prefix><host>-<pid>-<16 random hex digits><suffix>

``<host>`` is the start of the host name followed by a digest of the whole
host name and of the process-id namespace, so two containers that share a
folder and a host name but number their processes apart never judge each
other's files by pid. A later run calls :func:`remove_stale`, which removes
the entries whose owner it can prove gone: those of its own host and
namespace whose process no longer exists, and any of ours untouched for
:data:`STALE_AFTER` seconds (a week; what a dead container or a reboot left,
since no writer of ours pauses that long). An entry that a killed
:func:`move_all` had set aside is first put back where nothing took its name.
Everything else stays: files of a process that still runs, recent ones of
another machine, files named otherwise; links are never followed, and the
folder's entries are listed and parsed, never matched with a glob pattern (a
folder named ``data[1]`` cannot reach into ``data1``). Files and folders are
created with the user's umask, as any file the user makes.
"""
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time

from d2l_face import formats

# The prefix of every temporary name d2l_face makes (the stand-in keeps its
# own, so that folders of earlier versions are still recognized).
PREFIX = '.d2l-face-'
STALE_AFTER = 7 * 24 * 3600  # seconds without a change that prove a temporary dead
# The suffix of a folder that holds what `move_all` set aside.
ASIDE = '.replaced'
MAX_MARKER_BYTES = 1 << 20  # a marker is a few hundred bytes; never read more


def _host_tag():
    """Who may judge our temporaries by pid: this host name and pid namespace."""
    name = socket.gethostname()
    try:  # e.g. 'pid:[4026531836]'; the same across reboots outside containers
        namespace = os.readlink('/proc/self/ns/pid')
    except OSError:
        namespace = ''
    key = f'{name}\0{namespace}'.encode('utf-8', 'surrogateescape')
    readable = re.sub(r'[^A-Za-z0-9]', '', name)[:24] or 'host'
    return readable + hashlib.sha1(key).hexdigest()[:8]


HOST = _host_tag()
_NAME = re.compile(r'(?P<host>[A-Za-z0-9]{1,64})-(?P<pid>[0-9]{1,10})-'
                   r'[0-9a-f]{16}(?P<suffix>.*)', re.DOTALL)


def temp_name(prefix=PREFIX, suffix='', pid=None):
    """A new temporary name of this process (or of process `pid`)."""
    pid = os.getpid() if pid is None else pid
    return f'{prefix}{HOST}-{pid}-{secrets.token_hex(8)}{suffix}'


def temp_path(folder, prefix=PREFIX, suffix='', pid=None):
    """`folder` joined with a new :func:`temp_name`."""
    return os.path.join(folder, temp_name(prefix, suffix, pid))


def longest_name(prefix=PREFIX, suffix=''):
    """The length of the longest name :func:`temp_name` can make."""
    return len(f'{prefix}{HOST}-{2 ** 32}-{"0" * 16}{suffix}')


def parse(name, prefix=PREFIX):
    """Return (host, pid, suffix) of a temporary name, or None if not one."""
    if not name.startswith(prefix):
        return None
    match = _NAME.fullmatch(name, len(prefix))
    if match is None:
        return None
    return match['host'], int(match['pid']), match['suffix']


def create_file(folder, prefix=PREFIX, suffix='', mode='wb'):
    """Create a new temporary file in `folder`; return (path, open file).

    Created with permissions 0o666 less the umask, as any file the user
    makes (``tempfile`` would make it 0o600 for good)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0)
    while True:
        path = temp_path(folder, prefix, suffix)
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError:
            continue
        return path, os.fdopen(fd, mode)


def create_dir(folder, prefix=PREFIX, suffix='', mode=0o777):
    """Create a new temporary folder in `folder` (`mode` less the umask)."""
    while True:
        path = temp_path(folder, prefix, suffix)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue
        return path


def pid_alive(pid):
    """False only when no process `pid` exists on this machine."""
    if os.name != 'posix' or pid <= 0:
        return True  # cannot prove it dead (and Windows' os.kill would kill)
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except OverflowError:  # beyond any pid a kernel hands out
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user
        return True
    return True


def _untouched_for(path):
    """Seconds since `path` (not what a link points to) last changed."""
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def stale(folder, prefix=PREFIX):
    """The (path, suffix) of temporaries in `folder` whose owner is gone.

    That is: of this host and namespace with a dead process, or of anyone
    when untouched for STALE_AFTER seconds."""
    try:
        with os.scandir(folder) as entries:
            found = [(entry.path, parse(entry.name, prefix))
                     for entry in entries]
    except OSError:
        return []
    return [(path, owner[2]) for path, owner in found if owner is not None
            and (owner[0] == HOST and not pid_alive(owner[1])
                 or _untouched_for(path) > STALE_AFTER)]


def remove_stale(folder, prefix=PREFIX):
    """Remove the temporaries in `folder` whose owner is gone (see `stale`).

    Only regular files and real folders go, never links. What a killed
    `move_all` set aside is first put back where nothing took its name;
    a folder that cannot be emptied so stays. Best effort: a failure here
    never stops the caller."""
    for path, suffix in stale(folder, prefix):
        try:
            if os.path.islink(path):
                continue
            if os.path.isdir(path):
                if suffix == ASIDE:
                    _put_back(path, folder)
                shutil.rmtree(path)
            elif os.path.isfile(path):
                os.remove(path)
        except OSError:
            pass  # gone already (another run cleaning up), or not ours to remove


def _put_back(aside, folder):
    """Move what `aside` holds back into `folder`, where its names are free."""
    for name in os.listdir(aside):
        if not os.path.lexists(os.path.join(folder, name)):
            os.rename(os.path.join(aside, name), os.path.join(folder, name))


@contextlib.contextmanager
def writing(path, mode='wb', suffix=''):
    """Yield a new file whose content becomes `path` when the block ends.

    The file is written under a temporary name beside `path` (ending in
    `suffix`) and renamed over it only after the block ended normally and
    the data reached the disk, so `path` holds the old content or the whole new one, never a
    part (a full disk, an exception or a kill midway leaves the old file,
    and the temporary goes now or at the next run's :func:`remove_stale`).
    A link at `path` is replaced, not followed."""
    folder = os.path.dirname(path) or '.'
    remove_stale(folder)
    tmp, f = create_file(folder, suffix=suffix, mode=mode)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _sync_folder(folder):
    """Make a rename in `folder` durable (best effort; POSIX only)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- Publishing staged files and folders ----------------------------------

def _is_file(path):
    return stat.S_ISREG(os.lstat(path).st_mode)


def _set_aside(source, target):
    """Keep what is at `target` in a new aside folder beside it; return that.

    A file that a file replaces is hard-linked, so that `target` keeps its
    name until the new one replaces it; anything else (a folder) is renamed.
    If this process dies, the next `remove_stale` puts it back where the
    name is free."""
    folder = os.path.dirname(target) or '.'
    aside = create_dir(folder, suffix=ASIDE, mode=0o700)
    kept = os.path.join(aside, os.path.basename(target))
    try:
        if _is_file(target) and _is_file(source):
            try:
                os.link(target, kept, follow_symlinks=False)
                return aside
            except OSError:  # a file system without hard links
                pass
        os.rename(target, kept)
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)
        raise
    return aside


def _restore(target, aside):
    """Put what `aside` kept back at `target` if that name is free; drop `aside`."""
    if aside is not None:
        with contextlib.suppress(OSError):
            _put_back(aside, os.path.dirname(target) or '.')
        shutil.rmtree(aside, ignore_errors=True)


def move_all(pairs):
    """Rename each staged (source, target) pair into place, all or none.

    A target that exists is replaced: set aside first, removed once every
    pair is in place. On any failure (or KeyboardInterrupt) the pairs done
    are undone, the old entries put back, and the error raised; so the
    targets change all together or not at all (but for a moment between the
    renames). Sources and targets are files or folders on one file system;
    the caller checks beforehand that the targets are ours to replace."""
    done = []
    try:
        for source, target in pairs:
            aside = (_set_aside(source, target) if os.path.lexists(target)
                     else None)
            try:
                os.replace(source, target)
            except BaseException:
                _restore(target, aside)
                raise
            done.append((source, target, aside))
    except BaseException:
        for source, target, aside in reversed(done):
            with contextlib.suppress(OSError):  # the new entry back to source
                os.rename(target, source)
            _restore(target, aside)
        raise
    for _, _, aside in done:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


# --- Markers: the JSON that says a file or folder is ours ------------------

def read_marker(path, max_bytes=MAX_MARKER_BYTES):
    """The JSON object in marker `path`, or None if absent, unreadable or not one.

    Only a bounded regular file is read: a FIFO named like a marker does not
    block, and a link is no marker (it could vouch for another folder)."""
    try:
        marker = json.loads(formats.read_regular_file(
            path, max_bytes=max_bytes, follow_links=False))
    except (OSError, ValueError, RecursionError):  # missing, a link, not JSON
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(path, value):
    """Write JSON object `value` to marker `path`, whole or not at all."""
    with writing(path) as f:
        f.write(json.dumps(value, sort_keys=True).encode('ascii'))


def same_json(a, b):
    """Whether `a` and `b` are the same JSON (`true == 1` in Python, not here)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class ForeignError(FileExistsError):
    """A target holds what d2l_face did not make (or not as it is now): never replaced."""

    def __init__(self, path, reason, advice):
        self.path, self.reason = path, reason
        super().__init__(f'{path}: {reason}; d2l_face never replaces what '
                         f'it did not make. {advice}')
