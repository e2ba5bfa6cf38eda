"""d2l_face.publish: what d2l_face writes appears whole or not at all, and
what it did not make stays.

A file written with `writing`, files and folders moved with `move_all`,
markers, and the temporaries that killed processes leave behind.
"""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from d2l_face import publish


def test_writing_replaces_the_file_only_when_the_block_ends(tmp_path):
    path = tmp_path / 'model.pt'
    path.write_bytes(b'old')
    with publish.writing(str(path)) as f:
        f.write(b'new')
        assert path.read_bytes() == b'old'  # not yet: the block runs
    assert path.read_bytes() == b'new'
    assert os.listdir(tmp_path) == ['model.pt']


def test_an_error_midway_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'model.pt'
    path.write_bytes(b'old')
    with pytest.raises(OSError):
        with publish.writing(str(path)) as f:
            f.write(b'half')
            raise OSError(28, 'No space left on device')
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['model.pt']


def test_a_link_at_the_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'keep')
    path = tmp_path / 'model.pt'
    path.symlink_to(victim)
    with publish.writing(str(path)) as f:
        f.write(b'new')
    assert victim.read_bytes() == b'keep'
    assert not path.is_symlink() and path.read_bytes() == b'new'


def test_what_a_killed_writer_left_goes_at_the_next_write(tmp_path):
    dead = publish.temp_path(str(tmp_path), pid=2 ** 31 + 7)  # no such pid
    open(dead, 'wb').close()
    with publish.writing(str(tmp_path / 'model.pt')) as f:
        f.write(b'new')
    assert os.listdir(tmp_path) == ['model.pt']


def dead_pid():
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- temporaries

def test_whose_temporaries_go(tmp_path):
    """Ours of a dead pid, or anyone's a week old; not another namespace's."""
    week_old = time.time() - publish.STALE_AFTER - 60
    other = f'{publish.PREFIX}{publish.HOST[:-1]}x-{os.getpid()}-{"0" * 16}.part'
    impossible = f'{publish.PREFIX}{publish.HOST}-9999999999-{"1" * 16}.part'
    names = {'other namespace': other, 'old, other namespace': other[:-5] + '.old',
             'old, alive': publish.temp_name(suffix='.part'),
             'impossible pid': impossible, 'not ours, old': 'faces.part'}
    for what, name in names.items():
        (tmp_path / name).write_bytes(b'x')
        if what.startswith(('old', 'not ours')):
            os.utime(tmp_path / name, (week_old, week_old))
    publish.remove_stale(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([names['other namespace'],
                                                   names['not ours, old']])


def test_the_prefix_is_a_name_not_a_pattern(tmp_path):
    folder, sibling = tmp_path / 'data[1]', tmp_path / 'data1'
    folder.mkdir()
    sibling.mkdir()
    theirs = publish.temp_path(str(sibling), pid=dead_pid())
    open(theirs, 'wb').close()
    publish.remove_stale(str(folder))
    assert os.path.exists(theirs)  # only work in data1 may clean data1


# ---------------------------------------------------------------- move_all

def staged(tmp_path):
    """A staging folder with a new file and a new folder, and their targets."""
    stage = tmp_path / 'stage'
    (stage / 'faces').mkdir(parents=True)
    (stage / 'faces' / 'a.jpg').write_bytes(b'new face')
    (stage / 'train.rec').write_bytes(b'new rec')
    return [(str(stage / name), str(tmp_path / 'data' / name))
            for name in ('train.rec', 'faces')]


def contents(folder):
    """{relative path: bytes, or None for a folder} of everything in `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = (
                None if os.path.isdir(path) else open(path, 'rb').read())
    return out


def old_data(tmp_path):
    data = tmp_path / 'data'
    (data / 'faces').mkdir(parents=True)
    (data / 'faces' / 'old.jpg').write_bytes(b'old face')
    (data / 'train.rec').write_bytes(b'old rec')
    (data / 'notes.txt').write_bytes(b'not in the way')
    return contents(data)


def test_move_all_replaces_files_and_folders(tmp_path):
    old_data(tmp_path)
    publish.move_all(staged(tmp_path))
    assert contents(tmp_path / 'data') == {
        'faces': None, 'faces/a.jpg': b'new face', 'train.rec': b'new rec',
        'notes.txt': b'not in the way'}  # nothing set aside stays
    assert os.listdir(tmp_path / 'stage') == []


@pytest.mark.parametrize('failing', ['train.rec', 'faces'])
def test_a_failure_puts_everything_back(tmp_path, monkeypatch, failing):
    before = old_data(tmp_path)
    pairs = staged(tmp_path)
    replace = os.replace

    def fail(src, dst):
        if dst.endswith(failing):
            raise OSError(28, 'No space left on device')
        replace(src, dst)
    monkeypatch.setattr(os, 'replace', fail)
    with pytest.raises(OSError, match='No space'):
        publish.move_all(pairs)
    assert contents(tmp_path / 'data') == before
    assert sorted(os.listdir(tmp_path / 'stage')) == ['faces', 'train.rec']


def test_a_replaced_file_never_leaves_its_name(tmp_path, monkeypatch):
    old_data(tmp_path)
    replace, seen = os.replace, []

    def look(src, dst):
        seen.append((os.path.basename(dst), os.path.exists(dst)))
        replace(src, dst)
    monkeypatch.setattr(os, 'replace', look)
    publish.move_all(staged(tmp_path))
    # A file is replaced in one rename; a folder is set aside first.
    assert seen == [('train.rec', True), ('faces', False)]


def test_what_a_killed_move_set_aside_comes_back(tmp_path):
    data = tmp_path / 'data'
    dead = dead_pid()
    aside = publish.temp_path(str(data), suffix=publish.ASIDE, pid=dead)
    os.makedirs(os.path.join(aside, 'faces'))  # set aside, never replaced
    open(os.path.join(aside, 'faces', 'old.jpg'), 'wb').close()
    taken = publish.temp_path(str(data), suffix=publish.ASIDE, pid=dead)
    os.makedirs(os.path.join(taken, 'train.rec'))  # its name is taken now
    (data / 'train.rec').write_bytes(b'new rec')
    publish.remove_stale(str(data))
    assert contents(data) == {'faces': None, 'faces/old.jpg': b'',
                              'train.rec': b'new rec'}


# ---------------------------------------------------------------- markers

def test_a_marker_is_written_whole_and_read_back(tmp_path):
    path = str(tmp_path / '.made.json')
    publish.write_marker(path, {'made_by': 'd2l_face', 'n': 3})
    assert publish.read_marker(path) == {'made_by': 'd2l_face', 'n': 3}
    assert os.listdir(tmp_path) == ['.made.json']


@pytest.mark.parametrize('kind', ['missing', 'not JSON', 'a list', 'a link',
                                  'a folder', 'too big'])
def test_what_is_no_marker(tmp_path, kind):
    path = tmp_path / '.made.json'
    if kind == 'not JSON':
        path.write_text('{"made_by": ')
    elif kind == 'a list':
        path.write_text('[1, 2]')
    elif kind == 'a link':  # it could vouch for another folder
        (tmp_path / 'elsewhere.json').write_text('{"made_by": "d2l_face"}')
        path.symlink_to(tmp_path / 'elsewhere.json')
    elif kind == 'a folder':
        path.mkdir()
    elif kind == 'too big':
        path.write_text(json.dumps({'pad': 'x' * publish.MAX_MARKER_BYTES}))
    assert publish.read_marker(str(path)) is None


def test_a_fifo_named_like_a_marker_is_not_waited_on(tmp_path):
    path = tmp_path / '.made.json'
    os.mkfifo(path)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(
        publish.read_marker(str(path))), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and outcome == [None]


def test_markers_compare_as_json():
    assert publish.same_json({'a': 1, 'b': [2]}, {'b': [2], 'a': 1})
    assert not publish.same_json({'n': True}, {'n': 1})  # equal in Python
    assert not publish.same_json({'n': 1.0}, {'n': 1})


def test_the_not_ours_error_says_what_and_why():
    error = publish.ForeignError('/data/train.rec', 'no marker', 'Move it.')
    assert isinstance(error, FileExistsError)
    assert (error.path, error.reason) == ('/data/train.rec', 'no marker')
    assert str(error).startswith('/data/train.rec: no marker; ')
    assert str(error).endswith('Move it.')
