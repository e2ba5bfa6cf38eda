"""PyTorch files of the chapter: load_tensors runs no code from a file, and
save_tensors leaves the file whole or as it was (dataset section)."""
import io
import os
import re
import shutil
import tarfile
from typing import List

import facenet_pytorch
import pytest
import torch

from synthetic import REPO
from d2l_face import mxnet as d2lf_mxnet
from d2l_face import publish
from d2l_face import torch as d2lf

WEIGHTS = os.path.join(os.path.dirname(facenet_pytorch.__file__), 'data')


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


@pytest.mark.parametrize('library, load', [
    (d2lf, 'load_tensors'), (d2lf, 'read_state_dict'),
    (d2lf_mxnet, 'read_state_dict')])
def test_a_torchscript_archive_is_refused_before_loading(tmp_path, library,
                                                          load):
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'net.pt'
    torchscript_archive(path, marker)
    with pytest.raises(ValueError) as error:
        getattr(library, load)(str(path))
    assert not marker.exists()  # checked first: old versions wrote it
    assert re.search(r'net\.pt: .*constants\.pkl', str(error.value))


def test_load_mtcnn_refuses_a_torchscript_archive(tmp_path):
    folder = tmp_path / 'weights'
    shutil.copytree(WEIGHTS, folder)
    marker = tmp_path / 'code-ran'
    torchscript_archive(folder / 'onet.pt', marker)
    with pytest.raises(ValueError) as error:
        d2lf.load_mtcnn(str(folder))
    assert not marker.exists()
    assert re.search(r'onet\.pt: .*TorchScript', str(error.value))


def test_a_tar_archive_is_refused_by_name(tmp_path):
    # PyTorch's first format; torch.load extracts it to a folder of its own.
    path = tmp_path / 'old.pt'
    with tarfile.open(path, 'w') as tar:
        info = tarfile.TarInfo('storages')
        info.size = 3
        tar.addfile(info, io.BytesIO(b'abc'))
    with pytest.raises(ValueError, match=r'old\.pt: not a file written by '
                                         r'torch\.save'):
        d2lf.load_tensors(str(path))


def test_a_zip_with_other_records_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({'w': torch.ones(2)}, buffer)
    path = tmp_path / 'net.pt'
    path.write_bytes(buffer.getvalue())
    assert d2lf.load_tensors(str(path))['w'].tolist() == [1.0, 1.0]
    import zipfile
    with zipfile.ZipFile(path, 'a') as archive:
        archive.writestr('archive/code/__torch__.py', 'print(1)')
    with pytest.raises(ValueError, match=r'net\.pt: .*code/__torch__\.py'):
        d2lf.load_tensors(str(path))


def test_nested_tensors_and_numbers_round_trip(tmp_path):
    path = str(tmp_path / 'rank0.pt')
    saved = {'net': {'w': torch.arange(3.0)}, 'start': 7,
             'loss': torch.ones(2)}
    assert d2lf.save_tensors(saved, path) == path
    loaded = d2lf.load_tensors(path)
    assert loaded['start'] == 7 and torch.equal(loaded['net']['w'],
                                                saved['net']['w'])


def test_a_link_at_the_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'keep')
    path = tmp_path / 'net.pt'
    path.symlink_to(victim)
    d2lf.save_tensors({'w': torch.ones(1)}, str(path))
    assert victim.read_bytes() == b'keep'
    assert not path.is_symlink()
    assert torch.equal(d2lf.read_state_dict(str(path))['w'], torch.ones(1))


def test_an_error_midway_keeps_the_old_file(tmp_path):
    path = str(tmp_path / 'net.pt')
    d2lf.save_tensors({'w': torch.ones(1)}, path)
    # The tensor is written, then pickling the lambda fails.
    with pytest.raises(Exception, match='lambda|pickle'):
        d2lf.save_tensors({'w': torch.zeros(1000), 'f': lambda: 0}, path)
    assert torch.equal(d2lf.read_state_dict(path)['w'], torch.ones(1))
    assert os.listdir(tmp_path) == ['net.pt']


def test_a_killed_writers_temporary_goes_at_the_next_save(tmp_path):
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
