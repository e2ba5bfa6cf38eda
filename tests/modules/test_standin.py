"""d2l_face.standin: the generated stand-in dataset, as it should be and
under accident and attack.

The folders, the verification pairs and the wild scenes it writes; then
that it never destroys what it did not make, never takes a damaged marker
for a complete build, never uses a path as a glob pattern, leaves no
temporary folder or orphan process behind, and writes files with the
user's umask. The faces themselves are test_faces.py's.
"""
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as onp
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2l_face import binsets, formats, publish, standin
from synthetic import REPO

SMALL = dict(num_classes=3, images_per_class=4, num_val_pairs=6, num_wild=2)
MEDIUM = dict(num_classes=6, images_per_class=5, num_val_pairs=20, num_wild=3)


@pytest.fixture(scope='session')
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp('standin')
    return str(root), standin.generate(str(root), **MEDIUM)


def decode(data):
    img = cv2.imdecode(onp.frombuffer(data, onp.uint8), cv2.IMREAD_COLOR)
    assert img is not None, 'not a decodable image'
    return img


def all_files(root):
    """{relative path: bytes} of every file under root except the locks."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith('.lock'):
                with open(path, 'rb') as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def best_threshold_accuracy(scores, issame):
    """Accuracy of the best rule "same person iff score > t"."""
    order = onp.argsort(scores)
    same = onp.asarray(issame, bool)[order]
    same_above = onp.concatenate([[same.sum()], same.sum() - onp.cumsum(same)])
    diff_below = onp.concatenate([[0], onp.cumsum(~same)])
    return float(((same_above + diff_below) / len(same)).max())


def test_format(medium):
    root, data_dir = medium
    assert data_dir == os.path.join(root, 'faces-casia-ultrasmall')
    with open(os.path.join(data_dir, 'property')) as f:
        assert formats.parse_property(f.read()) == ((112, 112), 6)
    folders = sorted(d for d in os.listdir(data_dir)
                     if os.path.isdir(os.path.join(data_dir, d)))
    assert folders == [formats.identity_folder(i) for i in range(6)]
    for folder in folders:
        names = sorted(os.listdir(os.path.join(data_dir, folder)))
        assert names == [f'{k:08d}.jpg' for k in range(5)]
        for name in names:
            with open(os.path.join(data_dir, folder, name), 'rb') as f:
                data = f.read()
            assert data[:2] == b'\xff\xd8'  # a JPEG stream
            assert decode(data).shape == (112, 112, 3)


def test_verification_bin(medium):
    _, data_dir = medium
    path = os.path.join(data_dir, 'lfw_small.bin')
    with open(path, 'rb') as f:
        bins, issame = pickle.load(f)
    assert binsets.load_bin_pairs(path) == (bins, issame)  # the safe loader
    assert isinstance(bins, list) and isinstance(issame, list)
    assert len(bins) == 2 * len(issame) == 2 * MEDIUM['num_val_pairs']
    assert all(isinstance(b, bytes) for b in bins)
    assert all(type(s) is bool for s in issame)
    assert sum(issame) == len(issame) // 2
    assert all(decode(b).shape == (112, 112, 3) for b in bins)


def test_validation_identities_are_not_training_identities(medium):
    _, data_dir = medium
    with open(os.path.join(data_dir, standin.FOLDER_MARKER)) as f:
        info = json.load(f)
    train = set(range(*info['train_identity_range']))
    val = set(range(*info['val_identity_range']))
    assert val == set(standin.validation_identities(MEDIUM['num_val_pairs']))
    assert train == set(range(MEDIUM['num_classes']))
    assert val and not val & train
    plan = standin._pair_plan(0, 600)
    assert sum(same for _, _, same in plan) == 300
    for (id_a, img_a), (id_b, img_b), same in plan:
        assert {id_a, id_b} <= set(standin.validation_identities(600))
        assert (id_a == id_b) == same and (id_a, img_a) != (id_b, img_b)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = standin.generate(str(tmp_path / 'a'), seed=1, **SMALL)
    b = standin.generate(str(tmp_path / 'b'), seed=1, **SMALL, workers=2)
    files_a, files_b = all_files(tmp_path / 'a'), all_files(tmp_path / 'b')
    assert len(files_a) > 3 * 4 and files_a == files_b
    c = standin.generate(str(tmp_path / 'c'), seed=2, **SMALL)
    with open(os.path.join(a, '00000000', '00000000.jpg'), 'rb') as f1, \
            open(os.path.join(c, '00000000', '00000000.jpg'), 'rb') as f2:
        assert f1.read() != f2.read()
    assert os.path.isdir(b)


def test_cached_then_regenerated(tmp_path):
    root = str(tmp_path)
    data_dir = standin.generate(root, **SMALL)
    image = os.path.join(data_dir, '00000000', '00000000.jpg')
    marker = os.path.join(data_dir, standin.FOLDER_MARKER)
    stamps = os.stat(image).st_mtime_ns, os.stat(marker).st_mtime_ns
    assert standin.generate(root, **SMALL) == data_dir
    assert (os.stat(image).st_mtime_ns, os.stat(marker).st_mtime_ns) == stamps
    standin.generate(root, **dict(SMALL, num_classes=4))
    with open(os.path.join(data_dir, 'property')) as f:
        assert formats.parse_property(f.read()) == ((112, 112), 4)
    assert os.path.isdir(os.path.join(data_dir, '00000003'))
    inode = os.stat(image).st_ino
    standin.generate(root, **dict(SMALL, num_classes=4), force=True)
    assert os.stat(image).st_ino != inode or \
        os.stat(image).st_mtime_ns != stamps[0]


def test_interrupted_run_is_not_taken_for_complete(tmp_path, monkeypatch):
    root = str(tmp_path)
    standin.generate(root, **SMALL)

    def crash(out, params, workers):
        os.makedirs(os.path.join(out, '00000000'))
        raise KeyboardInterrupt

    monkeypatch.setattr(standin, '_build_dataset', crash)
    with pytest.raises(KeyboardInterrupt):
        standin.generate(root, **dict(SMALL, num_classes=2))
    assert not [d for d in os.listdir(root) if d.startswith('.standin-tmp')]
    # The previous complete copy is still there and still counts as one.
    assert standin._is_complete(root, 'dataset', dict(
        format_version=standin.FORMAT_VERSION, seed=0, num_classes=3,
        images_per_class=4, num_val_pairs=6))
    assert not standin._is_complete(root, 'dataset', dict(
        format_version=standin.FORMAT_VERSION, seed=0, num_classes=2,
        images_per_class=4, num_val_pairs=6))
    monkeypatch.undo()
    data_dir = standin.generate(root, **dict(SMALL, num_classes=2))
    with open(os.path.join(data_dir, 'property')) as f:
        assert formats.parse_property(f.read()) == ((112, 112), 2)
    assert not os.path.exists(os.path.join(data_dir, '00000002'))


def umeyama(src, dst):
    """Least-squares similarity (A, t) with dst ~ src @ A.T + t."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = onp.linalg.svd(d.T @ s)
    flip = onp.diag([1.0, onp.sign(onp.linalg.det(u @ vt))])
    A = u @ flip @ vt * (onp.trace(onp.diag(sig) @ flip) / (s ** 2).sum())
    return A, mu_d - A @ mu_s


def test_wild_landmarks(medium):
    root, _ = medium
    wild = os.path.join(root, 'wild')
    with open(os.path.join(wild, 'landmarks.json')) as f:
        landmarks = json.load(f)
    assert sorted(landmarks) == [f'wild_{i:03d}.jpg' for i in range(3)]
    for name, points in landmarks.items():
        img = cv2.imread(os.path.join(wild, name))
        h, w = img.shape[:2]
        points = onp.array(points)
        assert points.shape == (5, 2) and w > 112 and h > 112
        assert (points >= 0).all() and (points[:, 0] < w).all() \
            and (points[:, 1] < h).all()
        assert points[0, 0] < points[1, 0] or abs(points[0, 1] - points[1, 1]) > 0
        A, t = umeyama(points, formats.ARCFACE_TEMPLATE)
        error = onp.linalg.norm(points @ A.T + t - formats.ARCFACE_TEMPLATE,
                               axis=1)
        assert error.mean() < 1.5, (name, error)


def test_raw_pixels_do_not_solve_verification():
    bins, issame = standin.make_verification_pairs(seed=0, num_pairs=600)
    assert len(issame) == 600 and sum(issame) == 300
    x = onp.stack([decode(b).ravel() for b in bins]).astype(onp.float64)
    a, b = x[0::2], x[1::2]
    cosine = (a * b).sum(1) / onp.linalg.norm(a, axis=1) / onp.linalg.norm(b, axis=1)
    accuracy = best_threshold_accuracy(cosine, issame)
    print(f'raw-pixel cosine verification accuracy: {accuracy:.4f}')
    assert accuracy <= 0.75


def test_identity_survives_the_nuisances():
    """Nearest class mean on color-normalized thumbnails beats chance 5x."""
    def feature(identity, k):
        img = decode(standin.image_bytes(0, identity, k))
        x = cv2.resize(img, (28, 28), interpolation=cv2.INTER_AREA)
        x = x.astype(onp.float32)
        return ((x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-3)).ravel()

    n_id, n_train, n_test = 20, 8, 4
    f = onp.array([[feature(i, k) for k in range(n_train + n_test)]
                  for i in range(n_id)])
    centers = f[:, :n_train].mean(1)
    test = f[:, n_train:].reshape(n_id * n_test, -1)
    dist = ((test[:, None] - centers[None]) ** 2).sum(-1)
    accuracy = (dist.argmin(1) == onp.repeat(onp.arange(n_id), n_test)).mean()
    print(f'nearest-class-mean accuracy over {n_id} identities: {accuracy:.3f}')
    assert accuracy >= 5 / n_id


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_classes=0), 'num_classes'),
    (dict(images_per_class=0), 'images_per_class'),
    (dict(num_val_pairs=7), 'num_val_pairs'),
    (dict(num_val_pairs=0), 'num_val_pairs'),
    (dict(num_wild=-1), 'num_wild'),
    (dict(seed=-1), 'seed'),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        standin.generate(str(tmp_path), **kwargs)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('flag, function', [
    ([], 'generate'), (['--wild-only'], 'generate_wild')])
def test_command_line(monkeypatch, capsys, flag, function):
    calls = []
    monkeypatch.setattr(standin, function,
                        lambda root, **kw: calls.append((root, kw)) or 'DIR')
    standin.main(['--root', 'somewhere', '--seed', '3', '--force', *flag])
    assert calls == [('somewhere', {'seed': 3, 'force': True})]
    assert capsys.readouterr().out.strip() == 'DIR'


# === Under accident and attack ============================================

TINY = dict(num_classes=2, images_per_class=2, num_val_pairs=2, num_wild=1)
DATASET_PARAMS = dict(format_version=standin.FORMAT_VERSION, seed=0,
                      num_classes=2, images_per_class=2, num_val_pairs=2)


def tree(path):
    """{relative path: bytes or None for a folder} of everything under path."""
    out = {}
    for folder, dirs, names in os.walk(path):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), path)] = None
        for name in names:
            full = os.path.join(folder, name)
            with open(full, 'rb') as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def temporary_folders(root):
    return [n for n in os.listdir(root) if n.startswith('.standin-tmp-')]


def dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()  # reaped, so no process has this pid any more
    return proc.pid


def tmp_name(pid, host=None):
    return f'.standin-tmp-{host or publish.HOST}-{pid}-{"ab" * 8}'


# --- generate_wild ---------------------------------------------------------

def test_wild_alone_makes_only_the_wild_folder(tmp_path):
    root = tmp_path / 'wild_only'
    start = time.time()
    wild = standin.generate_wild(str(root), seed=0, num_wild=2)
    assert time.time() - start < 30  # seconds, not the minute of the dataset
    assert wild == str(root / 'wild')
    assert not (root / 'faces-casia-ultrasmall').exists()
    full = tmp_path / 'full'
    standin.generate(str(full), **dict(TINY, num_wild=2))
    assert tree(root / 'wild') == tree(full / 'wild')  # the same scenes
    # Cached: a second call rewrites nothing.
    stamp = os.stat(root / 'wild' / standin.FOLDER_MARKER).st_mtime_ns
    standin.generate_wild(str(root), seed=0, num_wild=2)
    assert os.stat(root / 'wild' / standin.FOLDER_MARKER).st_mtime_ns == stamp
    standin.generate_wild(str(root), seed=0, num_wild=3)
    assert len(json.loads((root / 'wild' / 'landmarks.json').read_text())) == 3


def test_wild_alone_leaves_a_real_dataset_alone(tmp_path):
    real = tmp_path / 'faces-casia-ultrasmall'
    (real / '00000000').mkdir(parents=True)
    (real / 'property').write_text('10572,112,112\n')
    (real / '00000000' / '1.jpg').write_bytes(b'a real photo')
    before = tree(real)
    standin.generate_wild(str(tmp_path), num_wild=1)
    assert tree(real) == before
    with pytest.raises(publish.ForeignError, match=str(real)):
        standin.generate(str(tmp_path), **TINY)
    assert tree(real) == before


# --- Never destroy what the stand-in did not make --------------------------

def make_foreign(path, how, kind):
    """Put something the stand-in did not make at `path`."""
    if how == 'file':
        path.write_bytes(b'my notes')
    elif how == 'link':
        target = path.parent / 'elsewhere'
        target.mkdir()
        (target / 'keep.txt').write_text('mine')
        path.symlink_to(target)
    else:
        path.mkdir()
        (path / 'keep.txt').write_text('mine')
        if how == 'other kind':  # the stand-in's marker, of the other folder
            how = json.dumps({'made_by': standin.MADE_BY, 'params': {},
                              'kind': 'wild' if kind == 'dataset'
                              else 'dataset'})
        if isinstance(how, bytes):
            (path / standin.FOLDER_MARKER).write_bytes(how)
        elif how != 'plain folder':
            (path / standin.FOLDER_MARKER).write_text(how)


BAD_MARKERS = [
    '[1, 2]', '"made"', '42', 'null', '{}', '{"made_by": "someone else"}',
    json.dumps({'made_by': standin.MADE_BY, 'kind': 'dataset',
                'params': [1]}),
    json.dumps({'made_by': standin.MADE_BY, 'kind': 'wild',
                'params': 'all'}),
    json.dumps({'made_by': standin.MADE_BY, 'params': {}}),  # no kind
    'other kind', '{"made_by": ', '[' * 100000, b'\xff\xfe{"made_by"',
]


@pytest.mark.parametrize('name, kind', [
    ('faces-casia-ultrasmall', 'dataset'), ('wild', 'wild')])
@pytest.mark.parametrize('how', ['plain folder', 'file', 'link', *BAD_MARKERS],
                         ids=lambda how: repr(how)[:24])
def test_foreign_folders_are_refused_and_kept(tmp_path, name, kind, how):
    make_foreign(tmp_path / name, how, kind)
    before = tree(tmp_path)
    with pytest.raises(publish.ForeignError) as info:
        standin.generate(str(tmp_path), **TINY)
    assert info.value.path == str(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)
    # Refused before any work: nothing changed, nothing added.
    assert tree(tmp_path) == before
    assert os.path.islink(tmp_path / name) == (how == 'link')


def test_command_line_refuses_with_a_message(tmp_path):
    (tmp_path / 'wild').mkdir()
    (tmp_path / 'wild' / 'holiday.jpg').write_bytes(b'not the stand-in')
    result = subprocess.run(
        [sys.executable, '-m', 'd2l_face.standin', '--root', str(tmp_path),
         '--wild-only'], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode != 0
    assert str(tmp_path / 'wild') in result.stderr
    assert 'Traceback' not in result.stderr
    assert (tmp_path / 'wild' / 'holiday.jpg').read_bytes() == \
        b'not the stand-in'


def test_own_and_empty_folders_are_replaced(tmp_path):
    (tmp_path / 'wild').mkdir()  # empty: nothing to lose
    data_dir = standin.generate(str(tmp_path), **TINY)
    (tmp_path / 'faces-casia-ultrasmall' / 'stray.txt').write_text('x')
    standin.generate(str(tmp_path), **dict(TINY, num_classes=3))
    assert os.path.isdir(os.path.join(data_dir, '00000002'))
    assert not os.path.exists(os.path.join(data_dir, 'stray.txt'))


def make_format_1(root):
    """A root as format 1 left it: one marker in the root, none inside."""
    standin.generate(str(root), **TINY)
    for name in ('faces-casia-ultrasmall', 'wild'):
        os.remove(root / name / standin.FOLDER_MARKER)
    (root / standin.LEGACY_MARKER).write_text(json.dumps(
        {'params': dict(DATASET_PARAMS, format_version=1, num_wild=1),
         'train_identities': [0, 1]}))


def test_format_1_folders_are_the_stand_ins(tmp_path):
    make_format_1(tmp_path)
    standin.generate_wild(str(tmp_path), num_wild=1)
    # The dataset folder still relies on the old marker: it stays.
    assert (tmp_path / standin.LEGACY_MARKER).exists()
    standin.generate(str(tmp_path), **TINY)
    assert not (tmp_path / standin.LEGACY_MARKER).exists()
    assert standin._is_complete(str(tmp_path), 'dataset', DATASET_PARAMS)


@pytest.mark.parametrize('legacy', ['[]', '{"params": {"format_version": 1}}',
                                    '{"params": {"format_version": true}, '
                                    '"train_identities": []}'])
def test_a_damaged_format_1_marker_vouches_for_nothing(tmp_path, legacy):
    make_format_1(tmp_path)
    (tmp_path / standin.LEGACY_MARKER).write_text(legacy)
    with pytest.raises(publish.ForeignError):
        standin.generate(str(tmp_path), **TINY)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=20), inner, max_size=6),
    max_leaves=20)
EXPECTED = standin._expected_marker('dataset', DATASET_PARAMS)
marker_like = st.fixed_dictionaries(
    {}, optional={'made_by': st.just(standin.MADE_BY) | st.text(),
                  'kind': st.sampled_from(['dataset', 'wild']) | json_values,
                  'params': st.fixed_dictionaries(
                      {k: st.just(v) | json_values
                       for k, v in DATASET_PARAMS.items()}) | json_values,
                  **{k: st.just(v) | json_values for k, v in EXPECTED.items()
                     if k.endswith('_range')},
                  'extra': json_values})


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(marker=json_values | marker_like)
def test_no_marker_shape_crashes_or_passes_for_another(tmp_path, marker):
    folder = tmp_path / 'faces-casia-ultrasmall'
    folder.mkdir(exist_ok=True)
    (folder / standin.FOLDER_MARKER).write_text(json.dumps(marker))
    complete = standin._is_complete(str(tmp_path), 'dataset', DATASET_PARAMS)
    # Complete only for exactly the marker the stand-in writes, every key
    # and the same JSON types included.
    assert complete == (json.dumps(marker, sort_keys=True)
                        == json.dumps(EXPECTED, sort_keys=True))


def test_a_marker_linked_from_another_root_proves_nothing(tmp_path):
    built = standin.generate(str(tmp_path / 'built'), **TINY)
    folder = tmp_path / 'other' / 'faces-casia-ultrasmall'
    folder.mkdir(parents=True)
    os.symlink(os.path.join(built, standin.FOLDER_MARKER),
               folder / standin.FOLDER_MARKER)
    assert not standin._is_complete(str(tmp_path / 'other'), 'dataset',
                                    DATASET_PARAMS)
    # Not ours either: the folder holds a link, and it stays.
    with pytest.raises(publish.ForeignError):
        standin.generate(str(tmp_path / 'other'), **TINY)
    assert os.listdir(folder) == [standin.FOLDER_MARKER]


def test_a_fifo_or_folder_as_marker_does_not_block(tmp_path):
    folder = tmp_path / 'wild'
    folder.mkdir()
    os.mkfifo(folder / standin.FOLDER_MARKER)
    (folder / 'x.jpg').write_bytes(b'x')
    with pytest.raises(publish.ForeignError):
        standin.generate_wild(str(tmp_path), num_wild=1)
    os.remove(folder / standin.FOLDER_MARKER)
    os.mkdir(folder / standin.FOLDER_MARKER)
    with pytest.raises(publish.ForeignError):
        standin.generate_wild(str(tmp_path), num_wild=1)


# --- Paths are never patterns; stale temporary folders ---------------------

def test_glob_characters_in_the_root(tmp_path):
    root, sibling = tmp_path / 'std[1]', tmp_path / 'std1'
    dead = dead_pid()
    for folder in (root, sibling):
        (folder / tmp_name(dead)).mkdir(parents=True)
        (folder / tmp_name(dead) / 'half.jpg').write_bytes(b'x')
    live = [tmp_name(1), tmp_name(dead, host='otherhost'),
            '.standin-tmp-by-hand']
    for name in live:
        (root / name).mkdir()
    sibling_before = tree(sibling)
    data_dir = standin.generate(str(root), **TINY)
    assert tree(sibling) == sibling_before  # the sibling is untouched
    # Only the dead process's folder in the root itself went.
    assert sorted(temporary_folders(root)) == sorted(live)
    assert sorted(os.listdir(os.path.join(data_dir, '00000001'))) == \
        ['00000000.jpg', '00000001.jpg']


def test_stale_folders_go_even_when_all_is_built(tmp_path):
    standin.generate(str(tmp_path), **TINY)
    stale = tmp_path / tmp_name(dead_pid())
    (stale / 'faces-casia-ultrasmall').mkdir(parents=True)
    standin.generate(str(tmp_path), **TINY)  # cached, and it tidies up
    assert not stale.exists()


def test_a_folder_a_killed_run_set_aside_comes_back(tmp_path):
    dataset = standin.generate(str(tmp_path), **TINY)
    built = os.stat(dataset).st_ino
    aside = publish.temp_path(str(tmp_path), suffix=publish.ASIDE,
                              pid=dead_pid())
    os.mkdir(aside)  # killed between setting the old one aside and the new
    os.rename(dataset, os.path.join(aside, standin.DATASET_DIR))
    standin.generate(str(tmp_path), **TINY)
    assert os.stat(dataset).st_ino == built  # put back, not built again
    assert not os.path.exists(aside)


def test_a_full_disk_still_cleans_up(tmp_path, monkeypatch):
    data_dir = standin.generate(str(tmp_path), **TINY)
    before = tree(tmp_path / 'faces-casia-ultrasmall')
    calls = []

    def full_disk(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(*args)

    real = standin.image_bytes
    monkeypatch.setattr(standin, 'image_bytes', full_disk)
    with pytest.raises(OSError, match='No space'):
        standin.generate(str(tmp_path), **dict(TINY, num_classes=3),
                         workers=1)
    assert not temporary_folders(tmp_path)
    assert tree(data_dir) == before  # the previous build is intact


def test_a_full_disk_in_a_worker_still_cleans_up(tmp_path):
    # Files beyond 500 bytes fail with EFBIG (Python ignores SIGXFSZ), in
    # the worker processes too, which inherit the limit.
    script = textwrap.dedent(f'''
        import errno, resource, sys
        from d2l_face import standin
        if __name__ == '__main__':
            resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500))
            try:
                standin.generate({str(tmp_path)!r}, num_classes=4,
                                 images_per_class=2, num_val_pairs=2,
                                 num_wild=0, workers=2)
            except OSError as e:
                sys.exit(0 if e.errno == errno.EFBIG else 3)
            sys.exit(4)
        ''')
    result = subprocess.run([sys.executable, '-c', script], timeout=240,
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr
    assert not temporary_folders(tmp_path)
    assert not (tmp_path / 'faces-casia-ultrasmall').exists()


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        standin.generate(str(tmp_path / 'root'), **TINY)
    finally:
        os.umask(old)
    for folder, dirs, names in os.walk(tmp_path / 'root'):
        for name in dirs:
            mode = os.stat(os.path.join(folder, name)).st_mode & 0o777
            assert mode == 0o750, (name, oct(mode))
        for name in names:
            mode = os.stat(os.path.join(folder, name)).st_mode & 0o777
            assert mode == 0o640, (name, oct(mode))


# --- No orphan workers -----------------------------------------------------

def workers_of(proc):
    return [p for p in proc.children(recursive=True)
            if 'spawn_main' in ' '.join(p.cmdline())]


@pytest.mark.parametrize('sig, pdeathsig', [
    (signal.SIGKILL, True), (signal.SIGTERM, True), (signal.SIGKILL, False)],
    ids=['kill', 'term', 'kill-portable'])
def test_workers_end_with_their_parent(tmp_path, sig, pdeathsig):
    script = textwrap.dedent(f'''
        from d2l_face import standin
        if __name__ == '__main__':
            standin._USE_PDEATHSIG = {pdeathsig}
            standin.generate({str(tmp_path)!r}, num_classes=300,
                             images_per_class=50, workers=2)
        ''')
    parent = subprocess.Popen([sys.executable, '-c', script],
                              env=dict(os.environ, PYTHONPATH=REPO),
                              stderr=subprocess.DEVNULL)
    children = []
    try:
        proc = psutil.Process(parent.pid)
        deadline = time.time() + 120
        while len(workers_of(proc)) < 2 and time.time() < deadline:
            assert parent.poll() is None, 'the generation ended early'
            time.sleep(0.2)
        children = proc.children(recursive=True)
        assert len(workers_of(proc)) == 2
        time.sleep(1)  # let them start rendering
        parent.send_signal(sig)
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f'orphans: {alive}'
        # The next run removes the folder the killed parent left.
        assert temporary_folders(tmp_path)
        standin.generate_wild(str(tmp_path), num_wild=0)
        assert not temporary_folders(tmp_path)
        assert not (tmp_path / 'faces-casia-ultrasmall').exists()
    finally:
        for p in [parent, *children]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        parent.wait(timeout=30)
        psutil.wait_procs(children, timeout=10)


def test_is_standin_tells_its_own_dataset_from_others(standin_root, tmp_path):
    ours = os.path.join(str(standin_root), standin.DATASET_DIR)
    assert standin.is_standin(ours)
    assert not standin.is_standin(str(standin_root))
    assert not standin.is_standin(str(tmp_path / 'missing'))
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / standin.FOLDER_MARKER).write_text('[1, 2]')
    assert not standin.is_standin(str(foreign))
