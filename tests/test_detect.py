"""Detecting faces and landmarks with MTCNN (dataset section, last part)."""
import io
import os
import pickle
import shutil

import numpy as onp
import pytest
import torch
from skimage import data as skimage_data

import facenet_pytorch
from d2l_face import mxnet as d2lf

# The astronaut's five landmarks as the section places them by hand: an
# independent estimate to compare MTCNN's with, not MTCNN's own output.
HAND_PLACED = onp.array([[204.4, 101.9], [247.1, 103.1], [225.6, 126.9],
                         [202.5, 140.0], [245.0, 139.0]])
WEIGHTS = os.path.join(os.path.dirname(facenet_pytorch.__file__), 'data')


@pytest.fixture(scope='module')
def nets():
    return d2lf.load_mtcnn()


@pytest.fixture(scope='module')
def astronaut():
    return skimage_data.astronaut()


def check_face(face, image):
    box, score, landmarks = face
    assert box.shape == (4,) and landmarks.shape == (5, 2)
    assert box.dtype == landmarks.dtype == onp.float64
    assert isinstance(score, float) and 0 < score <= 1
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
    # Every landmark lies inside its own face's box.
    assert ((landmarks >= box[:2]) & (landmarks <= box[2:])).all()


def test_astronaut_landmarks_near_hand_placed(nets, astronaut):
    faces = d2lf.detect_faces(astronaut, nets)
    assert len(faces) == 1
    check_face(faces[0], astronaut)
    box, score, landmarks = faces[0]
    assert score > 0.99
    distances = onp.linalg.norm(landmarks - HAND_PLACED, axis=1)
    eye_distance = onp.linalg.norm(HAND_PLACED[1] - HAND_PLACED[0])
    assert distances.max() < 4, distances  # a few pixels ...
    assert distances.max() < 0.1 * eye_distance  # ... on a face this size
    # The landmarks come in the template's order: image-left eye first.
    assert landmarks[0, 0] < landmarks[1, 0]
    assert landmarks[3, 0] < landmarks[4, 0]


def test_detection_is_deterministic(nets, astronaut):
    first, second = (d2lf.detect_faces(astronaut, nets) for _ in range(2))
    for a, b in zip(first, second):
        onp.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
        onp.testing.assert_array_equal(a[2], b[2])


def test_thread_count_is_restored(nets, astronaut):
    threads = torch.get_num_threads()
    d2lf.detect_faces(astronaut, nets)
    assert torch.get_num_threads() == threads


def test_detected_landmarks_align_like_hand_placed(nets, astronaut):
    (_, _, landmarks), = d2lf.detect_faces(astronaut, nets)
    by_hand = d2lf.face_align(astronaut, HAND_PLACED).astype(float)
    detected = d2lf.face_align(astronaut, landmarks).astype(float)
    assert detected.shape == (112, 112, 3)
    # The same face, shifted by a pixel or so: far closer than to a crop of
    # another part of the photo.
    elsewhere = astronaut[300:412, 300:412].astype(float)
    assert onp.abs(detected - by_hand).mean() < \
        0.5 * onp.abs(detected - elsewhere).mean()


@pytest.mark.parametrize('image', [
    skimage_data.coffee(),
    onp.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=onp.uint8),
    onp.zeros((100, 80, 3), onp.uint8),
    onp.full((30, 500, 3), 255, onp.uint8),
], ids=['coffee', 'noise', 'black', 'white strip'])
def test_no_face_gives_an_empty_list(nets, image):
    assert d2lf.detect_faces(image, nets) == []


@pytest.mark.parametrize('shape', [(19, 400, 3), (400, 19, 3), (1, 1, 3)])
def test_photo_smaller_than_a_face_has_none(nets, shape):
    # MTCNN's own code fails on these (its image pyramid is empty).
    assert d2lf.detect_faces(onp.zeros(shape, onp.uint8), nets) == []


def test_two_faces_give_two_results_best_first(nets, astronaut):
    width = astronaut.shape[1]
    two = onp.concatenate([astronaut, astronaut[:, ::-1]], axis=1)
    faces = d2lf.detect_faces(two, nets)
    assert len(faces) == 2
    for face in faces:
        check_face(face, two)
    scores = [score for _, score, _ in faces]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.99
    # One face in each half; the mirrored one mirrors the original's place.
    left, right = sorted(faces, key=lambda face: face[0][0])
    assert left[0][2] <= width <= right[0][0]
    mirrored_nose_x = 2 * width - 1 - right[2][2, 0]
    assert abs(mirrored_nose_x - left[2][2, 0]) < 4


@pytest.mark.parametrize('image, message', [
    (onp.zeros((64, 64), onp.uint8), r'shape \(h, w, 3\), not \(64, 64\)'),
    (onp.zeros((64, 64, 4), onp.uint8), r'not \(64, 64, 4\)'),
    (onp.zeros((64, 64, 1), onp.uint8), r'not \(64, 64, 1\)'),
    (onp.zeros((0, 64, 3), onp.uint8), r'not \(0, 64, 3\)'),
    (onp.zeros((2, 64, 64, 3), onp.uint8), r'not \(2, 64, 64, 3\)'),
    (onp.zeros((64, 64, 3), onp.float32), 'uint8 photo.*not float32'),
    (onp.zeros((64, 64, 3), onp.int64), 'uint8 photo.*not int64'),
    ([[[0, 0, 0]]], 'not list'),
])
def test_wrong_input_is_refused_clearly(nets, image, message):
    with pytest.raises(ValueError, match=message):
        d2lf.detect_faces(image, nets)


@pytest.mark.parametrize('size', [0, 11, -20, 20.0, True, None])
def test_min_face_size_must_fit_pnet(nets, astronaut, size):
    with pytest.raises(ValueError, match='min_face_size'):
        d2lf.detect_faces(astronaut, nets, min_face_size=size)


def test_weights_are_plain_state_dicts():
    for name in ('pnet', 'rnet', 'onet'):
        state = d2lf.read_state_dict(os.path.join(WEIGHTS, name + '.pt'))
        assert state and all(isinstance(v, torch.Tensor)
                             for v in state.values())


class Payload:
    """Unpickling this calls os.makedirs(path): code run by loading a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_a_pickle_that_runs_code_is_refused(tmp_path, zip_format):
    marker = str(tmp_path / 'code-ran')
    path = tmp_path / 'pnet.pt'
    with open(path, 'wb') as f:
        torch.save({'conv1.weight': torch.zeros(1), 'x': Payload(marker)}, f,
                   _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match='pnet.pt.*os.makedirs'):
        d2lf.read_state_dict(path)
    assert not os.path.exists(marker)
    # Unrestricted unpickling runs it: the file is a real threat.
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


def test_load_mtcnn_uses_the_restricted_loader(tmp_path):
    folder = tmp_path / 'weights'
    shutil.copytree(WEIGHTS, folder)
    marker = str(tmp_path / 'code-ran')
    with open(folder / 'rnet.pt', 'wb') as f:
        pickle.dump({'x': Payload(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match='rnet.pt'):
        d2lf.load_mtcnn(str(folder))
    assert not os.path.exists(marker)


@pytest.mark.parametrize('content', [
    b'', b'not a pickle', pickle.dumps([1, 2, 3], protocol=2),
    pickle.dumps({'w': 1.0}, protocol=2)])
def test_malformed_weights_are_refused_by_name(tmp_path, content):
    path = tmp_path / 'onet.pt'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='onet.pt'):
        d2lf.read_state_dict(path)


def test_weights_of_the_wrong_network_are_refused(tmp_path):
    folder = tmp_path / 'weights'
    shutil.copytree(WEIGHTS, folder)
    shutil.copy(folder / 'onet.pt', folder / 'pnet.pt')
    with pytest.raises(ValueError, match='pnet.pt: not the weights of pnet'):
        d2lf.load_mtcnn(str(folder))


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / 'pnet.pt'
    os.mkfifo(path)
    with pytest.raises(ValueError, match='not a regular file'):
        d2lf.read_state_dict(path)


def test_a_state_dict_reads_back_exactly(tmp_path):
    state = {'a': torch.arange(6.0).reshape(2, 3), 'b': torch.ones(2)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = tmp_path / 'net.pt'
    path.write_bytes(buffer.getvalue())
    loaded = d2lf.read_state_dict(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def mtcnn_must_not_run(monkeypatch):
    """Make facenet-pytorch's detector fail the test if it is called."""
    from facenet_pytorch.models.utils import detect_face as module

    def ran(*args, **kwargs):
        raise AssertionError('MTCNN ran on a photo it should have refused')
    monkeypatch.setattr(module, 'detect_face', ran)


@pytest.mark.parametrize('shape', [(20000, 20000, 3), (5000, 5001, 3)])
def test_a_photo_above_the_pixel_limit_is_refused_before_mtcnn(
        nets, monkeypatch, shape):
    mtcnn_must_not_run(monkeypatch)
    # A view of one pixel: the photo's size without its memory.
    huge = onp.broadcast_to(onp.zeros((1, 1, 3), onp.uint8), shape)
    with pytest.raises(ValueError, match=f'{shape[1]}x{shape[0]} pixels, '
                                         f'more than MAX_PHOTO_PIXELS'):
        d2lf.detect_faces(huge, nets)
    at_limit = onp.broadcast_to(onp.zeros((1, 1, 3), onp.uint8),
                                (5000, 5000, 3))
    assert d2lf.check_photo(at_limit) is at_limit


@pytest.mark.parametrize('bad', [[], (), 'abc', [1, 2]],
                         ids=['empty list', 'empty tuple', 'str', 'two'])
def test_nets_other_than_the_three_are_refused_by_name(astronaut, bad):
    with pytest.raises(ValueError, match='three networks P-Net, R-Net and '
                                         'O-Net that load_mtcnn returns'):
        d2lf.detect_faces(astronaut, bad)
