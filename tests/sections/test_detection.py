"""Detecting Faces and Landmarks: MTCNN in both tabs (the `d2lf` fixture),
and the PyTorch files of the chapter: load_tensors runs no code from a file,
and save_tensors leaves the file whole or as it was."""
import io
import os
import pickle
import re
import shutil
import tarfile
import zipfile
from typing import List

import numpy as onp
import pytest
import torch
from skimage import data as skimage_data

import facenet_pytorch
from d2l_face import checks, publish

from synthetic import REPO

WEIGHTS = os.path.join(os.path.dirname(facenet_pytorch.__file__), 'data')


@pytest.fixture(scope='module')
def nets():
    """MTCNN's networks, PyTorch modules in both tabs."""
    from d2l_face import torch as d2lf_torch
    return d2lf_torch.load_mtcnn()


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


def test_astronaut_landmarks_near_hand_placed(d2lf, nets, astronaut):
    faces = d2lf.detect_faces(astronaut, nets)
    assert len(faces) == 1
    check_face(faces[0], astronaut)
    box, score, landmarks = faces[0]
    assert score > 0.99
    # Placed by hand: an independent estimate, not MTCNN's own output.
    by_hand = d2lf.ASTRONAUT_LANDMARKS
    distances = onp.linalg.norm(landmarks - by_hand, axis=1)
    eye_distance = onp.linalg.norm(by_hand[1] - by_hand[0])
    assert distances.max() < 4, distances  # a few pixels ...
    assert distances.max() < 0.1 * eye_distance  # ... on a face this size
    # The landmarks come in the template's order: image-left eye first.
    assert landmarks[0, 0] < landmarks[1, 0]
    assert landmarks[3, 0] < landmarks[4, 0]


def test_detection_is_deterministic(d2lf, nets, astronaut):
    first, second = (d2lf.detect_faces(astronaut, nets) for _ in range(2))
    for a, b in zip(first, second):
        onp.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
        onp.testing.assert_array_equal(a[2], b[2])


def test_thread_count_is_restored(d2lf, nets, astronaut):
    threads = torch.get_num_threads()
    d2lf.detect_faces(astronaut, nets)
    assert torch.get_num_threads() == threads


def test_detected_landmarks_align_like_hand_placed(d2lf, nets, astronaut):
    (_, _, landmarks), = d2lf.detect_faces(astronaut, nets)
    by_hand = d2lf.face_align(astronaut,
                              d2lf.ASTRONAUT_LANDMARKS).astype(float)
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
def test_no_face_gives_an_empty_list(d2lf, nets, image):
    assert d2lf.detect_faces(image, nets) == []


@pytest.mark.parametrize('shape', [(19, 400, 3), (400, 19, 3), (1, 1, 3)])
def test_photo_smaller_than_a_face_has_none(d2lf, nets, shape):
    # MTCNN's own code fails on these (its image pyramid is empty).
    assert d2lf.detect_faces(onp.zeros(shape, onp.uint8), nets) == []


def test_two_faces_give_two_results_best_first(d2lf, nets, astronaut):
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
def test_wrong_input_is_refused_clearly(d2lf, nets, image, message):
    with pytest.raises(ValueError, match=message):
        d2lf.detect_faces(image, nets)


@pytest.mark.parametrize('size', [0, 11, -20, 20.0, True, None])
def test_min_face_size_must_fit_pnet(d2lf, nets, astronaut, size):
    with pytest.raises(ValueError, match='min_face_size'):
        d2lf.detect_faces(astronaut, nets, min_face_size=size)


def test_weights_are_plain_state_dicts(d2lf):
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
def test_a_pickle_that_runs_code_is_refused(d2lf, tmp_path, zip_format):
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


def test_load_mtcnn_uses_the_restricted_loader(d2lf, tmp_path):
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
def test_malformed_weights_are_refused_by_name(d2lf, tmp_path, content):
    path = tmp_path / 'onet.pt'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='onet.pt'):
        d2lf.read_state_dict(path)


def test_weights_of_the_wrong_network_are_refused(d2lf, tmp_path):
    folder = tmp_path / 'weights'
    shutil.copytree(WEIGHTS, folder)
    shutil.copy(folder / 'onet.pt', folder / 'pnet.pt')
    with pytest.raises(ValueError, match='pnet.pt: not the weights of pnet'):
        d2lf.load_mtcnn(str(folder))


def test_a_fifo_is_refused_without_blocking(d2lf, tmp_path):
    path = tmp_path / 'pnet.pt'
    os.mkfifo(path)
    with pytest.raises(ValueError, match='not a regular file'):
        d2lf.read_state_dict(path)


def test_a_state_dict_reads_back_exactly(d2lf, tmp_path):
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
def test_a_photo_above_the_pixel_limit_is_refused_before_mtcnn(d2lf, 
        nets, monkeypatch, shape):
    mtcnn_must_not_run(monkeypatch)
    # A view of one pixel: the photo's size without its memory.
    huge = onp.broadcast_to(onp.zeros((1, 1, 3), onp.uint8), shape)
    with pytest.raises(ValueError, match=f'{shape[1]}x{shape[0]} pixels, '
                                         f'more than MAX_PHOTO_PIXELS'):
        d2lf.detect_faces(huge, nets)
    at_limit = onp.broadcast_to(onp.zeros((1, 1, 3), onp.uint8),
                                (5000, 5000, 3))
    assert checks.check_photo(at_limit) is at_limit


@pytest.mark.parametrize('bad', [[], (), 'abc', [1, 2]],
                         ids=['empty list', 'empty tuple', 'str', 'two'])
def test_nets_other_than_the_three_are_refused_by_name(d2lf, astronaut, bad):
    with pytest.raises(ValueError, match='three networks P-Net, R-Net and '
                                         'O-Net that load_mtcnn returns'):
        d2lf.detect_faces(astronaut, bad)


# PyTorch files: read without running code, written whole.

class MarkerWriter(torch.nn.Module):
    """Loading its TorchScript archive runs __setstate__, which writes a
    file: code from the archive, run by torch.load(weights_only=True)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> List[str]:
        return [self.marker]

    @torch.jit.export
    def __setstate__(self, state: List[str]) -> None:
        self.marker = state[0]
        # Used below, or TorchScript drops the write as dead code.
        written = torch.from_file(state[0], shared=True, size=4).fill_(1)
        self.training = bool(written.sum() < 0)


def torchscript_archive(path, marker):
    torch.jit.save(torch.jit.script(MarkerWriter(str(marker))), str(path))


@pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split('.')[:2]) >= (2, 6),
    reason='PyTorch 2.6 refuses TorchScript under weights_only=True')
def test_the_crafted_archive_runs_code_in_torch_load(tmp_path):
    # The threat is real: PyTorch 2.5's torch.load hands it to torch.jit.load.
    marker = tmp_path / 'code-ran'
    torchscript_archive(tmp_path / 'net.pt', marker)
    assert not marker.exists()
    with pytest.warns(UserWarning, match='TorchScript'):
        torch.load(tmp_path / 'net.pt', weights_only=True)
    assert marker.exists()


@pytest.mark.parametrize('load', ['load_tensors', 'read_state_dict'])
def test_a_torchscript_archive_is_refused_before_loading(d2lf, tmp_path,
                                                          load):
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'net.pt'
    torchscript_archive(path, marker)
    with pytest.raises(ValueError) as error:
        getattr(d2lf, load)(str(path))
    assert not marker.exists()  # checked first: old versions wrote it
    assert re.search(r'net\.pt: .*constants\.pkl', str(error.value))


def test_load_mtcnn_refuses_a_torchscript_archive(d2lf, tmp_path):
    folder = tmp_path / 'weights'
    shutil.copytree(WEIGHTS, folder)
    marker = tmp_path / 'code-ran'
    torchscript_archive(folder / 'onet.pt', marker)
    with pytest.raises(ValueError) as error:
        d2lf.load_mtcnn(str(folder))
    assert not marker.exists()
    assert re.search(r'onet\.pt: .*TorchScript', str(error.value))


def test_a_tar_archive_is_refused_by_name(d2lf, tmp_path):
    # PyTorch's first format; torch.load extracts it to a folder of its own.
    path = tmp_path / 'old.pt'
    with tarfile.open(path, 'w') as tar:
        info = tarfile.TarInfo('storages')
        info.size = 3
        tar.addfile(info, io.BytesIO(b'abc'))
    with pytest.raises(ValueError, match=r'old\.pt: not a file written by '
                                         r'torch\.save'):
        d2lf.load_tensors(str(path))


def test_a_zip_with_other_records_is_refused(d2lf, tmp_path):
    buffer = io.BytesIO()
    torch.save({'w': torch.ones(2)}, buffer)
    path = tmp_path / 'net.pt'
    path.write_bytes(buffer.getvalue())
    assert d2lf.load_tensors(str(path))['w'].tolist() == [1.0, 1.0]
    with zipfile.ZipFile(path, 'a') as archive:
        archive.writestr('archive/code/__torch__.py', 'print(1)')
    with pytest.raises(ValueError, match=r'net\.pt: .*code/__torch__\.py'):
        d2lf.load_tensors(str(path))


def test_nested_tensors_and_numbers_round_trip(d2lf, tmp_path):
    path = str(tmp_path / 'rank0.pt')
    saved = {'net': {'w': torch.arange(3.0)}, 'start': 7,
             'loss': torch.ones(2)}
    assert d2lf.save_tensors(saved, path) == path
    loaded = d2lf.load_tensors(path)
    assert loaded['start'] == 7 and torch.equal(loaded['net']['w'],
                                                saved['net']['w'])


def test_a_link_at_the_path_is_replaced_not_followed(d2lf, tmp_path):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'keep')
    path = tmp_path / 'net.pt'
    path.symlink_to(victim)
    d2lf.save_tensors({'w': torch.ones(1)}, str(path))
    assert victim.read_bytes() == b'keep'
    assert not path.is_symlink()
    assert torch.equal(d2lf.read_state_dict(str(path))['w'], torch.ones(1))


def test_an_error_midway_keeps_the_old_file(d2lf, tmp_path):
    path = str(tmp_path / 'net.pt')
    d2lf.save_tensors({'w': torch.ones(1)}, path)
    # The tensor is written, then pickling the lambda fails.
    with pytest.raises(Exception, match='lambda|pickle'):
        d2lf.save_tensors({'w': torch.zeros(1000), 'f': lambda: 0}, path)
    assert torch.equal(d2lf.read_state_dict(path)['w'], torch.ones(1))
    assert os.listdir(tmp_path) == ['net.pt']


def test_a_killed_writers_temporary_goes_at_the_next_save(d2lf, tmp_path):
    dead = publish.temp_path(str(tmp_path), pid=2 ** 31 + 7)  # no such pid
    open(dead, 'wb').close()
    d2lf.save_tensors({'w': torch.ones(1)}, str(tmp_path / 'net.pt'))
    assert os.listdir(tmp_path) == ['net.pt']


def test_the_notebooks_load_and_save_through_the_helpers():
    folder = os.path.join(REPO, 'chapter_face_recognition')
    direct = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            for number, line in enumerate(f, 1):
                code = line.split('#')[0]
                if re.search(r'torch\.(load|save|jit\.load)\(', code) and \
                        not re.search(r'\btorch\.(load|save)\(io\.BytesIO'
                                      r'\(data\)|torch\.save\(tensors, f\)',
                                      code):
                    direct.append(f'{name}:{number}: {line.strip()}')
    assert not direct, 'use load_tensors / save_tensors:\n' + '\n'.join(direct)
