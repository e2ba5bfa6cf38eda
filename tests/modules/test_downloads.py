"""d2l_face.downloads against real HTTP servers on 127.0.0.1 (no internet).

Downloads and archives as they should be, then crafted and accidental damage
(issue 14): a damaged archive taken as whole, an exception that escapes as
something other than the project's own error, a path with glob characters,
temporaries left by killed processes, files created without the user's
umask, and servers that lie about or never end their bodies.
"""
import bz2
import collections
import gzip
import hashlib
import io
import lzma
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from d2l_face import downloads, publish
from d2l_face.binsets import load_bin_pairs, save_bin_pairs
from d2l_face.downloads import (ArchiveError, DataError, DownloadedArchiveError,
                                DownloadError, UnsafeArchiveError, download,
                                download_extract, extract)
from synthetic import REPO, deadline

HINT = 'set D2L_FACE_SOURCE=standin to use the generated stand-in data'


def zip_bytes(members, compression=zipfile.ZIP_DEFLATED):
    """A zip archive in memory; ``members`` maps names to contents."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', compression) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression  # writestr follows the ZipInfo
            zf.writestr(info, data)
    return buf.getvalue()


# Random, so the payload does not compress and "half of it" spans several reads.
PAYLOAD = random.Random(0).randbytes(300_000)
GOOD_ZIP = zip_bytes({'faces/a.txt': b'alpha', 'faces/sub/b.bin': PAYLOAD})
GOOD_SHA = hashlib.sha1(GOOD_ZIP).hexdigest()
CORRUPT_ZIP = bytes(b ^ 0xFF for b in GOOD_ZIP)  # same length, wrong bytes


# ---------------------------------------------------------------- HTTP server

STALL = 30  # seconds a slow or stalling route keeps the client waiting


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    counts = collections.Counter()
    release = threading.Event()  # set at teardown so sleeping handlers end

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.counts[self.path] += 1
        kind = self.path.strip('/').split('/')[0]
        getattr(self, 'serve_' + kind.replace('.zip', ''), self.serve_missing)()

    def head(self, status=200, length=None, **headers):
        self.send_response(status)
        if length is not None:
            self.send_header('Content-Length', str(length))
        for key, value in headers.items():
            self.send_header(key.replace('_', '-'), value)
        self.end_headers()

    def serve_faces(self):  # /faces.zip
        self.head(length=len(GOOD_ZIP))
        self.wfile.write(GOOD_ZIP)

    def serve_corrupt(self):  # /corrupt/faces.zip: right size, wrong bytes
        self.head(length=len(CORRUPT_ZIP))
        self.wfile.write(CORRUPT_ZIP)

    def serve_truncated(self):  # Content-Length promises more than is sent
        self.head(length=len(GOOD_ZIP))
        self.wfile.write(GOOD_ZIP[:len(GOOD_ZIP) // 2])
        self.close_connection = True

    def serve_interrupted(self):  # chunked transfer that stops halfway
        self.head(Transfer_Encoding='chunked')
        half = GOOD_ZIP[:len(GOOD_ZIP) // 2]
        self.wfile.write(b'%x\r\n%s\r\n' % (len(half), half))
        self.close_connection = True

    def serve_nolength(self):  # body delimited by closing the connection
        self.head(Connection='close')
        self.wfile.write(GOOD_ZIP)
        self.close_connection = True

    def serve_slow(self):  # no answer before the client's timeout
        Handler.release.wait(STALL)
        self.close_connection = True  # the client is gone; write nothing

    def serve_stall(self):  # headers and half the body, then silence
        self.head(length=len(GOOD_ZIP))
        self.wfile.write(GOOD_ZIP[:len(GOOD_ZIP) // 2])
        self.wfile.flush()
        Handler.release.wait(STALL)
        self.close_connection = True

    def serve_error(self):
        self.head(500, length=0)

    def serve_missing(self):
        self.head(404, length=0)


def serve(handler):
    """Serve `handler` on 127.0.0.1 in a thread; yield its base URL, then stop.

    At the end `handler.release` is set, so that stalling routes return."""
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    httpd.daemon_threads = True
    handler.release.clear()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    handler.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(scope='module')
def server():
    yield from serve(Handler)


@pytest.fixture
def refused_url():
    # A bound socket that never listens: connecting to it is refused, and no
    # other process can take the port while the test runs.
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        yield f'http://127.0.0.1:{sock.getsockname()[1]}/faces.zip'


# ---------------------------------------------------------------- downloads

def test_download_good(server, tmp_path):
    path = download(server + '/faces.zip', tmp_path, GOOD_SHA)
    assert path == os.path.join(tmp_path, 'faces.zip')
    assert downloads.sha1_file(path) == GOOD_SHA
    assert os.listdir(tmp_path) == ['faces.zip']


def test_cache_hit_makes_no_request(server, tmp_path):
    url = server + '/faces.zip'
    download(url, tmp_path, GOOD_SHA)
    before = Handler.counts['/faces.zip']
    assert download(url, tmp_path, GOOD_SHA.upper()) == os.path.join(tmp_path, 'faces.zip')
    assert Handler.counts['/faces.zip'] == before


def test_stale_cached_file_is_replaced(server, tmp_path):
    (tmp_path / 'faces.zip').write_bytes(b'old and wrong')
    path = download(server + '/faces.zip', tmp_path, GOOD_SHA)
    assert downloads.sha1_file(path) == GOOD_SHA


def test_download_without_length(server, tmp_path):
    path = download(server + '/nolength/faces.zip', tmp_path, GOOD_SHA)
    assert downloads.sha1_file(path) == GOOD_SHA


def test_sha_mismatch_discards_file(server, tmp_path):
    url = server + '/corrupt/faces.zip'
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path, GOOD_SHA)
    message = str(info.value)
    assert url in message and GOOD_SHA in message
    assert hashlib.sha1(CORRUPT_ZIP).hexdigest() in message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('route', ['/truncated/faces.zip', '/interrupted/faces.zip'])
def test_broken_transfer_leaves_nothing(server, tmp_path, route):
    with pytest.raises(DownloadError) as info:
        download(server + route, tmp_path, GOOD_SHA)
    assert server + route in str(info.value)
    assert os.listdir(tmp_path) == []  # no final file, no .part


def test_truncated_without_hash_is_still_refused(server, tmp_path):
    # The length check alone catches it when no checksum is given.
    with pytest.raises(DownloadError):
        download(server + '/truncated/faces.zip', tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('route, cause', [('/missing.zip', '404'), ('/error.zip', '500')])
def test_http_errors(server, tmp_path, route, cause):
    with pytest.raises(DownloadError) as info:
        download(server + route, tmp_path)
    message = str(info.value)
    assert server + route in message and cause in message and HINT in message
    assert os.listdir(tmp_path) == []


def test_connection_refused(refused_url, tmp_path):
    with pytest.raises(DownloadError) as info:
        download(refused_url, tmp_path, timeout=2)
    assert refused_url in str(info.value) and HINT in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('route', ['/slow.zip', '/stall/faces.zip'])
def test_timeout(server, tmp_path, route):
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download(server + route, tmp_path, GOOD_SHA, timeout=0.5)
    # The client's timeout, not the end of the stall: loose, for a loaded
    # machine, yet far from the stall's end.
    assert time.monotonic() - start < STALL / 2
    assert server + route in str(info.value) and HINT in str(info.value)
    assert os.listdir(tmp_path) == []


class _ShortResponse:
    """A response whose body falls short of its Content-Length without any error."""
    headers = {'Content-Length': '10'}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def __init__(self):
        self.raw = self  # download reads the body with raw.read1
        self.body = [b'12345']

    def read1(self, size, decode_content=True):
        return self.body.pop() if self.body else b''


def test_length_backstop(monkeypatch, tmp_path):
    # urllib3 2 already refuses short bodies; this covers clients that do not.
    monkeypatch.setattr(downloads.requests, 'get', lambda *a, **k: _ShortResponse())
    with pytest.raises(DownloadError, match='received 5 of 10 bytes'):
        download('http://127.0.0.1:1/short.zip', tmp_path)
    assert os.listdir(tmp_path) == []


def test_failed_download_keeps_existing_file(server, tmp_path):
    (tmp_path / 'faces.zip').write_bytes(b'previous')
    with pytest.raises(DownloadError):
        download(server + '/corrupt/faces.zip', tmp_path, GOOD_SHA)
    assert (tmp_path / 'faces.zip').read_bytes() == b'previous'
    assert os.listdir(tmp_path) == ['faces.zip']


@pytest.mark.parametrize('url', ['http://127.0.0.1:1/', 'http://127.0.0.1:1/a/..',
                                 'http://127.0.0.1:1/x%2F..%2Fevil'])
def test_url_without_file_name(tmp_path, url):
    with pytest.raises(ValueError):
        download(url, tmp_path)


def test_progress_line(monkeypatch, capsys):
    clock = iter([0.0, 0.5, 1.5, 1.6, 3.0])
    monkeypatch.setattr(downloads.time, 'monotonic', lambda: next(clock))
    progress = downloads._Progress('faces.zip', 10_000_000)  # start at t=0
    progress.update(1_000_000)  # t=0.5: too early, quiet
    progress.update(4_000_000)  # t=1.5: shown
    progress.update(5_000_000)  # t=1.6: throttled
    progress.update(10_000_000)  # t=3.0: shown
    progress.close()
    err = capsys.readouterr().err
    assert err == '\rfaces.zip: 4.0 / 10.0 MB (40%)\rfaces.zip: 10.0 / 10.0 MB (100%)\n'


# ---------------------------------------------------------------- archives

def tar_bytes(*entries, mode='w'):
    """A tar archive in memory; entries are (name, type, data_or_linkname)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
            else:
                if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = value
                tar.addfile(info)
    return buf.getvalue()


def F(name, data=b'data'):
    return (name, tarfile.REGTYPE, data)


def SYM(name, target):
    return (name, tarfile.SYMTYPE, target)


def HARD(name, target):
    return (name, tarfile.LNKTYPE, target)


@pytest.fixture
def layout(tmp_path):
    """archives/ for inputs, work/target for output, work/outside as bait."""
    for name in ('archives', 'work/outside'):
        (tmp_path / name).mkdir(parents=True)
    return tmp_path


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob('*'))


UNSAFE = {
    'zip-parent': ('evil.zip', lambda t: zip_bytes({'ok.txt': b'', '../evil.txt': b'x'}), '../evil.txt'),
    'zip-absolute': ('evil.zip', lambda t: zip_bytes({str(t / 'work/outside/evil.txt'): b'x'}),
                     'outside/evil.txt'),
    'zip-drive': ('evil.zip', lambda t: zip_bytes({'C:/evil.txt': b'x'}), 'C:/evil.txt'),
    'zip-backslash': ('evil.zip', lambda t: zip_bytes({'..\\evil.txt': b'x'}), 'evil.txt'),
    'tar-parent': ('evil.tar', lambda t: tar_bytes(F('ok'), F('../x')), '../x'),
    'tar-symlink-abs': ('evil.tar.gz', lambda t: tar_bytes(
        SYM('out', str(t / 'work/outside')), F('out/evil.txt'), mode='w:gz'), 'out'),
    'tar-symlink-etc': ('evil.tar', lambda t: tar_bytes(SYM('etc', '/etc'), F('etc/evil.txt')), 'etc'),
    'tar-symlink-rel': ('evil.tar', lambda t: tar_bytes(SYM('up', '../outside'), F('up/evil.txt')), 'up'),
    'tar-through-inner-link': ('evil.tar', lambda t: tar_bytes(
        F('sub/keep'), SYM('inner', 'sub'), F('inner/evil.txt')), 'inner/evil.txt'),
    'tar-link-chain': ('evil.tar', lambda t: tar_bytes(SYM('a', '.'), SYM('a/b', '..')), 'a/b'),
    'tar-link-out-of-link': ('evil.tar', lambda t: tar_bytes(SYM('s', '.'), SYM('t', 's/..')), "'t'"),
    'tar-hardlink': ('evil.tar', lambda t: tar_bytes(HARD('hl', '../outside/bait')), 'hl'),
    'tar-hardlink-abs': ('evil.tar', lambda t: tar_bytes(
        HARD('hl', str(t / 'work/outside/bait'))), 'hl'),
    'tar-chardev': ('evil.tar', lambda t: tar_bytes(('dev', tarfile.CHRTYPE, None)), 'dev'),
    'tar-fifo': ('evil.tar', lambda t: tar_bytes(('pipe', tarfile.FIFOTYPE, None)), 'pipe'),
    'tar-root-file': ('evil.tar', lambda t: tar_bytes(F('./')), './'),
}


@pytest.mark.parametrize('case', list(UNSAFE))
def test_unsafe_archives_are_refused(layout, case):
    name, build, entry = UNSAFE[case]
    (layout / 'work/outside/bait').write_bytes(b'bait')
    archive = layout / 'archives' / name
    archive.write_bytes(build(layout))
    before = files_under(layout)
    with pytest.raises(UnsafeArchiveError) as info:
        extract(archive, layout / 'work/target')
    assert entry in str(info.value) and str(archive) in str(info.value)
    assert files_under(layout) == before  # nothing written, not even the target folder
    assert not os.path.exists('/etc/evil.txt')


def test_good_zip(layout):
    archive = layout / 'archives/faces.zip'
    archive.write_bytes(GOOD_ZIP)
    target = layout / 'work/target'
    assert extract(archive, target) == str(target)
    assert (target / 'faces/a.txt').read_bytes() == b'alpha'
    assert (target / 'faces/sub/b.bin').read_bytes() == PAYLOAD
    assert files_under(target) == ['faces', 'faces/a.txt', 'faces/sub', 'faces/sub/b.bin']


def test_good_tar_gz_with_inner_links(layout):
    archive = layout / 'archives/faces.tgz'
    archive.write_bytes(tar_bytes(
        ('./', tarfile.DIRTYPE, None), F('./faces/a.txt', b'alpha'),
        SYM('faces/link.txt', 'a.txt'), HARD('faces/hard.txt', 'faces/a.txt'),
        SYM('faces/self', '../faces'), mode='w:gz'))
    target = layout / 'work/target'
    extract(archive, target)
    for name in ('a.txt', 'link.txt', 'hard.txt', 'self/a.txt'):
        assert (target / 'faces' / name).read_bytes() == b'alpha'
    assert os.path.islink(target / 'faces/link.txt')


def test_extract_replaces_only_its_own_entries(layout):
    target = layout / 'work/target'
    first = layout / 'archives/v1.zip'
    first.write_bytes(zip_bytes({'faces/old.txt': b'1', 'faces/a.txt': b'1'}))
    extract(first, target)
    (target / 'unrelated.txt').write_bytes(b'keep me')
    second = layout / 'archives/v2.zip'
    second.write_bytes(zip_bytes({'faces/a.txt': b'2'}))
    extract(second, target)
    assert files_under(target) == ['faces', 'faces/a.txt', 'unrelated.txt']
    assert (target / 'faces/a.txt').read_bytes() == b'2'


def test_failed_extraction_keeps_previous_one(layout):
    target = layout / 'work/target'
    good = layout / 'archives/v1.zip'
    good.write_bytes(zip_bytes({'faces/a.txt': b'old'}))
    extract(good, target)
    # Valid structure, but the second member's bytes fail their CRC: this only
    # shows while extracting, after the first member was already written.
    data = zip_bytes({'faces/a.txt': b'new', 'faces/b.txt': b'B' * 1000}, zipfile.ZIP_STORED)
    bad = layout / 'archives/v2.zip'
    bad.write_bytes(data.replace(b'B' * 1000, b'B' * 999 + b'C'))
    with pytest.raises(ArchiveError) as info:
        extract(bad, target)
    assert str(bad) in str(info.value)
    assert files_under(target) == ['faces', 'faces/a.txt']  # no staging left behind
    assert (target / 'faces/a.txt').read_bytes() == b'old'


@pytest.mark.parametrize('name, data', [
    ('cut.zip', GOOD_ZIP[:len(GOOD_ZIP) // 2]),
    ('cut.tar.gz', tar_bytes(F('a', PAYLOAD), mode='w:gz')[:50_000]),
    ('garbage.tar', b'not a tar archive at all' * 40),
], ids=['cut.zip', 'cut.tar.gz', 'garbage.tar'])  # gzip's header holds a time
def test_corrupt_archive(layout, name, data):
    archive = layout / 'archives' / name
    archive.write_bytes(data)
    with pytest.raises(ArchiveError) as info:
        extract(archive, layout / 'work/target')
    assert str(archive) in str(info.value)
    assert info.value.__cause__ is not None
    assert not os.path.exists(layout / 'work/target/a')


@pytest.mark.parametrize('name', ['bomb.zip', 'bomb.tar.gz'])
def test_archive_larger_than_free_space_is_refused(layout, monkeypatch, name):
    zeros = b'\0' * (4 << 20)  # 4 MiB that compress to a few KiB
    archive = layout / 'archives' / name
    archive.write_bytes(zip_bytes({'faces/zeros': zeros}) if name.endswith('.zip')
                        else tar_bytes(F('faces/zeros', zeros), mode='w:gz'))
    assert archive.stat().st_size < 64 << 10
    free = collections.namedtuple('usage', 'total used free')(1 << 40, 0, 1 << 20)
    monkeypatch.setattr(downloads.shutil, 'disk_usage', lambda path: free)
    before = files_under(layout)
    with pytest.raises(ArchiveError, match=r'4\.0 MiB but only 1\.0 MiB'):
        extract(archive, layout / 'work/target')
    assert files_under(layout) == before  # nothing written, not even the target


def test_zip_member_cannot_outgrow_its_declared_size(layout):
    """The space check trusts the headers; zipfile holds members to them."""
    data = bytearray(zip_bytes({'big': b'\0' * (1 << 20)}))
    local, central = data.find(b'PK\x03\x04'), data.find(b'PK\x01\x02')
    data[local + 22:local + 26] = (10).to_bytes(4, 'little')  # declared: 10 bytes
    data[central + 24:central + 28] = (10).to_bytes(4, 'little')
    archive = layout / 'archives/liar.zip'
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError):
        extract(archive, layout / 'work/target')
    assert not os.path.exists(layout / 'work/target/big')


def test_unknown_archive_type(layout):
    archive = layout / 'archives/faces.rar'
    archive.write_bytes(b'Rar!')
    with pytest.raises(ValueError, match='faces.rar'):
        extract(archive, layout / 'work/target')


def test_download_extract(server, tmp_path):
    url = server + '/faces.zip'
    dataset = download_extract(url, GOOD_SHA, tmp_path)
    assert dataset == os.path.join(tmp_path, 'faces')
    assert (tmp_path / 'faces/a.txt').read_bytes() == b'alpha'
    assert os.path.exists(os.path.join(dataset, f'.extracted-{GOOD_SHA}'))
    # Complete extraction present: no request, no re-extraction, even without the archive.
    (tmp_path / 'faces/a.txt').write_bytes(b'edited')
    os.remove(tmp_path / 'faces.zip')
    before = Handler.counts['/faces.zip']
    assert download_extract(url, GOOD_SHA, tmp_path, 'faces') == dataset
    assert Handler.counts['/faces.zip'] == before
    assert (tmp_path / 'faces/a.txt').read_bytes() == b'edited'


def test_download_extract_without_hash_reuses_extraction(server, tmp_path):
    url = server + '/faces.zip'
    download_extract(url, None, tmp_path)
    (tmp_path / 'faces/a.txt').write_bytes(b'edited')
    download_extract(url, None, tmp_path)  # downloads again, finds the marker
    assert (tmp_path / 'faces/a.txt').read_bytes() == b'edited'


def test_download_extract_missing_subdir(server, tmp_path):
    with pytest.raises(ArchiveError, match='lfw'):
        download_extract(server + '/faces.zip', GOOD_SHA, tmp_path, 'lfw')


# ---------------------------------------------------------------- properties

member_names = st.text(alphabet='ab./\\:C ', max_size=16)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(member_names)
def test_random_zip_names_stay_inside(name):
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, 'work')
        target = os.path.join(work, 'target')
        os.makedirs(work)
        archive = os.path.join(tmp, 'x.zip')
        with open(archive, 'wb') as f:
            f.write(zip_bytes({name: b'payload'}))
        try:
            extract(archive, target)
        except UnsafeArchiveError:
            event('refused')
            assert os.listdir(work) == []
            return
        event('extracted')
        assert os.listdir(work) == ['target']
        real_target = os.path.realpath(target)
        for root, dirs, files in os.walk(target):
            for entry in dirs + files:
                real = os.path.realpath(os.path.join(root, entry))
                assert real.startswith(real_target + os.sep)
        assert sorted(os.listdir(tmp)) == ['work', 'x.zip']


# ================================================================ hostile

MEMBERS = {'faces/a.bin': bytes(range(256)) * 12,  # 3072 bytes: six blocks
           'faces/b.txt': b'bravo' * 100,
           'faces/c.txt': b'charlie'}
COMPRESS = {'.tar': lambda b: b, '.tar.gz': gzip.compress,
            '.tar.bz2': bz2.compress, '.tar.xz': lzma.compress}


def members_tar(members=MEMBERS, format=tarfile.USTAR_FORMAT):
    """A plain tar of `members` ({name: bytes}) in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=format) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


PLAIN_TAR = members_tar()
HEADERS = [m.offset for m in tarfile.open(fileobj=io.BytesIO(PLAIN_TAR)).getmembers()]
END = HEADERS[-1] + 2 * 512  # the first end-of-archive block: 'c.txt' fits one block


def members_zip(members=MEMBERS, compression=zipfile.ZIP_DEFLATED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def patch_zip(data, offset_in_local, offset_in_central, value, size=2):
    """Set a field in every local and central header of a zip."""
    data = bytearray(data)
    for sig, where in ((b'PK\x03\x04', offset_in_local), (b'PK\x01\x02', offset_in_central)):
        at = data.find(sig)
        while at != -1:
            data[at + where:at + where + size] = value.to_bytes(size, 'little')
            at = data.find(sig, at + 1)
    return bytes(data)


def in_zip_data(data):
    """The offset of the middle of the first member's compressed data."""
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    at = info.header_offset
    name_len, extra_len = (int.from_bytes(data[at + i:at + i + 2], 'little') for i in (26, 28))
    return at + 30 + name_len + extra_len + info.compress_size // 2


def flip(data, at):
    data = bytearray(data)
    data[at] ^= 0x55
    return bytes(data)


def tree(path):
    """Every path under ``path`` with the content of each file."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            out[rel] = None if os.path.isdir(full) else open(full, 'rb').read()
    return out


@pytest.fixture
def work(tmp_path):
    (tmp_path / 'archives').mkdir()
    (tmp_path / 'out').mkdir()
    return tmp_path


def refuse(work, name, data):
    """Extracting ``data`` raises ArchiveError naming it and leaves no trace."""
    archive = work / 'archives' / name
    archive.write_bytes(data)
    target = work / 'out' / 'target'
    with pytest.raises(ArchiveError) as info:
        extract(archive, target)
    assert str(archive) in str(info.value)
    assert tree(work / 'out') == {}  # not even the target folder
    return info.value


# ---------------------------------------------------------------- partial archives

DAMAGED_TARS = {
    'flipped-second-header': lambda: flip(PLAIN_TAR, HEADERS[1] + 3),
    'flipped-last-header': lambda: flip(PLAIN_TAR, HEADERS[2] + 100),
    'flipped-end-block': lambda: flip(PLAIN_TAR, END + 7),
    'cut-before-second-header': lambda: PLAIN_TAR[:HEADERS[1]],
    'cut-before-end-block': lambda: PLAIN_TAR[:END],
    'cut-in-data': lambda: PLAIN_TAR[:HEADERS[0] + 512 + 1000],
    'garbage-after-end': lambda: PLAIN_TAR + b'\x01' * 512,
}


@pytest.mark.parametrize('suffix', list(COMPRESS))
@pytest.mark.parametrize('damage', list(DAMAGED_TARS))
def test_damaged_tar_inside_a_valid_stream_is_refused(work, suffix, damage):
    # The compression layer is intact; the tar inside it is not.
    refuse(work, 'faces' + suffix, COMPRESS[suffix](DAMAGED_TARS[damage]()))


@pytest.mark.parametrize('suffix, damage', [
    ('.tar.gz', lambda d: d[:-4]),              # no length field
    ('.tar.gz', lambda d: flip(d, len(d) - 6)),  # wrong CRC
    ('.tar.gz', lambda d: flip(d, len(d) - 2)),  # wrong length
    ('.tar.gz', lambda d: flip(d, len(d) // 2)),  # corrupt deflate data
    ('.tar.gz', lambda d: d[:len(d) // 2]),
    ('.tar.bz2', lambda d: d[:-4]),
    ('.tar.bz2', lambda d: flip(d, len(d) // 2)),
    ('.tar.xz', lambda d: d[:-12]),             # no stream footer
    ('.tar.xz', lambda d: flip(d, len(d) - 20)),  # index / check
    ('.tar.xz', lambda d: flip(d, len(d) // 2)),
])
def test_damaged_compressed_stream_is_refused(work, suffix, damage):
    refuse(work, 'faces' + suffix, damage(COMPRESS[suffix](PLAIN_TAR)))


@pytest.mark.parametrize('suffix', list(COMPRESS))
def test_intact_tars_extract(work, suffix):
    archive = work / 'archives' / ('faces' + suffix)
    archive.write_bytes(COMPRESS[suffix](PLAIN_TAR))
    extract(archive, work / 'out')
    assert {k: v for k, v in tree(work / 'out').items() if v is not None} == MEMBERS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), gz=st.booleans())
def test_random_damage_is_refused_or_harmless(data, gz, tmp_path_factory):
    """One changed byte or a cut: refused with nothing left, or the exact original files.

    In a plain tar, member data has no checksum, so there we change only
    headers, end blocks and padding; gzip's CRC covers everything.
    """
    raw = gzip.compress(PLAIN_TAR, mtime=0) if gz else PLAIN_TAR
    if gz:
        places = range(len(raw))
    else:
        spans = [(h + 512, h + 512 + len(d)) for h, d in zip(HEADERS, MEMBERS.values())]
        places = [i for i in range(len(raw)) if not any(a <= i < b for a, b in spans)]
    if data.draw(st.booleans(), 'cut'):
        damaged = raw[:data.draw(st.integers(0, len(raw) - 1), 'cut at')]
    else:
        at = data.draw(st.sampled_from(places), 'changed byte')
        damaged = bytearray(raw)
        damaged[at] ^= data.draw(st.integers(1, 255), 'xor')
        damaged = bytes(damaged)
    work = tmp_path_factory.mktemp('random')
    archive = work / ('x.tar.gz' if gz else 'x.tar')
    archive.write_bytes(damaged)
    try:
        extract(archive, work / 'out')
    except ArchiveError:
        assert not (work / 'out').exists()
        return
    assert {k: v for k, v in tree(work / 'out').items() if v is not None} == MEMBERS


def test_zip_with_bad_crc_into_new_folder_leaves_nothing(work):
    data = members_zip(compression=zipfile.ZIP_STORED)
    at = data.find(MEMBERS['faces/b.txt'])
    refuse(work, 'faces.zip', flip(data, at + 10))


def test_zip_whose_directory_lost_entries_is_refused(work):
    # The first central entry's comment length grows over the two entries
    # after it: zipfile alone would list one member and extract only that.
    data = bytearray(members_zip())
    first = data.find(b'PK\x01\x02')
    second = data.find(b'PK\x01\x02', first + 1)
    end = data.find(b'PK\x05\x06')
    data[first + 32:first + 34] = (end - second).to_bytes(2, 'little')
    assert len(zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()) == 1
    assert 'lists 1 members but counts 3' in str(refuse(work, 'faces.zip', bytes(data)))


@pytest.mark.parametrize('suffix', ['.tar.bz2', '.tar.xz'])
@pytest.mark.parametrize('after', ['garbage', 'a damaged stream'])
def test_what_follows_a_bzip2_or_xz_stream_is_checked_too(work, suffix, after):
    # Python's bz2 and lzma readers stop quietly at a second stream that
    # does not start like one; gzip refuses it (see the damaged streams above).
    compress = COMPRESS[suffix]
    tail = b'\x01' * 600 if after == 'garbage' else flip(compress(b'more'), 1)
    refuse(work, 'faces' + suffix, compress(PLAIN_TAR) + tail)


@pytest.mark.parametrize('suffix', ['.tar.gz', '.tar.bz2', '.tar.xz'])
def test_a_tar_split_over_several_streams_extracts(work, suffix):
    # As parallel compressors (pigz, pbzip2, xz -T) write them.
    half = len(PLAIN_TAR) // 2
    archive = work / 'archives' / ('faces' + suffix)
    archive.write_bytes(COMPRESS[suffix](PLAIN_TAR[:half])
                        + COMPRESS[suffix](PLAIN_TAR[half:]))
    extract(archive, work / 'out')
    assert {k: v for k, v in tree(work / 'out').items() if v is not None} == MEMBERS


# ---------------------------------------------------------------- every failure is ours

def corrupt_zip(compression):
    data = members_zip(compression=compression)
    return flip(data, in_zip_data(data))


ESCAPING = {
    # zipfile raises RuntimeError for an encrypted member, NotImplementedError
    # for Deflate64 or an unknown method, zlib.error / LZMAError / OSError for
    # corrupt deflate, lzma and bzip2 data; names too long raise OSError.
    'zip-encrypted': ('x.zip', lambda: patch_zip(members_zip(), 6, 8, 1), 'encrypted'),
    'zip-deflate64': ('x.zip', lambda: patch_zip(members_zip(), 8, 10, 9), 'Deflate64'),
    'zip-unknown-method': ('x.zip', lambda: patch_zip(members_zip(), 8, 10, 77), '77'),
    'zip-corrupt-deflate': ('x.zip', lambda: corrupt_zip(zipfile.ZIP_DEFLATED), 'x.zip'),
    'zip-corrupt-lzma': ('x.zip', lambda: corrupt_zip(zipfile.ZIP_LZMA), 'x.zip'),
    'zip-corrupt-bzip2': ('x.zip', lambda: corrupt_zip(zipfile.ZIP_BZIP2), 'x.zip'),
    'zip-name-too-long': ('x.zip', lambda: members_zip({'faces/' + 'n' * 300: b'x'}), '300 bytes'),
    'zip-too-deep': ('x.zip', lambda: members_zip({'d/' * 2100 + 'f': b'x'}), 'too deep'),
    'tar-name-too-long': ('x.tar', lambda: members_tar(
        {'faces/' + 'n' * 300: b'x'}, tarfile.PAX_FORMAT), '300 bytes'),
    'tar-too-deep': ('x.tar', lambda: members_tar(
        {'d/' * 2100 + 'f': b'x'}, tarfile.PAX_FORMAT), 'too deep'),
    'zip-deep-not-long': ('x.zip', lambda: members_zip({'d/' * 1200 + 'f': b'x'}), 'too deep'),
    'xz-garbage': ('x.tar.xz', lambda: b'\xfd7zXZ\x00' + b'\x01' * 200, 'x.tar.xz'),
}


@pytest.mark.parametrize('case', list(ESCAPING))
def test_every_archive_failure_is_an_archive_error(work, case):
    name, build, cause = ESCAPING[case]
    error = refuse(work, name, build())
    assert cause in str(error)
    assert isinstance(error, DataError)


# ---------------------------------------------------------------- a hostile HTTP server

MEMBERS_ZIP = members_zip()
MEMBERS_SHA = hashlib.sha1(MEMBERS_ZIP).hexdigest()
BAD_TGZ = gzip.compress(PLAIN_TAR)[:-4]  # its own SHA-1 matches: damaged at the source
BAD_SHA = hashlib.sha1(BAD_TGZ).hexdigest()


class HostileHandler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    release = threading.Event()

    def log_message(self, *args):
        pass

    def do_GET(self):
        route = self.path.strip('/').split('/')[0]
        getattr(self, 'serve_' + route.split('.')[0].replace('-', '_'))()

    def send(self, body, length='right', close=False):
        self.send_response(200)
        if length == 'right':
            length = str(len(body))
        if length is not None:
            self.send_header('Content-Length', length)
        if close:
            self.send_header('Connection', 'close')
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def serve_faces(self):  # /faces.zip
        self.send(MEMBERS_ZIP)

    def serve_damaged(self):  # /damaged.tar.gz, with a matching hash
        self.send(BAD_TGZ)

    def serve_length_abc(self):
        self.send(MEMBERS_ZIP, 'abc', close=True)

    def serve_length_negative(self):
        self.send(MEMBERS_ZIP, '-5', close=True)

    def serve_length_two(self):
        self.send(MEMBERS_ZIP, f'{len(MEMBERS_ZIP)}, 7', close=True)

    def serve_length_digits(self):  # a Unicode superscript two: int() would refuse it
        self.send(MEMBERS_ZIP, '\u00b2', close=True)

    def serve_length_small(self):  # Content-Length below the body: the rest is lost
        self.send(MEMBERS_ZIP, str(len(MEMBERS_ZIP) // 2), close=True)

    def serve_length_huge(self):  # announces a terabyte, sends a little
        self.send(MEMBERS_ZIP[:100], str(1 << 40), close=True)

    def serve_nolength_cut(self):  # no length, connection closed mid-body
        self.send(MEMBERS_ZIP[:len(MEMBERS_ZIP) // 2], None, close=True)

    def serve_chunk_cut(self):  # a chunk announced and dropped halfway
        self.send_response(200)
        self.send_header('Transfer-Encoding', 'chunked')
        self.end_headers()
        self.wfile.write(b'%x\r\n%s' % (len(MEMBERS_ZIP), MEMBERS_ZIP[:100]))
        self.close_connection = True

    def serve_endless(self):  # a chunked body that never ends
        self.send_response(200)
        self.send_header('Transfer-Encoding', 'chunked')
        self.end_headers()
        chunk = b'%x\r\n%s\r\n' % (1 << 16, b'z' * (1 << 16))
        try:
            for _ in range(100_000):  # 6.5 GB: far beyond what any test reads
                if HostileHandler.release.is_set():
                    break
                self.wfile.write(chunk)
        except OSError:
            pass  # the client gave up: what we want
        self.close_connection = True

    def serve_stall(self):  # headers and half the body, then silence
        self.send_response(200)
        self.send_header('Content-Length', str(len(MEMBERS_ZIP)))
        self.end_headers()
        self.wfile.write(MEMBERS_ZIP[:len(MEMBERS_ZIP) // 2])
        self.wfile.flush()
        HostileHandler.release.wait(10)
        self.close_connection = True

    def serve_drip(self):  # promises a megabyte, sends ten bytes a second
        self.send_response(200)
        self.send_header('Content-Length', str(10**6))
        self.end_headers()
        try:
            for _ in range(6000):  # ten minutes: far beyond any test
                if HostileHandler.release.wait(0.1):
                    break
                self.wfile.write(b'z')
                self.wfile.flush()
        except OSError:
            pass  # the client gave up: what we want
        self.close_connection = True


@pytest.fixture(scope='module')
def hostile_server():
    yield from serve(HostileHandler)


# ---------------------------------------------------------------- downloads

@pytest.mark.parametrize('route', ['length-abc', 'length-negative', 'length-two',
                                   'length-digits', 'length-small', 'nolength-cut',
                                   'chunk-cut', 'length-huge'])
def test_lying_or_broken_servers(hostile_server, tmp_path, route):
    url = f'{hostile_server}/{route}/faces.zip'
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path, MEMBERS_SHA, timeout=5)
    assert time.monotonic() - start < 10
    assert url in str(info.value)
    assert os.listdir(tmp_path) == []


def test_endless_body_stops_at_max_bytes(hostile_server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match='more than the 1000000 bytes'):
        download(hostile_server + '/endless/x.zip', tmp_path, max_bytes=10**6, timeout=5)
    assert time.monotonic() - start < 10
    assert os.listdir(tmp_path) == []


def test_endless_body_stops_before_the_disk_is_full(hostile_server, tmp_path, monkeypatch):
    free = 4 << 20  # what the disk pretends to have left
    usage = type('usage', (), {'total': 1 << 40, 'used': 0, 'free': free})
    monkeypatch.setattr(downloads.shutil, 'disk_usage', lambda path: usage)
    with pytest.raises(DownloadError, match='more than the'):
        download(hostile_server + '/endless/x.zip', tmp_path, timeout=5)
    assert os.listdir(tmp_path) == []


class Hung(BaseException):
    """Not an Exception: the data path cannot mistake it for its own."""


# The drip's 10 bytes a second are a hundred times below this minimum rate.
DRIP_LIMITS = dict(min_rate=1000, rate_grace=1)


def test_a_dripping_server_is_dropped_below_the_minimum_rate(hostile_server,
                                                             tmp_path):
    url = hostile_server + '/drip/x.zip'
    with deadline(60), pytest.raises(
            DownloadError, match=r'x.zip: \d+ bytes in [\d.]+ s, below the '
                                 r'minimum average of 1000 bytes a second'):
        download(url, tmp_path, timeout=5, **DRIP_LIMITS)
    assert os.listdir(tmp_path) == []


def test_a_download_past_its_deadline_is_dropped(hostile_server, tmp_path):
    with deadline(60), pytest.raises(
            DownloadError, match=r'x.zip: not done after 1.5 s \(\d+ bytes'):
        download(hostile_server + '/drip/x.zip', tmp_path, timeout=5, deadline=1.5,
                 min_rate=0)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('limits', [dict(deadline=0), dict(min_rate=-1),
                                    dict(rate_grace=float('nan'))])
def test_transfer_limits_must_make_sense(tmp_path, limits):
    with pytest.raises(ValueError, match='need deadline > 0'):
        download('http://127.0.0.1:9/x.zip', tmp_path, **limits)


def test_get_facerec_dir_falls_back_when_the_server_drips(hostile_server, tmp_path,
                                                          monkeypatch):
    d2lf = pytest.importorskip('d2l_face.mxnet')
    monkeypatch.setitem(d2lf.d2l.DATA_HUB, 'faces-casia-ultrasmall',
                        (hostile_server + '/drip/faces.zip', MEMBERS_SHA))
    monkeypatch.setenv('D2L_FACE_SOURCE', 'auto')
    monkeypatch.setenv('D2L_FACE_DATA', str(tmp_path))
    monkeypatch.setattr(downloads, 'MIN_RATE', 1000, raising=False)
    monkeypatch.setattr(downloads, 'RATE_GRACE', 1, raising=False)
    monkeypatch.setattr(d2lf, 'standin_facerec_dir', lambda name: 'the stand-in')
    with deadline(60, Hung):  # before the fix: a download that never ends
        assert d2lf.get_facerec_dir('faces-casia-ultrasmall') == 'the stand-in'


def test_local_failure_is_a_download_error(hostile_server, tmp_path):
    (tmp_path / 'file').write_bytes(b'')
    with pytest.raises(DownloadError, match='file'):
        download(hostile_server + '/faces.zip', tmp_path / 'file' / 'sub', MEMBERS_SHA)


def test_damaged_download_lets_the_section_fall_back(hostile_server, tmp_path):
    # The section's `auto` source catches DownloadError: this must be one.
    url = hostile_server + '/damaged.tar.gz'
    with pytest.raises(DownloadedArchiveError) as info:
        download_extract(url, BAD_SHA, tmp_path, subdir='faces')
    error = info.value
    assert isinstance(error, DownloadError) and isinstance(error, ArchiveError)
    assert url in str(error) and 'truncated' in str(error)
    assert not (tmp_path / 'faces').exists()


def test_get_facerec_dir_falls_back_on_a_damaged_archive(hostile_server, tmp_path, monkeypatch):
    d2lf = pytest.importorskip('d2l_face.mxnet')
    monkeypatch.setitem(d2lf.d2l.DATA_HUB, 'faces-casia-ultrasmall',
                        (hostile_server + '/damaged.tar.gz', BAD_SHA))
    monkeypatch.setenv('D2L_FACE_SOURCE', 'auto')
    monkeypatch.setenv('D2L_FACE_DATA', str(tmp_path))
    monkeypatch.setattr(d2lf, 'standin_facerec_dir', lambda name: 'the stand-in')
    assert d2lf.get_facerec_dir('faces-casia-ultrasmall') == 'the stand-in'


# ---------------------------------------------------------------- temporaries

def dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_go_and_nothing_else(hostile_server, tmp_path):
    folder = tmp_path / 'data'
    folder.mkdir()
    dead, me = dead_pid(), os.getpid()
    assert publish.HOST != 'otherhost'
    stale_part = publish.temp_path(str(folder), suffix='.part', pid=dead)
    stale_dir = publish.temp_path(str(folder), suffix='.extracting', pid=dead)
    aside = publish.temp_path(str(folder), suffix='.replaced', pid=dead)
    open(stale_part, 'wb').close()
    os.makedirs(os.path.join(stale_dir, 'faces'))
    os.makedirs(os.path.join(aside, 'old-dataset'))  # set aside, never replaced
    open(os.path.join(aside, 'old-dataset', 'photo.jpg'), 'wb').close()
    keep = [publish.temp_path(str(folder), suffix='.part', pid=me),
            publish.temp_path(str(folder), suffix='.extracting', pid=me),
            str(folder / f'.d2l-face-otherhost-{dead}-{"0" * 16}.part'),
            str(folder / '.d2l-face-notes.part'), str(folder / 'faces.zip.abc123.part')]
    for path in keep:
        os.mkdir(path) if path.endswith('.extracting') else open(path, 'wb').close()
    bait = tmp_path / 'bait'
    bait.mkdir()
    (bait / 'precious').write_bytes(b'x')
    link = publish.temp_path(str(folder), suffix='.extracting', pid=dead)
    os.symlink(bait, link)

    download(hostile_server + '/faces.zip', folder, MEMBERS_SHA)

    names = set(os.listdir(folder))
    assert names == {os.path.basename(p) for p in keep + [link]} | {
        'faces.zip', 'old-dataset'}
    assert os.path.exists(folder / 'old-dataset' / 'photo.jpg')  # put back
    assert (bait / 'precious').exists()


def test_a_pid_no_kernel_hands_out_breaks_nothing(tmp_path):
    (tmp_path / f'{publish.PREFIX}{publish.HOST}-9999999999-{"1" * 16}.part').write_bytes(b'')
    save_bin_pairs(tmp_path / 'x.bin', [b'a', b'b'], [True])
    (tmp_path / 'x.zip').write_bytes(MEMBERS_ZIP)
    extract(tmp_path / 'x.zip', tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['faces', 'x.bin', 'x.zip']


@pytest.mark.parametrize('action', ['extract', 'save_bin_pairs'])
def test_extract_and_save_clean_up_too(tmp_path, action):
    folder = tmp_path / 'data'
    folder.mkdir()
    stale = publish.temp_path(str(folder), suffix='.part', pid=dead_pid())
    open(stale, 'wb').close()
    if action == 'extract':
        (tmp_path / 'x.zip').write_bytes(MEMBERS_ZIP)
        extract(tmp_path / 'x.zip', folder)
    else:
        save_bin_pairs(folder / 'x.bin', [b'a', b'b'], [True])
    assert not os.path.exists(stale)


def test_download_killed_with_sigkill_leaves_only_what_the_next_run_removes(hostile_server, tmp_path):
    child = subprocess.Popen(
        [sys.executable, '-c', 'import sys; from d2l_face import downloads; '
         'downloads.download(sys.argv[1], sys.argv[2], timeout=30)',
         hostile_server + '/stall/faces.zip', str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.monotonic() + 20
    while not any(n.endswith('.part') for n in os.listdir(tmp_path)):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert len(os.listdir(tmp_path)) == 1  # the orphan
    download(hostile_server + '/faces.zip', tmp_path, MEMBERS_SHA)
    assert os.listdir(tmp_path) == ['faces.zip']


# ---------------------------------------------------------------- glob characters

@pytest.mark.parametrize('name', ['data[1]', 'data*', 'data?'])
def test_glob_characters_in_paths(tmp_path, name):
    target, sibling = tmp_path / name, tmp_path / 'data1'
    target.mkdir()
    sibling.mkdir()
    theirs = publish.temp_path(str(sibling), suffix='.extracting', pid=dead_pid())
    os.mkdir(theirs)  # a pattern built from `target` would match this folder
    (tmp_path / 'x.zip').write_bytes(MEMBERS_ZIP)
    extract(tmp_path / 'x.zip', target)
    assert (target / 'faces' / 'c.txt').read_bytes() == b'charlie'
    assert os.path.isdir(theirs)  # only work in data1 may clean data1
    save_bin_pairs(target / 'x.bin', [b'a', b'b'], [True])
    assert load_bin_pairs(target / 'x.bin') == ([b'a', b'b'], [True])


# ---------------------------------------------------------------- umask

@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_users_umask(hostile_server, tmp_path, umask):
    path = download(hostile_server + '/faces.zip', tmp_path / 'dl', MEMBERS_SHA)
    assert mode(path) == 0o666 & ~umask
    save_bin_pairs(tmp_path / 'x.bin', [b'a', b'b'], [True])
    assert mode(tmp_path / 'x.bin') == 0o666 & ~umask
    dataset = download_extract(hostile_server + '/faces.zip', MEMBERS_SHA, tmp_path / 'ex', 'faces')
    assert mode(dataset) == 0o777 & ~umask
    assert mode(os.path.join(dataset, 'c.txt')) == 0o666 & ~umask
    assert mode(os.path.join(dataset, f'.extracted-{MEMBERS_SHA}')) == 0o666 & ~umask


def test_tar_members_get_the_users_umask_not_the_archives_modes(work, umask):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tar:
        for name, archived in [('faces/private', 0o600), ('faces/shared', 0o664),
                               ('faces/read-only', 0o444)]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = 1, archived
            tar.addfile(info, io.BytesIO(b'x'))
    (work / 'x.tar.gz').write_bytes(buf.getvalue())
    extract(work / 'x.tar.gz', work / 'out')
    for name in ('private', 'shared', 'read-only'):
        assert mode(work / 'out' / 'faces' / name) == 0o666 & ~umask
    assert mode(work / 'out' / 'faces') == 0o777 & ~umask


