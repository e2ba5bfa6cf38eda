"""Datasets and Pre-processing: what the section's saved helpers promise,
in both tabs (the `d2lf` fixture), and what damaged datasets do to them."""
import json
import os
import pickle
import shutil
import tempfile

import cv2
import numpy as onp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage import transform as skimage_transform

from d2l_face import binsets, checks, downloads, formats, standin

from synthetic import NUM_CLASSES, PER_CLASS, to_numpy

TEMPLATE = formats.ARCFACE_TEMPLATE


@pytest.fixture
def data_dir(standin_root, tmp_path):
    """A private copy of the small stand-in that a test may damage."""
    copy = tmp_path / 'faces'
    shutil.copytree(standin_root / standin.DATASET_DIR, copy)
    return copy


def test_meta_of_standin(d2lf, standin_root):
    size, num_classes = d2lf.read_facerec_meta(
        standin_root / standin.DATASET_DIR)
    assert size == (112, 112) and num_classes == NUM_CLASSES


def test_missing_property_names_the_file(d2lf, data_dir):
    os.remove(data_dir / 'property')
    with pytest.raises(FileNotFoundError, match='property'):
        d2lf.read_facerec_meta(data_dir)


@pytest.mark.parametrize('line', ['', '300,112', 'a,b,c', '300;112;112',
                                  '0,112,112', '300,112,112,1', '-1,112,112'])
def test_malformed_property_names_file_and_line(d2lf, data_dir, line):
    (data_dir / 'property').write_text(line + '\n')
    with pytest.raises(ValueError, match='property'):
        d2lf.read_facerec_meta(data_dir)


def test_fewer_folders_than_claimed(d2lf, data_dir):
    shutil.rmtree(data_dir / '00000003')
    with pytest.raises(FileNotFoundError, match='00000003'):
        d2lf.FaceDataset(data_dir)


def test_truncated_jpeg_names_the_file(d2lf, data_dir):
    path = sorted((data_dir / '00000001').glob('*.jpg'))[0]
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=path.name):
        d2lf.read_face_image(str(path))


def test_garbage_jpeg_names_the_file(d2lf, data_dir):
    path = sorted((data_dir / '00000001').glob('*.jpg'))[0]
    path.write_bytes(b'not a jpeg' * 10 + b'\xff\xd9')
    with pytest.raises(ValueError, match=path.name):
        d2lf.read_face_image(str(path))


def test_wrong_size_image_names_the_file(d2lf, data_dir):
    path = sorted((data_dir / '00000002').glob('*.jpg'))[0]
    ok, jpeg = cv2.imencode('.jpg', onp.zeros((64, 80, 3), onp.uint8))
    path.write_bytes(jpeg.tobytes())
    dataset = d2lf.FaceDataset(data_dir)
    index = [str(p) for p, _ in dataset.items].index(str(path))
    with pytest.raises(ValueError, match=f'{path.name}.*80x64'):
        dataset[index]


def test_dataset_items_are_tensors_with_labels(d2lf, data_dir):
    dataset = d2lf.FaceDataset(data_dir)
    assert len(dataset) == NUM_CLASSES * PER_CLASS
    image, label = dataset[len(dataset) - 1]
    image = to_numpy(image)
    assert image.shape == (3, 112, 112) and image.dtype == onp.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert label == NUM_CLASSES - 1


def test_random_flip_happens_and_is_only_a_flip(d2lf, data_dir):
    dataset = d2lf.FaceDataset(data_dir)
    path, _ = dataset.items[0]
    raw = d2lf.read_face_image(path).transpose(2, 0, 1) / 255
    seen = set()
    for _ in range(40):
        image = to_numpy(dataset[0][0])
        if onp.allclose(image, raw, atol=1e-6):
            seen.add('as is')
        elif onp.allclose(image, raw[:, :, ::-1], atol=1e-6):
            seen.add('flipped')
        else:
            pytest.fail('an item is neither the image nor its mirror')
    assert seen == {'as is', 'flipped'}


def seed_framework(d2lf, seed):
    """Seed the random numbers of the tab's framework (its flips)."""
    if hasattr(d2lf, 'torch'):
        d2lf.torch.manual_seed(seed)
    else:
        d2lf.mx.random.seed(seed)


def test_face_dataset_flips_about_half(d2lf, data_dir):
    dataset = d2lf.FaceDataset(data_dir)
    path, _ = dataset.items[0]
    plain = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
    seed_framework(d2lf, 0)
    flips = [onp.array_equal(to_numpy(dataset[0][0]), plain[:, :, ::-1])
             for _ in range(400)]
    assert 140 < sum(flips) < 260  # binomial(400, 1/2): 6 sigma either way


def test_face_dataset_with_torchs_data_loader(data_dir):
    import torch
    from d2l_face import torch as d2lf
    dataset = d2lf.FaceDataset(data_dir)
    assert isinstance(dataset, torch.utils.data.Dataset)
    assert len(dataset) == NUM_CLASSES * PER_CLASS
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True,
                                         drop_last=True, num_workers=2)
    images = {}
    for path, label in dataset.items:
        x = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
        images[x.tobytes()] = label
    num_batches = 0
    for X, y in loader:
        num_batches += 1
        assert X.shape == (4, 3, 112, 112) and X.dtype == torch.float32
        assert y.shape == (4,) and y.dtype == torch.int64
        for x, label in zip(X.numpy(), y.tolist()):
            key = x.tobytes()
            if key not in images:  # then it must be the mirror image
                key = onp.ascontiguousarray(x[:, :, ::-1]).tobytes()
            assert images[key] == label
    assert num_batches == len(dataset) // 4


def test_bin_round_trip(d2lf, tmp_path):
    rng = onp.random.default_rng(0)
    faces = [rng.integers(0, 256, (112, 112, 3), dtype=onp.uint8)
             for _ in range(4)]
    bins = [cv2.imencode('.jpg', f)[1].tobytes() for f in faces]
    path = str(tmp_path / 'pairs.bin')
    binsets.save_bin_pairs(path, bins, [True, False])
    images, issame = d2lf.load_bin(path)
    assert images.shape == (2, 4, 3, 112, 112)
    assert issame.tolist() == [True, False]
    for i, jpeg in enumerate(bins):
        rgb = cv2.imdecode(onp.frombuffer(jpeg, onp.uint8), 1)[:, :, ::-1]
        onp.testing.assert_array_equal(images[0, i], rgb.transpose(2, 0, 1))
        onp.testing.assert_array_equal(images[1, i],
                                       images[0, i][:, :, ::-1])


def test_bin_with_undecodable_image(d2lf, tmp_path):
    path = str(tmp_path / 'bad.bin')
    binsets.save_bin_pairs(path, [b'junk', b'junk'], [True])
    with pytest.raises(ValueError, match='image 0'):
        d2lf.load_bin(path)


def test_similarity_matches_scikit_image(d2lf):
    rng = onp.random.default_rng(1)
    for _ in range(20):
        src = rng.uniform(0, 300, (5, 2))
        dst = rng.uniform(0, 112, (5, 2))
        tform = skimage_transform.SimilarityTransform()
        tform.estimate(src, dst)
        onp.testing.assert_allclose(d2lf.estimate_similarity(src, dst),
                                    tform.params[:2], atol=1e-9)


def test_template_landmarks_give_identity_warp(d2lf):
    image = onp.random.default_rng(2).integers(0, 256, (112, 112, 3),
                                               dtype=onp.uint8)
    aligned = d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE)
    onp.testing.assert_array_equal(aligned, image)


def test_wild_landmarks_land_on_template(d2lf, standin_root):
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
def test_bad_landmarks_are_refused(d2lf, landmark, message):
    image = onp.zeros((200, 200, 3), onp.uint8)
    with pytest.raises(ValueError, match=message):
        d2lf.face_align(image, landmark)


@pytest.mark.parametrize('image', [
    None, onp.zeros((0, 0, 3), onp.uint8), [[1, 2], [3, 4]],
    onp.zeros(10, onp.uint8), onp.zeros((8, 8, 5), onp.uint8),
    onp.zeros((8, 8, 3), bool), onp.zeros((8, 8, 3), onp.int32),
    onp.zeros((8, 8, 3), onp.int64), onp.zeros((8, 8, 3), onp.float16),
    onp.zeros((8, 8), onp.complex64), onp.zeros((8, 8), object),
    onp.zeros((32767, 1), onp.uint8)], ids=str)
def test_images_opencv_cannot_warp_are_refused(d2lf, image):
    with pytest.raises(ValueError, match='image'):
        d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE)


@pytest.mark.parametrize('dtype', checks.WARP_DTYPES)
def test_every_dtype_opencv_warps_is_accepted(d2lf, dtype):
    image = onp.ones((112, 112, 3), dtype)
    aligned = d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE)
    assert aligned.dtype == image.dtype
    onp.testing.assert_array_equal(aligned, image)


@pytest.mark.parametrize('image_size', [0, -112, 2.5, 112.0, '112', None,
                                        True, 32766, 1 << 40])
def test_image_size_must_be_a_positive_integer(d2lf, image_size):
    image = onp.zeros((112, 112, 3), onp.uint8)
    with pytest.raises(ValueError, match='image_size'):
        d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE, image_size)


def test_other_crop_sizes_scale_the_template(d2lf):
    image = onp.random.default_rng(3).integers(0, 256, (224, 224, 3),
                                               dtype=onp.uint8)
    aligned = d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE * 2,
                              onp.int64(224))
    onp.testing.assert_array_equal(aligned, image)


@pytest.mark.parametrize('magnitude', [1e7, 1e160, 1e200, 1e300])
def test_landmarks_of_absurd_magnitude_are_refused(d2lf, magnitude):
    image = onp.zeros((200, 200, 3), onp.uint8)
    template = d2lf.ARCFACE_TEMPLATE.astype(onp.float64)
    # A valid face shape, scaled or moved far beyond any photo.
    for landmark in (template * (magnitude / 100), template + magnitude,
                     template - magnitude):
        with pytest.raises(ValueError, match='landmark'):
            d2lf.face_align(image, landmark)


@pytest.mark.parametrize('landmark', [
    TEMPLATE + 999_000,          # within a million, off the image
    TEMPLATE - 400,
])
def test_landmarks_far_outside_the_image_are_refused(d2lf, landmark):
    # Warping from there would crop only the black border.
    image = onp.full((200, 200, 3), 255, onp.uint8)
    with pytest.raises(ValueError, match='landmark points lie more than'):
        d2lf.face_align(image, landmark)
    # A face cut by the image border is still a face.
    assert d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE + 120).shape == \
        (112, 112, 3)


@pytest.mark.parametrize('landmark, message', [
    ([[10 ** 400, 0]] * 5, 'real numbers'),           # beyond any float
    (TEMPLATE * (1 + 1j), 'real numbers'),
    ([['1', '2']] * 5, 'real numbers'),
    (TEMPLATE * 1e-7 + 50, 'coincide'),  # a face of 4e-6 pixels
])
def test_landmarks_that_are_no_face_are_refused(d2lf, landmark, message):
    with pytest.raises(ValueError, match=message):
        d2lf.face_align(onp.zeros((200, 200, 3), onp.uint8), landmark)


def test_crops_beyond_a_face_crop_are_refused(d2lf):
    image = onp.zeros((200, 200, 3), onp.uint8)
    assert d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE, 1024).shape[0] == 1024
    with pytest.raises(ValueError, match='at most 1024'):
        d2lf.face_align(image, d2lf.ARCFACE_TEMPLATE, 1025)


def test_template_is_the_one_of_formats(d2lf):
    assert d2lf.ARCFACE_TEMPLATE is formats.ARCFACE_TEMPLATE


def make_fifo(path):
    os.mkfifo(path)
    return str(path)


def in_time(function, *args, seconds=10):
    """Call function(*args) in a thread; fail if it does not end in time."""
    import threading
    outcome = []

    def run():
        try:
            outcome.append(('value', function(*args)))
        except Exception as e:  # reported below
            outcome.append(('error', e))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f'{function.__name__} still blocks after {seconds} s'
    return outcome[0]


def test_a_fifo_named_like_an_image_is_refused(d2lf, data_dir):
    fifo = make_fifo(data_dir / '00000001' / 'zz-fifo.jpg')
    kind, error = in_time(d2lf.read_face_image, fifo)
    assert kind == 'error' and isinstance(error, ValueError)
    assert 'zz-fifo.jpg' in str(error) and 'not a regular file' in str(error)
    kind, error = in_time(d2lf.pack_face_records, str(data_dir))
    assert kind == 'error' and 'zz-fifo.jpg' in str(error)


def test_a_fifo_as_property_is_refused(d2lf, tmp_path):
    make_fifo(tmp_path / 'property')
    kind, error = in_time(d2lf.read_facerec_meta, str(tmp_path))
    assert kind == 'error' and isinstance(error, ValueError)
    assert 'property' in str(error)


def claiming(jpeg, height, width):
    """The JPEG with a frame header that claims height x width pixels."""
    at = formats_sof(jpeg)
    return (jpeg[:at + 5] + height.to_bytes(2, 'big') +
            width.to_bytes(2, 'big') + jpeg[at + 9:])


def formats_sof(jpeg):
    at = jpeg.index(b'\xff\xc0')
    assert formats.jpeg_size(jpeg) == (112, 112)
    return at


@pytest.mark.parametrize('craft, problem', [
    ('claims 20000x20000', '20000x20000'),
    # libjpeg drops FF 00 and decodes a frame hidden behind it
    ('hides a 1500x1500 frame behind FF 00', 'not a JPEG')])
def test_a_jpeg_claiming_a_huge_size_is_refused_before_decoding(
        d2lf, data_dir, tmp_path, monkeypatch, craft, problem):
    from synthetic import smuggled
    path = sorted((data_dir / '00000001').glob('*.jpg'))[0]
    path.write_bytes(claiming(path.read_bytes(), 20000, 20000)
                     if craft.startswith('claims') else smuggled((1500, 1500)))
    # Not one decode may happen: the header alone must refuse the file.
    huge, decode = path.read_bytes(), cv2.imdecode

    def imdecode(buf, flags):
        if bytes(buf) == huge:
            pytest.fail(f'decoded a file that {craft}')
        return decode(buf, flags)
    monkeypatch.setattr(d2lf.cv2, 'imdecode', imdecode)
    for image_size in (None, (112, 112)):
        with pytest.raises(ValueError, match=f'{path.name}.*{problem}'):
            d2lf.read_face_image(str(path), image_size)
    with pytest.raises(ValueError, match=f'{path.name}.*{problem}'):
        d2lf.pack_face_records(str(data_dir))
    bin_path = str(tmp_path / 'huge.bin')
    binsets.save_bin_pairs(bin_path, [path.read_bytes()] * 2, [True])
    with pytest.raises(ValueError, match=rf'huge\.bin: image 0.*{problem}'):
        d2lf.load_bin(bin_path)


def test_bin_listing_more_images_than_its_size_holds(d2lf, tmp_path,
                                                     standin_root):
    folder = standin_root / standin.DATASET_DIR / '00000000'
    jpeg = sorted(folder.glob('*.jpg'))[0].read_bytes()
    path = str(tmp_path / 'repeated.bin')
    # One bytes object listed many times: pickle stores it once. (Written
    # by hand: save_bin_pairs stores each image in full, so its files load.)
    with open(path, 'wb') as f:
        pickle.dump(([jpeg] * 20000, [True] * 10000), f, protocol=4)
    assert os.path.getsize(path) < 20000 * 100
    try:
        d2lf.load_bin(path)
    except ValueError as e:  # refused here or by load_bin_pairs
        assert 'repeated.bin' in str(e)
    else:
        pytest.fail('a small file expanded to 20000 images')
    images, _ = d2lf.load_bin(str(standin_root / standin.DATASET_DIR /
                                  'lfw_small.bin'), max_images=40)
    assert images.shape[1] == 40
    with pytest.raises(ValueError, match='lfw_small.bin: 40 images'):
        d2lf.load_bin(str(standin_root / standin.DATASET_DIR /
                          'lfw_small.bin'), max_images=39)


def test_a_dataset_under_a_folder_with_glob_characters(d2lf, standin_root,
                                                       tmp_path):
    folder = tmp_path / 'faces [v2] *?'
    shutil.copytree(standin_root / standin.DATASET_DIR, folder)
    assert len(d2lf.FaceDataset(str(folder))) == NUM_CLASSES * PER_CLASS
    assert len(d2lf.read_identity_images(str(folder), 2)) == PER_CLASS
    train_iter, _ = d2lf.load_data_facerec(str(folder), ['lfw_small'], 5)
    assert len(train_iter) == NUM_CLASSES * PER_CLASS // 5


def test_source_choice_is_validated(d2lf, monkeypatch):
    monkeypatch.setenv('D2L_FACE_SOURCE', 'cloud')
    with pytest.raises(ValueError, match='D2L_FACE_SOURCE'):
        d2lf.get_facerec_dir()


def test_standin_exists_only_for_ultrasmall(d2lf, monkeypatch):
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


def test_real_download_path(d2lf, local_server, standin_root, tmp_path,
                            monkeypatch):
    www, url = local_server
    archive = shutil.make_archive(str(www / 'faces-casia-ultrasmall'), 'zip',
                                  standin_root, standin.DATASET_DIR)
    monkeypatch.setitem(d2lf.d2l.DATA_HUB, 'faces-casia-ultrasmall',
                        (url + 'faces-casia-ultrasmall.zip',
                         downloads.sha1_file(archive)))
    monkeypatch.setenv('D2L_FACE_DATA', str(tmp_path / 'data'))
    monkeypatch.setenv('D2L_FACE_SOURCE', 'real')
    data_dir = d2lf.get_facerec_dir('faces-casia-ultrasmall')
    assert data_dir.startswith(str(tmp_path / 'data'))
    assert d2lf.read_facerec_meta(data_dir)[1] == NUM_CLASSES


def test_unreachable_real_data(d2lf, local_server, tmp_path, monkeypatch,
                               capsys):
    _, url = local_server
    monkeypatch.setitem(d2lf.d2l.DATA_HUB, 'faces-casia-ultrasmall',
                        (url + 'missing.zip', '0' * 40))
    monkeypatch.setenv('D2L_FACE_DATA', str(tmp_path / 'data'))
    monkeypatch.setattr(d2lf, 'standin_facerec_dir',
                        lambda name='faces-casia-ultrasmall': 'STANDIN')
    monkeypatch.setenv('D2L_FACE_SOURCE', 'real')
    with pytest.raises(downloads.DownloadError, match='404'):
        d2lf.get_facerec_dir()
    monkeypatch.delenv('D2L_FACE_SOURCE')
    assert d2lf.get_facerec_dir() == 'STANDIN'
    assert 'stand-in' in capsys.readouterr().out


# Property-based tests: damaged datasets end in a result or a clear error.
# Each case must either give a correct result or raise the documented error
# type with a message that names the cause; never another exception, a hang
# or an array of the wrong shape.

SETTINGS = settings(
    max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope='module')
def small_standin(tmp_path_factory):
    root = tmp_path_factory.mktemp('standin')
    return standin.generate(str(root), num_classes=4, images_per_class=3,
                            num_val_pairs=4, num_wild=0)


@pytest.fixture(scope='module')
def a_jpeg(small_standin):
    with open(os.path.join(small_standin, '00000000', os.listdir(
            os.path.join(small_standin, '00000000'))[0]), 'rb') as f:
        return f.read()


@SETTINGS
@given(line=st.text(max_size=40))
def test_any_property_line(d2lf, line, tmp_path):
    folder = tempfile.mkdtemp(dir=tmp_path)
    with open(os.path.join(folder, 'property'), 'w', encoding='utf-8',
              errors='surrogatepass') as f:
        f.write(line.replace('\r', '\n'))
    try:
        (h, w), n = d2lf.read_facerec_meta(folder)
    except ValueError as e:
        assert 'property' in str(e)
    else:
        first = line.replace('\r', '\n').split('\n')[0].strip()
        assert [n, h, w] == [int(x) for x in first.split(',')]
        assert min(n, h, w) >= 1


@SETTINGS
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_jpeg(d2lf, data, tmp_path):
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), 'face.jpg')
    with open(path, 'wb') as f:
        f.write(data)
    try:
        image = d2lf.read_face_image(path, (112, 112))
    except ValueError as e:
        assert path in str(e)
    else:
        assert image.shape == (112, 112, 3) and image.dtype == onp.uint8


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_jpeg(d2lf, cut, a_jpeg, tmp_path):
    cut = min(cut, len(a_jpeg))
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), 'face.jpg')
    with open(path, 'wb') as f:
        f.write(a_jpeg[:cut])
    if cut == len(a_jpeg):
        assert d2lf.read_face_image(path, (112, 112)).shape == (112, 112, 3)
    else:
        with pytest.raises(ValueError, match='face.jpg'):
            d2lf.read_face_image(path, (112, 112))


@SETTINGS
@given(missing=st.sets(st.integers(min_value=0, max_value=3)))
def test_missing_identity_folders(d2lf, missing, small_standin, tmp_path):
    copy = os.path.join(tempfile.mkdtemp(dir=tmp_path), 'faces')
    shutil.copytree(small_standin, copy)
    for label in missing:
        shutil.rmtree(os.path.join(copy, formats.identity_folder(label)))
    if not missing:
        assert len(d2lf.FaceDataset(copy)) == 12
    else:
        with pytest.raises(FileNotFoundError,
                           match=formats.identity_folder(min(missing))):
            d2lf.FaceDataset(copy)


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
# Any finite double, 1e160 and 1e-300 included.
any_finite = st.floats(allow_nan=False, allow_infinity=False)


@SETTINGS
@given(points=st.lists(st.tuples(any_finite, any_finite), min_size=5,
                       max_size=5))
def test_random_landmarks(d2lf, points):
    image = onp.full((64, 80, 3), 128, onp.uint8)
    try:
        aligned = d2lf.face_align(image, onp.array(points))
    except ValueError as e:
        assert 'landmark' in str(e)
    else:
        assert aligned.shape == (112, 112, 3) and aligned.dtype == onp.uint8


@SETTINGS
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True),
                       min_size=0, max_size=12))
def test_landmarks_of_any_shape_and_value(d2lf, values):
    image = onp.zeros((32, 32), onp.uint8)
    try:
        aligned = d2lf.face_align(image, onp.array(values).reshape(-1, 2)
                                  if len(values) % 2 == 0 else values)
    except ValueError as e:
        assert 'landmark' in str(e)
    else:
        assert aligned.shape == (112, 112)


@SETTINGS
@given(origin=st.tuples(finite, finite),
       direction=st.tuples(finite, finite).filter(
           lambda d: 1e-3 < abs(d[0]) + abs(d[1])),
       steps=st.lists(st.floats(min_value=-10, max_value=10), min_size=5,
                      max_size=5))
def test_collinear_landmarks_are_refused(d2lf, origin, direction, steps):
    points = [[origin[0] + t * direction[0], origin[1] + t * direction[1]]
              for t in steps]
    with pytest.raises(ValueError, match='landmark'):
        d2lf.face_align(onp.zeros((50, 50, 3), onp.uint8), points)


@SETTINGS
@given(images=st.lists(st.binary(max_size=300), min_size=2, max_size=6)
       .filter(lambda b: len(b) % 2 == 0 and all(b)))
def test_bin_with_random_images(d2lf, images, a_jpeg, tmp_path):
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), 'set.bin')
    bins = [a_jpeg] + images[1:]
    binsets.save_bin_pairs(path, bins, [True] * (len(bins) // 2))
    try:
        data, issame = d2lf.load_bin(path)
    except ValueError as e:
        assert 'set.bin' in str(e) and 'image' in str(e)
    else:
        assert data.shape == (2, len(bins), 3, 112, 112)
        assert issame.shape == (len(bins) // 2,)


@SETTINGS
@given(points=st.lists(st.tuples(finite, finite), min_size=5, max_size=5),
       exponent=st.integers(min_value=7, max_value=307))
def test_landmarks_far_beyond_any_photo(d2lf, points, exponent):
    """Shifted or scaled beyond a million pixels: refused, never a crop."""
    image = onp.full((64, 80, 3), 128, onp.uint8)
    points = onp.array(points)
    for far in (points + 10.0 ** exponent, points * 10.0 ** (exponent - 4)):
        if onp.abs(far).max() < 1e6:
            continue  # every point happened to be near 0
        with pytest.raises(ValueError, match='landmark'):
            d2lf.face_align(image, far)
