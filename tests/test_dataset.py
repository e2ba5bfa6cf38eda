"""Section 1 (Datasets and Pre-processing): what its saved helpers promise."""
import json
import os
import shutil

import cv2
import numpy as onp
import pytest
from skimage import transform as skimage_transform

from d2l_face import datahub, standin
from d2l_face import mxnet as d2lf

from conftest import NUM_CLASSES, PER_CLASS


@pytest.fixture
def data_dir(standin_root, tmp_path):
    """A private copy of the small stand-in that a test may damage."""
    copy = tmp_path / 'faces'
    shutil.copytree(standin_root / standin.DATASET_DIR, copy)
    return copy


def test_meta_of_standin(standin_root):
    size, num_classes = d2lf.read_facerec_meta(
        standin_root / standin.DATASET_DIR)
    assert size == (112, 112) and num_classes == NUM_CLASSES


def test_missing_property_names_the_file(data_dir):
    os.remove(data_dir / 'property')
    with pytest.raises(FileNotFoundError, match='property'):
        d2lf.read_facerec_meta(data_dir)


@pytest.mark.parametrize('line', ['', '300,112', 'a,b,c', '300;112;112',
                                  '0,112,112', '300,112,112,1', '-1,112,112'])
def test_malformed_property_names_file_and_line(data_dir, line):
    (data_dir / 'property').write_text(line + '\n')
    with pytest.raises(ValueError, match='property'):
        d2lf.read_facerec_meta(data_dir)


def test_fewer_folders_than_claimed(data_dir):
    shutil.rmtree(data_dir / '00000003')
    with pytest.raises(FileNotFoundError, match='00000003'):
        d2lf.FaceDataset(data_dir)


def test_truncated_jpeg_names_the_file(data_dir):
    path = sorted((data_dir / '00000001').glob('*.jpg'))[0]
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=path.name):
        d2lf.read_face_image(str(path))


def test_garbage_jpeg_names_the_file(data_dir):
    path = sorted((data_dir / '00000001').glob('*.jpg'))[0]
    path.write_bytes(b'not a jpeg' * 10 + b'\xff\xd9')
    with pytest.raises(ValueError, match=path.name):
        d2lf.read_face_image(str(path))


def test_wrong_size_image_names_the_file(data_dir):
    path = sorted((data_dir / '00000002').glob('*.jpg'))[0]
    ok, jpeg = cv2.imencode('.jpg', onp.zeros((64, 80, 3), onp.uint8))
    path.write_bytes(jpeg.tobytes())
    dataset = d2lf.FaceDataset(data_dir)
    index = [str(p) for p, _ in dataset.items].index(str(path))
    with pytest.raises(ValueError, match=f'{path.name}.*80x64'):
        dataset[index]


def test_dataset_items_are_tensors_with_labels(data_dir):
    dataset = d2lf.FaceDataset(data_dir)
    assert len(dataset) == NUM_CLASSES * PER_CLASS
    image, label = dataset[len(dataset) - 1]
    assert image.shape == (3, 112, 112) and image.dtype == onp.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert label == NUM_CLASSES - 1


def test_random_flip_happens_and_is_only_a_flip(data_dir):
    dataset = d2lf.FaceDataset(data_dir)
    path, _ = dataset.items[0]
    raw = d2lf.read_face_image(path).transpose(2, 0, 1) / 255
    seen = set()
    for _ in range(40):
        image = dataset[0][0].asnumpy()
        if onp.allclose(image, raw, atol=1e-6):
            seen.add('as is')
        elif onp.allclose(image, raw[:, :, ::-1], atol=1e-6):
            seen.add('flipped')
        else:
            pytest.fail('an item is neither the image nor its mirror')
    assert seen == {'as is', 'flipped'}


def test_loader_batches_and_verification_set(standin_root):
    data_dir = standin_root / standin.DATASET_DIR
    train_iter, val_sets = d2lf.load_data_face_rec(data_dir, ['lfw_small'], 8)
    batches = list(train_iter)
    # last_batch='discard': only full batches.
    assert len(batches) == NUM_CLASSES * PER_CLASS // 8
    labels = []
    for X, y in batches:
        assert X.shape == (8, 3, 112, 112) and y.shape == (8,)
        labels += y.asnumpy().tolist()
    assert min(labels) >= 0 and max(labels) < NUM_CLASSES
    images, issame = val_sets['lfw_small']
    assert images.shape == (2, 40, 3, 112, 112) and images.dtype == onp.uint8
    assert issame.shape == (20,) and issame.sum() == 10


def test_missing_verification_set(standin_root):
    with pytest.raises(FileNotFoundError, match='cfp_fp.bin'):
        d2lf.load_data_face_rec(standin_root / standin.DATASET_DIR,
                                ['cfp_fp'], 8)


def test_bin_round_trip(tmp_path):
    rng = onp.random.default_rng(0)
    faces = [rng.integers(0, 256, (112, 112, 3), dtype=onp.uint8)
             for _ in range(4)]
    bins = [cv2.imencode('.jpg', f)[1].tobytes() for f in faces]
    path = str(tmp_path / 'pairs.bin')
    datahub.save_bin_pairs(path, bins, [True, False])
    images, issame = d2lf.load_bin(path)
    assert images.shape == (2, 4, 3, 112, 112)
    assert issame.tolist() == [True, False]
    for i, jpeg in enumerate(bins):
        rgb = cv2.imdecode(onp.frombuffer(jpeg, onp.uint8), 1)[:, :, ::-1]
        onp.testing.assert_array_equal(images[0, i], rgb.transpose(2, 0, 1))
        onp.testing.assert_array_equal(images[1, i],
                                       images[0, i][:, :, ::-1])


def test_bin_with_undecodable_image(tmp_path):
    path = str(tmp_path / 'bad.bin')
    datahub.save_bin_pairs(path, [b'junk', b'junk'], [True])
    with pytest.raises(ValueError, match='image 0'):
        d2lf.load_bin(path)


def test_similarity_matches_scikit_image():
    rng = onp.random.default_rng(1)
    for _ in range(20):
        src = rng.uniform(0, 300, (5, 2))
        dst = rng.uniform(0, 112, (5, 2))
        tform = skimage_transform.SimilarityTransform()
        tform.estimate(src, dst)
        onp.testing.assert_allclose(d2lf.estimate_similarity(src, dst),
                                    tform.params[:2], atol=1e-9)


def test_template_landmarks_give_identity_warp():
    image = onp.random.default_rng(2).integers(0, 256, (112, 112, 3),
                                               dtype=onp.uint8)
    aligned = d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE)
    onp.testing.assert_array_equal(aligned, image)


def test_wild_landmarks_land_on_template(standin_root):
    wild = standin_root / standin.WILD_DIR
    landmarks = json.loads((wild / 'landmarks.json').read_text())
    assert len(landmarks) == 8
    for name, points in landmarks.items():
        points = onp.array(points)
        M = d2lf.estimate_similarity(points, d2lf.ARCFACE_TEMPLATE)
        mapped = points @ M[:, :2].T + M[:, 2]
        error = onp.linalg.norm(mapped - d2lf.ARCFACE_TEMPLATE, axis=1)
        assert error.mean() < 1.5, name
        scene = cv2.imread(str(wild / name))
        assert d2lf.face_align(scene, points).shape == (112, 112, 3)


@pytest.mark.parametrize('landmark, message', [
    (onp.zeros((4, 2)), 'shape'),
    (onp.zeros((5, 3)), 'shape'),
    (onp.ones((5, 2)) * 7, 'coincide'),
    (onp.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]]), 'collinear'),
    (onp.array([[0, 0], [1, 0], [2, 0], [3, 0], [9, 0]]), 'collinear'),
    (onp.full((5, 2), onp.nan), 'NaN'),
])
def test_bad_landmarks_are_refused(landmark, message):
    image = onp.zeros((200, 200, 3), onp.uint8)
    with pytest.raises(ValueError, match=message):
        d2lf.face_align(image, landmark)


@pytest.mark.parametrize('image', [None, onp.zeros((0, 0, 3), onp.uint8),
                                   [[1, 2], [3, 4]], onp.zeros(10, onp.uint8)])
def test_bad_images_are_refused(image):
    with pytest.raises(ValueError, match='image'):
        d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE)


def test_source_choice_is_validated(monkeypatch):
    monkeypatch.setenv('D2L_FACE_SOURCE', 'cloud')
    with pytest.raises(ValueError, match='D2L_FACE_SOURCE'):
        d2lf.get_facerec_dir()


def test_standin_exists_only_for_ultrasmall(monkeypatch):
    monkeypatch.setenv('D2L_FACE_SOURCE', 'standin')
    with pytest.raises(ValueError, match='faces-casia-small'):
        d2lf.get_facerec_dir('faces-casia-small')


@pytest.fixture
def local_server(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1; yield its base URL."""
    import functools
    import http.server
    import threading
    www = tmp_path / 'www'
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f'http://127.0.0.1:{server.server_address[1]}/'
    server.shutdown()
    server.server_close()


def test_real_download_path(local_server, standin_root, tmp_path,
                            monkeypatch):
    www, url = local_server
    archive = shutil.make_archive(str(www / 'faces-casia-ultrasmall'), 'zip',
                                  standin_root, standin.DATASET_DIR)
    monkeypatch.setitem(d2lf.d2l.DATA_HUB, 'faces-casia-ultrasmall',
                        (url + 'faces-casia-ultrasmall.zip',
                         datahub.sha1_file(archive)))
    monkeypatch.setenv('D2L_FACE_DATA', str(tmp_path / 'data'))
    monkeypatch.setenv('D2L_FACE_SOURCE', 'real')
    data_dir = d2lf.get_facerec_dir('faces-casia-ultrasmall')
    assert data_dir.startswith(str(tmp_path / 'data'))
    assert d2lf.read_facerec_meta(data_dir)[1] == NUM_CLASSES


def test_unreachable_real_data(local_server, tmp_path, monkeypatch, capsys):
    _, url = local_server
    monkeypatch.setitem(d2lf.d2l.DATA_HUB, 'faces-casia-ultrasmall',
                        (url + 'missing.zip', '0' * 40))
    monkeypatch.setenv('D2L_FACE_DATA', str(tmp_path / 'data'))
    monkeypatch.setattr(d2lf, 'standin_facerec_dir',
                        lambda name='faces-casia-ultrasmall': 'STANDIN')
    monkeypatch.setenv('D2L_FACE_SOURCE', 'real')
    with pytest.raises(datahub.DownloadError, match='404'):
        d2lf.get_facerec_dir()
    monkeypatch.delenv('D2L_FACE_SOURCE')
    assert d2lf.get_facerec_dir() == 'STANDIN'
    assert 'stand-in' in capsys.readouterr().out
