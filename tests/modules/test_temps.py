"""d2l_face.temps.writing: a file appears whole or not at all."""
import os

import pytest

from d2l_face import temps


def test_writing_replaces_the_file_only_when_the_block_ends(tmp_path):
    path = tmp_path / 'model.pt'
    path.write_bytes(b'old')
    with temps.writing(str(path)) as f:
        f.write(b'new')
        assert path.read_bytes() == b'old'  # not yet: the block runs
    assert path.read_bytes() == b'new'
    assert os.listdir(tmp_path) == ['model.pt']


def test_an_error_midway_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'model.pt'
    path.write_bytes(b'old')
    with pytest.raises(OSError):
        with temps.writing(str(path)) as f:
            f.write(b'half')
            raise OSError(28, 'No space left on device')
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['model.pt']


def test_a_link_at_the_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'keep')
    path = tmp_path / 'model.pt'
    path.symlink_to(victim)
    with temps.writing(str(path)) as f:
        f.write(b'new')
    assert victim.read_bytes() == b'keep'
    assert not path.is_symlink() and path.read_bytes() == b'new'


def test_what_a_killed_writer_left_goes_at_the_next_write(tmp_path):
    dead = temps.temp_path(str(tmp_path), pid=2 ** 31 + 7)  # no such pid
    open(dead, 'wb').close()
    with temps.writing(str(tmp_path / 'model.pt')) as f:
        f.write(b'new')
    assert os.listdir(tmp_path) == ['model.pt']
