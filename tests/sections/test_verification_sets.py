"""Every .bin verification set of a folder at once: find_bin_sets and
evaluate_bin_sets of the training section (a `#@tab all` cell, so both
libraries hold them)."""
import importlib
import os

import cv2
import numpy as onp
import pytest

from d2l_face import binsets

IMAGE = 112


def library(name):
    lib = importlib.import_module(f'd2l_face.{name}')
    # The PyTorch tab gets the framework-free verification helpers from the
    # training section's shared cells; until those exist there, skip it.
    if not all(hasattr(lib, n) for n in ('load_bin', 'pair_scores',
                                         'verification_accuracy')):
        pytest.skip(f'd2l_face.{name} lacks the verification helpers')
    return lib


@pytest.fixture(params=['mxnet', 'torch'])
def lib(request):
    return library(request.param)


def jpeg(value):
    """A flat gray 112x112 JPEG whose pixels are all `value`."""
    ok, data = cv2.imencode('.jpg', onp.full((IMAGE, IMAGE, 3), value,
                                             onp.uint8))
    assert ok
    return data.tobytes()


def write_set(path, num_pairs=20, seed=0):
    """A .bin of pairs of flat grays, those of a same pair alike."""
    rng = onp.random.default_rng(seed)
    issame = [bool(i % 2) for i in range(num_pairs)]
    values = rng.integers(0, 240, 2 * num_pairs)
    values[1::2] = onp.where(issame, values[::2] + rng.integers(0, 16),
                             values[1::2])
    binsets.save_bin_pairs(str(path), [jpeg(v) for v in values], issame)
    return onp.array(issame)


def gray_embedding(images):
    """Unit embeddings at an angle set by each image's mean gray, plus a
    little fixed noise: alike grays give a high cosine."""
    gray = images[0].reshape(images.shape[1], -1).mean(axis=1) / 255
    noise = onp.random.default_rng(1).normal(0, 0.1, size=(len(gray), 2))
    embeddings = onp.stack([onp.cos(onp.pi * gray), onp.sin(onp.pi * gray)],
                           axis=1) + noise
    return embeddings / onp.linalg.norm(embeddings, axis=1, keepdims=True)


def test_finds_exactly_the_bin_files_in_the_papers_order(lib, tmp_path):
    for name in ('zzz', 'cplfw', 'lfw', 'agedb_30', 'aaa', 'cfp_fp'):
        write_set(tmp_path / f'{name}.bin', num_pairs=10)
    (tmp_path / 'notes.txt').write_text('not a set')
    (tmp_path / 'lfw.bin.bak').write_bytes(b'old')
    (tmp_path / 'train.rec').write_bytes(b'')
    os.mkdir(tmp_path / 'folder.bin')  # a folder is not a set
    found = lib.find_bin_sets(str(tmp_path))
    assert list(found) == ['lfw', 'cfp_fp', 'agedb_30', 'cplfw', 'aaa',
                           'zzz']
    assert found['lfw'] == os.path.join(str(tmp_path), 'lfw.bin')


def test_evaluates_every_set_and_prints_a_row_each(lib, tmp_path, capsys):
    write_set(tmp_path / 'lfw.bin', seed=1)
    write_set(tmp_path / 'other.bin', num_pairs=30, seed=2)
    (tmp_path / 'readme.md').write_text('skipped')
    seen = []

    def embed(images):
        seen.append(images.shape)
        return gray_embedding(images)

    results = lib.evaluate_bin_sets(embed, str(tmp_path))
    assert list(results) == ['lfw', 'other']
    assert seen == [(2, 40, 3, IMAGE, IMAGE), (2, 60, 3, IMAGE, IMAGE)]
    assert [results[n]['pairs'] for n in results] == [20, 30]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # the header, then one row per set
    assert lines[1].split()[:2] == ['lfw', '20']
    assert lines[2].split()[:2] == ['other', '30']
    assert f"{results['other']['acc']:.4f} ± " \
           f"{results['other']['acc_std']:.4f}" in lines[2]


def test_accuracy_and_val_equal_those_of_the_same_scores(lib, tmp_path):
    write_set(tmp_path / 'lfw.bin', num_pairs=40, seed=3)
    result = lib.evaluate_bin_sets(gray_embedding, [str(tmp_path)])['lfw']
    images, issame = lib.load_bin(str(tmp_path / 'lfw.bin'))
    scores = lib.pair_scores(gray_embedding(images))
    acc, acc_std, _ = lib.verification_accuracy(scores, issame)
    val, val_std, far = lib.val_at_far(scores, issame)
    assert (result['acc'], result['acc_std']) == (acc, acc_std)
    assert (result['val'], result['val_std'], result['far']) == \
        (val, val_std, far)
    assert acc > 0.5  # the gray levels tell the pairs apart somewhat


def test_several_folders_and_a_name_in_two(lib, tmp_path):
    first, second = tmp_path / 'a', tmp_path / 'b'
    first.mkdir()
    second.mkdir()
    write_set(first / 'lfw.bin')
    write_set(second / 'calfw.bin')
    assert list(lib.find_bin_sets([str(first), str(second)])) == \
        ['lfw', 'calfw']
    write_set(second / 'lfw.bin')
    with pytest.raises(ValueError, match='two verification sets named'):
        lib.find_bin_sets([str(first), str(second)])


def test_no_set_at_all(lib, tmp_path):
    (tmp_path / 'notes.txt').write_text('nothing to evaluate')
    with pytest.raises(FileNotFoundError, match='no .bin verification set'):
        lib.evaluate_bin_sets(gray_embedding, str(tmp_path))


@pytest.mark.parametrize('damage', ['truncated', 'not_a_pickle',
                                    'bad_jpeg', 'fifo'])
def test_a_damaged_set_is_named(lib, tmp_path, damage):
    write_set(tmp_path / 'lfw.bin')
    bad = tmp_path / 'cfp_fp.bin'
    if damage == 'truncated':
        write_set(bad)
        bad.write_bytes(bad.read_bytes()[:-100])
    elif damage == 'not_a_pickle':
        bad.write_bytes(b'\x00' * 1000)
    elif damage == 'bad_jpeg':
        binsets.save_bin_pairs(str(bad), [b'\xff\xd8 not a jpeg' * 10] * 20,
                               [True, False] * 5)
    else:
        os.mkfifo(bad)  # would block a plain open() forever
    with pytest.raises(Exception) as info:
        lib.evaluate_bin_sets(gray_embedding, str(tmp_path))
    assert str(bad) in str(info.value)


def test_embeddings_must_be_unit_and_one_per_image(lib, tmp_path):
    write_set(tmp_path / 'lfw.bin')
    path = str(tmp_path / 'lfw.bin')
    with pytest.raises(ValueError, match='unit-length') as info:
        lib.evaluate_bin_sets(lambda images: 2 * gray_embedding(images),
                              str(tmp_path))
    assert path in str(info.value)
    with pytest.raises(ValueError, match='one unit-length embedding per'):
        lib.evaluate_bin_sets(lambda images: gray_embedding(images)[:-1],
                              str(tmp_path))
    with pytest.raises(ValueError, match='unit-length'):  # NaN: all zeros
        lib.evaluate_bin_sets(lambda images: gray_embedding(images) * onp.nan,
                              str(tmp_path))
