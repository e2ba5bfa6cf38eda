"""Tests of the generated stand-in dataset (d2l_face/standin.py)."""
import json
import os
import pickle

import cv2
import numpy as onp
import pytest

from d2l_face import datahub, formats, standin

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
    assert datahub.load_bin_pairs(path) == (bins, issame)  # the safe loader
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


def test_unperturbed_face_sits_on_the_template():
    person = standin.draw_identity_params(onp.random.default_rng(0),
                                          geometry_scale=0)
    look = standin.draw_look(onp.random.default_rng(0), wild=True)
    assert onp.allclose(standin.face_landmarks(person, look),
                       formats.ARCFACE_TEMPLATE)


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
