"""Tests for d2l_face.datahub against a real HTTP server on 127.0.0.1 (no internet)."""
import collections
import hashlib
import io
import os
import pickle
import random
import socket
import tarfile
import tempfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as onp
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from d2l_face import datahub
from d2l_face.datahub import (ArchiveError, BinFormatError, DownloadError,
                              UnsafeArchiveError, download, download_extract,
                              extract, load_bin_pairs, save_bin_pairs)

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


@pytest.fixture(scope='module')
def server():
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.daemon_threads = True
    Handler.release.clear()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    Handler.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


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
    assert datahub.sha1_file(path) == GOOD_SHA
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
    assert datahub.sha1_file(path) == GOOD_SHA


def test_download_without_length(server, tmp_path):
    path = download(server + '/nolength/faces.zip', tmp_path, GOOD_SHA)
    assert datahub.sha1_file(path) == GOOD_SHA


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
    monkeypatch.setattr(datahub.requests, 'get', lambda *a, **k: _ShortResponse())
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
    monkeypatch.setattr(datahub.time, 'monotonic', lambda: next(clock))
    progress = datahub._Progress('faces.zip', 10_000_000)  # start at t=0
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
    monkeypatch.setattr(datahub.shutil, 'disk_usage', lambda path: free)
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


# ---------------------------------------------------------------- .bin pairs

BINS = [b'\xff\xd8jpeg-%d' % i for i in range(6)]
ISSAME = [True, False, True]


def test_bin_round_trip(tmp_path):
    path = tmp_path / 'lfw.bin'
    save_bin_pairs(path, BINS, [onp.bool_(s) for s in ISSAME])
    bins, issame = load_bin_pairs(path)
    assert bins == BINS and issame == ISSAME
    assert all(type(s) is bool for s in issame)
    assert os.listdir(tmp_path) == ['lfw.bin']


@pytest.mark.parametrize('protocol', [2, 4])
def test_bin_with_numpy_bools(tmp_path, protocol):
    # Protocol 2 also stores bytes through _codecs.encode.
    path = tmp_path / 'onp.bin'
    path.write_bytes(pickle.dumps((BINS, [onp.bool_(s) for s in ISSAME]), protocol))
    bins, issame = load_bin_pairs(path)
    assert bins == BINS and issame == ISSAME and all(type(s) is bool for s in issame)


def test_bin_written_by_python2(tmp_path):
    # What Python 2 writes for (['ab', 'cd'], [True]) with protocol 2: SHORT_BINSTRING.
    path = tmp_path / 'py2.bin'
    path.write_bytes(b'\x80\x02]q\x00(U\x02abq\x01U\x02cdq\x02e]q\x03\x88a\x86q\x04.')
    assert load_bin_pairs(path) == ([b'ab', b'cd'], [True])


class _OpenFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_malicious_bin_runs_nothing(tmp_path):
    # Proof that the construction works: plain pickle creates the file.
    proof = tmp_path / 'proof'
    pickle.loads(pickle.dumps(([_OpenFile(str(proof)), b'x'], [True])))
    assert proof.exists()
    victim = tmp_path / 'created-by-pickle'
    path = tmp_path / 'evil.bin'
    path.write_bytes(pickle.dumps(([_OpenFile(str(victim)), b'x'], [True])))
    with pytest.raises(BinFormatError, match='refusing to load the global'):
        load_bin_pairs(path)
    assert not victim.exists()


def test_a_key_nested_too_deep_for_cpython_is_refused_before_unpickling(tmp_path):
    # A dict key of 140,000 nested tuples: hashing it overflows the C stack
    # (a segmentation fault at about 130 KB of file). A .bin has no dict.
    path = tmp_path / 'deep.bin'
    path.write_bytes(b'\x80\x04}' + b')' + b'\x85' * 140_000 + b'Ns.')
    with pytest.raises(BinFormatError, match='opcode EMPTY_DICT'):
        load_bin_pairs(path)


@pytest.mark.parametrize('pickled', [{'a': 1}, {1, 2}, frozenset([1]),
                                     bytearray(b'x')])
def test_dicts_sets_and_objects_are_refused(tmp_path, pickled):
    path = tmp_path / 'x.bin'
    path.write_bytes(pickle.dumps(([b'a', b'b'], [pickled]), protocol=5))
    with pytest.raises(BinFormatError, match='opcode'):
        load_bin_pairs(path)


def test_memo_bomb_is_refused_cheaply(tmp_path):
    # Without the pre-scan, CPython would allocate a 32 GiB memo table here.
    path = tmp_path / 'bomb.bin'
    path.write_bytes(b'\x80\x02N' + b'r' + (2 ** 31).to_bytes(4, 'little') + b'.')
    with pytest.raises(BinFormatError, match='memo index'):
        load_bin_pairs(path)


@pytest.mark.parametrize('obj, problem', [
    ((BINS, ISSAME, None), 'pair'),
    ({'bins': BINS}, 'opcode EMPTY_DICT'),
    ([s.decode('latin1') for s in BINS], 'pair'),
    (([s.decode('latin1') for s in BINS], ISSAME), 'bins.0. has type str, expected bytes'),
    ((BINS[:-1], ISSAME), '5 images for 3 pairs'),
    ((BINS, [1, 0, 1]), 'issame.0. has type int, expected bool'),
    ((BINS[:5] + [b''], ISSAME), 'bins.5. is empty'),
    (([bytearray(b) for b in BINS], ISSAME), 'bytearray'),
    (([], []), 'no pairs'),
    ((BINS, 'TFT'), 'must be lists'),
    ((BINS, onp.array(ISSAME)), 'refusing to load the global'),
])
def test_bin_wrong_structure(tmp_path, obj, problem):
    path = tmp_path / 'bad.bin'
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(BinFormatError, match=problem) as info:
        load_bin_pairs(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize('data', [
    pickle.dumps((BINS, ISSAME), 4)[:-20],
    random.Random(1).randbytes(500),
    b'',
])
def test_bin_truncated_or_garbage(tmp_path, data):
    path = tmp_path / 'bad.bin'
    path.write_bytes(data)
    with pytest.raises(BinFormatError, match='not a valid verification pickle'):
        load_bin_pairs(path)


@pytest.mark.parametrize('bins, issame', [
    (BINS, [1, 0, 1]), (BINS[:4], ISSAME), (['text'] * 6, ISSAME), (BINS, []),
])
def test_save_validates(tmp_path, bins, issame):
    with pytest.raises(BinFormatError):
        save_bin_pairs(tmp_path / 'x.bin', bins, issame)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- properties

VALID_BIN = pickle.dumps((BINS[:2], [True]), 2)


@st.composite
def bin_files(draw):
    """Random bytes, or a valid file with a few bytes changed and maybe cut short."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(VALID_BIN)
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=100, deadline=None)
@given(bin_files())
def test_random_bin_files_load_or_refuse(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'x.bin')
        with open(path, 'wb') as f:
            f.write(data)
        try:
            bins, issame = load_bin_pairs(path)
        except BinFormatError:
            event('refused')
            return
        event('loaded')
        assert len(bins) == 2 * len(issame) > 0
        assert all(type(b) is bytes and b for b in bins)
        assert all(type(s) is bool for s in issame)


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
