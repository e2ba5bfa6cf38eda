"""Section 1's packed loader: the same batches as the per-file one, faster.

`pack_face_records` + `FaceRecordIter` (behind `load_data_face_rec`) must give
what `FaceDataset` + `DataLoader` give: RGB float32 x/255 in (3, h, w), each
image flipped with probability 1/2, a new order each epoch, full batches only.
"""
import collections
import os
import shutil
import struct

import cv2
import numpy as onp
import pytest

from d2l_face import standin
from d2l_face import mxnet as d2lf

from conftest import NUM_CLASSES, PER_CLASS
MAGIC = struct.pack('<I', 0xced7230a)


@pytest.fixture
def data_dir(standin_root, tmp_path):
    """A private copy of the small stand-in (without any pack)."""
    copy = tmp_path / 'faces'
    shutil.copytree(standin_root / standin.DATASET_DIR, copy,
                    ignore=shutil.ignore_patterns('train.*'))
    return str(copy)


def per_file_images(data_dir):
    """{image bytes: label} of x/255 as FaceDataset reads them, unflipped."""
    images = {}
    for path, label in d2lf.list_facerec_images(data_dir):
        x = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
        images[x.astype(onp.float32).tobytes()] = label
    return images


def epoch(train_iter):
    return [(X.asnumpy(), y.asnumpy()) for X, y in train_iter]


def test_one_epoch_holds_the_same_images_and_labels(data_dir):
    expected = per_file_images(data_dir)
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 5)
    seen = collections.Counter()
    for X, y in epoch(train_iter):
        assert X.shape == (5, 3, 112, 112) and X.dtype == onp.float32
        assert y.dtype == onp.int64
        for x, label in zip(X, y):
            key = x.tobytes()
            if key not in expected:  # then it must be the mirror image
                key = onp.ascontiguousarray(x[:, :, ::-1]).tobytes()
            assert key in expected, 'neither an image nor its mirror'
            assert expected[key] == label
            seen[key] += 1
    # Exactly x / 255 in float32 (bytes equal), each image exactly once.
    assert seen == collections.Counter(expected.keys())


def test_flips_happen_both_ways_and_only_as_flips(data_dir):
    expected = per_file_images(data_dir)
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 10)
    outcomes = collections.Counter()
    for _ in range(4):
        for X, _ in epoch(train_iter):
            for x in X:
                assert 0 <= x.min() and x.max() <= 1
                flipped = x.tobytes() not in expected
                outcomes['flipped' if flipped else 'as is'] += 1
    assert outcomes['as is'] > 10 and outcomes['flipped'] > 10


def test_no_shuffle_no_flip_is_the_per_file_order(data_dir):
    items = d2lf.list_facerec_images(data_dir)
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 4,
                                     shuffle=False, flip=False)
    batches = list(train_iter)  # all held at once: none may be overwritten
    assert len(batches) == len(items) // 4
    for b, (X, y) in enumerate(batches):
        for j in range(4):
            path, label = items[4 * b + j]
            x = d2lf.read_face_image(path).transpose(2, 0, 1)
            onp.testing.assert_array_equal(X[j].asnumpy(),
                                           x / onp.float32(255))
            assert int(y[j]) == label


def test_shuffling_differs_between_epochs(data_dir):
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 6,
                                     flip=False)
    orders = [tuple(x.tobytes() for X, _ in epoch(train_iter) for x in X)
              for _ in range(3)]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])
    assert len(set(orders)) == 3


def test_incomplete_last_batch_is_dropped(data_dir):
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 8)
    assert len(train_iter) == NUM_CLASSES * PER_CLASS // 8 == 3
    assert [X.shape[0] for X, _ in train_iter] == [8, 8, 8]
    big = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 31)
    assert len(big) == 0 and list(big) == []


def test_batch_memory_is_reused_only_when_free(data_dir):
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 5)
    for _ in range(5):
        for X, y in train_iter:
            X.wait_to_read()
    # Dropped batches give their memory back: a few arrays serve all epochs.
    assert len(train_iter._buffers) <= 3
    kept = [X for X, _ in train_iter]
    copies = [X.asnumpy() for X in kept]
    list(train_iter)  # another epoch must not write into the kept batches
    for X, x in zip(kept, copies):
        onp.testing.assert_array_equal(X.asnumpy(), x)


def test_stopping_early_then_running_again(data_dir):
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 5)
    for i, (X, y) in enumerate(train_iter):
        if i == 1:
            break
    assert len(epoch(train_iter)) == 6


def test_load_data_face_rec_uses_the_pack(data_dir):
    train_iter, _ = d2lf.load_data_face_rec(data_dir, [], 8)
    assert isinstance(train_iter, d2lf.FaceRecordIter)
    assert os.path.isfile(os.path.join(data_dir, 'train.rec'))
    assert os.path.isfile(os.path.join(data_dir, 'train.idx'))
    assert not [n for n in os.listdir(data_dir) if 'tmp' in n]


def rec_mtime(data_dir):
    return os.stat(os.path.join(data_dir, 'train.rec')).st_mtime_ns


def test_fresh_pack_is_reused(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    built = rec_mtime(data_dir)
    assert d2lf.pack_face_records(data_dir) == prefix
    assert rec_mtime(data_dir) == built


def test_pack_is_rebuilt_when_an_image_changes(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    built = rec_mtime(data_dir)
    path, label = d2lf.list_facerec_images(data_dir)[7]
    new = onp.full((112, 112, 3), (10, 200, 30), onp.uint8)
    cv2.imwrite(path, new)
    os.utime(path, ns=(built + 10**9, built + 10**9))
    d2lf.pack_face_records(data_dir)
    assert rec_mtime(data_dir) > built
    train_iter = d2lf.FaceRecordIter(prefix, 1, shuffle=False, flip=False)
    X, y = list(train_iter)[7]
    expected = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
    onp.testing.assert_array_equal(X[0].asnumpy(), expected)
    assert int(y[0]) == label


@pytest.mark.parametrize('change', ['add image', 'remove image', 'property'])
def test_pack_is_rebuilt_when_the_dataset_changes(data_dir, change):
    d2lf.pack_face_records(data_dir)
    built = rec_mtime(data_dir)
    later = (built + 10**9, built + 10**9)
    folder = os.path.join(data_dir, '00000002')
    if change == 'add image':
        source = os.path.join(folder, sorted(os.listdir(folder))[0])
        shutil.copy(source, os.path.join(folder, 'extra.jpg'))
        os.utime(folder, ns=later)
    elif change == 'remove image':
        os.remove(os.path.join(folder, sorted(os.listdir(folder))[0]))
        os.utime(folder, ns=later)
    else:
        os.utime(os.path.join(data_dir, 'property'), ns=later)
    d2lf.pack_face_records(data_dir)
    assert rec_mtime(data_dir) > built
    items = d2lf.list_facerec_images(data_dir)
    train_iter = d2lf.FaceRecordIter(os.path.join(data_dir, 'train'), 1)
    assert len(train_iter) == len(items)


def test_pack_with_missing_index_is_rebuilt(data_dir):
    d2lf.pack_face_records(data_dir)
    os.remove(os.path.join(data_dir, 'train.idx'))
    prefix = d2lf.pack_face_records(data_dir)
    assert len(d2lf.FaceRecordIter(prefix, 1)) == NUM_CLASSES * PER_CLASS


def test_packing_names_a_bad_image_and_leaves_no_pack(data_dir):
    path = d2lf.list_facerec_images(data_dir)[11][0]
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:200])
    with pytest.raises(ValueError, match=os.path.basename(path)):
        d2lf.pack_face_records(data_dir)
    assert not [n for n in os.listdir(data_dir) if n.startswith('train')]


def record_offsets(prefix):
    with open(prefix + '.idx') as f:
        return [int(line.split('\t')[1]) for line in f]


def test_damaged_record_is_named(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    offset = record_offsets(prefix)[3]
    with open(prefix + '.rec', 'r+b') as f:
        f.seek(offset)
        f.write(b'\0\0\0\0')
    with pytest.raises(ValueError, match=r'train\.rec: record 3 .*damaged'):
        d2lf.FaceRecordIter(prefix, 4)


def test_truncated_pack_is_named(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    last = record_offsets(prefix)[-1]
    with open(prefix + '.rec', 'r+b') as f:
        f.truncate(last + 40)
    last_record = NUM_CLASSES * PER_CLASS - 1
    with pytest.raises(ValueError,
                       match=f'record {last_record} .*ends inside it'):
        d2lf.FaceRecordIter(prefix, 4)


def test_damaged_index_is_named(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    with open(prefix + '.idx', 'a') as f:
        f.write('garbage\n')
    with pytest.raises(ValueError, match=r'train\.idx: damaged index'):
        d2lf.FaceRecordIter(prefix, 4)


@pytest.mark.parametrize('label, jpeg, message', [
    (3, b'', 'too short'), (-1, b'\xff\xd8\xff\xd9', 'bad header'),
    (2.5, b'\xff\xd8\xff\xd9', 'bad header')])
def test_bad_record_contents_are_named(tmp_path, label, jpeg, message):
    import mxnet as mx
    prefix = str(tmp_path / 'odd')
    writer = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec',
                                           'w')
    writer.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, 1, 0, 0),
                                         b'\xff\xd8\xff\xd9'))
    writer.write_idx(1, mx.recordio.pack(mx.recordio.IRHeader(0, label, 1, 0),
                                         jpeg))
    writer.close()
    with pytest.raises(ValueError, match=f'record 1 .*{message}'):
        d2lf.FaceRecordIter(prefix, 1)


def test_bad_batch_size():
    with pytest.raises(ValueError, match='batch_size'):
        d2lf.FaceRecordIter('nowhere', 0)


def test_undecodable_image_in_a_record_is_named(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    offset = record_offsets(prefix)[5]
    with open(prefix + '.rec', 'r+b') as f:
        f.seek(offset + 8 + 24)  # the JPEG after the record and image headers
        f.write(b'\0' * 64)
    train_iter = d2lf.FaceRecordIter(prefix, 6)
    with pytest.raises(ValueError, match=r'record 5 cannot be decoded'):
        list(train_iter)
    with pytest.raises(ValueError, match=r'record 5 cannot be decoded'):
        list(train_iter)  # the next epoch fails the same way, no hang


def test_record_split_around_the_magic_number(data_dir):
    """MXNet splits a record whose data holds the magic number; we rejoin."""
    path, _ = d2lf.list_facerec_images(data_dir)[0]
    with open(path, 'rb') as f:
        jpeg = f.read()
    # A JPEG comment segment (FF FE, length) right after the SOI marker,
    # placed so that the magic number lands on a 4-byte boundary of the
    # record data (which starts with the 24-byte image header).
    comment = b'\0\0' + MAGIC + b'!' * 6
    patched = (jpeg[:2] + b'\xff\xfe' + struct.pack('>H', len(comment) + 2) +
               comment + jpeg[2:])
    assert (24 + patched.index(MAGIC)) % 4 == 0
    with open(path, 'wb') as f:
        f.write(patched)
    prefix = d2lf.pack_face_records(data_dir)
    with open(prefix + '.rec', 'rb') as f:
        f.seek(record_offsets(prefix)[0] + 4)
        kind = struct.unpack('<I', f.read(4))[0] >> 29
    assert kind == 1  # the first part of a split record
    train_iter = d2lf.FaceRecordIter(prefix, 5, shuffle=False, flip=False)
    X, y = next(iter(train_iter))
    expected = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
    onp.testing.assert_array_equal(X[0].asnumpy(), expected)
    assert int(y[0]) == 0
