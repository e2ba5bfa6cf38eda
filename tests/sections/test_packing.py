"""Packing Face Datasets: the same batches as the per-file loader, faster.

`pack_face_records` + `FaceRecordIter` (behind `load_data_facerec`) must give
what `FaceDataset` + `DataLoader` give: RGB float32 x/255 in (3, h, w), each
image flipped with probability 1/2, a new order each epoch, full batches only.
The byte-level format is `d2l_face.recordio`'s (tested in test_recordio.py);
here we test what the section builds on it, in both tabs (the `d2lf`
fixture).
"""
import collections
import os
import shutil
import struct

import cv2
import numpy as onp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2l_face import packs, publish, recordio, standin

from synthetic import (HANG, NUM_CLASSES, PER_CLASS, deadline, packless_copy,
                       to_numpy)
MAGIC = struct.pack('<I', recordio.MAGIC)


def temporaries(folder):
    """The names in `folder` that d2l_face.publish made."""
    return [n for n in os.listdir(folder) if publish.parse(n) is not None]


@pytest.fixture
def data_dir(standin_root, tmp_path):
    return packless_copy(standin_root, tmp_path)


def per_file_images(d2lf, data_dir):
    """{image bytes: label} of x/255 as FaceDataset reads them, unflipped."""
    images = {}
    for path, label in d2lf.list_facerec_images(data_dir):
        x = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
        images[x.astype(onp.float32).tobytes()] = label
    return images


def epoch(train_iter):
    return [(to_numpy(X), to_numpy(y)) for X, y in train_iter]


def test_one_epoch_holds_the_same_images_and_labels(d2lf, data_dir):
    expected = per_file_images(d2lf, data_dir)
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


def test_flips_happen_both_ways_and_only_as_flips(d2lf, data_dir):
    expected = per_file_images(d2lf, data_dir)
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 10)
    outcomes = collections.Counter()
    for _ in range(4):
        for X, _ in epoch(train_iter):
            for x in X:
                assert 0 <= x.min() and x.max() <= 1
                flipped = x.tobytes() not in expected
                outcomes['flipped' if flipped else 'as is'] += 1
    assert outcomes['as is'] > 10 and outcomes['flipped'] > 10


def test_no_shuffle_no_flip_is_the_per_file_order(d2lf, data_dir):
    items = d2lf.list_facerec_images(data_dir)
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 4,
                                     shuffle=False, flip=False)
    batches = list(train_iter)  # all held at once: none may be overwritten
    assert len(batches) == len(items) // 4
    for b, (X, y) in enumerate(batches):
        for j in range(4):
            path, label = items[4 * b + j]
            x = d2lf.read_face_image(path).transpose(2, 0, 1)
            onp.testing.assert_array_equal(to_numpy(X[j]),
                                           x / onp.float32(255))
            assert int(y[j]) == label


def test_shuffling_differs_between_epochs(d2lf, data_dir):
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 6,
                                     flip=False)
    orders = [tuple(x.tobytes() for X, _ in epoch(train_iter) for x in X)
              for _ in range(3)]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])
    assert len(set(orders)) == 3


def test_incomplete_last_batch_is_dropped(d2lf, data_dir):
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 8)
    assert len(train_iter) == NUM_CLASSES * PER_CLASS // 8 == 3
    assert [X.shape[0] for X, _ in train_iter] == [8, 8, 8]
    big = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 31)
    assert len(big) == 0 and list(big) == []


def test_batch_memory_is_reused_only_when_free(d2lf, data_dir):
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 5)
    for _ in range(5):
        for X, y in train_iter:
            to_numpy(X)  # MXNet computes lazily: wait for the batch
    # Dropped batches give their memory back: a few arrays serve all epochs.
    assert len(train_iter._buffers) <= 3
    kept = [X for X, _ in train_iter]
    copies = [to_numpy(X) for X in kept]
    list(train_iter)  # another epoch must not write into the kept batches
    for X, x in zip(kept, copies):
        onp.testing.assert_array_equal(to_numpy(X), x)


def test_stopping_early_then_running_again(d2lf, data_dir):
    train_iter = d2lf.FaceRecordIter(d2lf.pack_face_records(data_dir), 5)
    for i, (X, y) in enumerate(train_iter):
        if i == 1:
            break
    assert len(epoch(train_iter)) == 6


def test_iterator_carries_crop_size_and_class_count(d2lf, data_dir):
    train_iter, _ = d2lf.load_data_facerec(data_dir, [], 8)
    assert train_iter.num_classes == NUM_CLASSES
    assert train_iter.image_size == (112, 112)
    # Without property, the pack tells: its labels and its first JPEG.
    alone = d2lf.FaceRecordIter(os.path.join(data_dir, 'train'), 8)
    assert alone.num_classes == NUM_CLASSES and alone.image_size == (112, 112)


def test_property_is_read_once_per_load(d2lf, data_dir, monkeypatch):
    calls = []
    read = d2lf.read_facerec_meta
    monkeypatch.setattr(d2lf, 'read_facerec_meta',
                        lambda *args: calls.append(args) or read(*args))
    d2lf.load_data_facerec(data_dir, ['lfw_small'], 8)
    assert len(calls) == 1


def test_labels_beyond_the_class_count_are_refused(d2lf, data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    with pytest.raises(ValueError, match=rf'train\.rec: 3 classes claimed, '
                                         rf'but the pack holds {NUM_CLASSES} '
                                         rf'\(labels up to {NUM_CLASSES - 1}'):
        d2lf.FaceRecordIter(prefix, 4, num_classes=3)


@pytest.mark.parametrize('num_classes', [NUM_CLASSES + 1, 2_000_000])
def test_more_classes_than_the_labels_are_refused(d2lf, data_dir, num_classes):
    prefix = d2lf.pack_face_records(data_dir)
    with pytest.raises(ValueError, match=rf'{num_classes} classes claimed, '
                                         rf'but the pack holds {NUM_CLASSES}'):
        d2lf.FaceRecordIter(prefix, 4, num_classes=num_classes)


@pytest.mark.parametrize('num_classes', [0, -1, 2.5, True, 40_000_000])
def test_class_counts_outside_the_limit_are_refused(d2lf, data_dir,
                                                    num_classes):
    prefix = d2lf.pack_face_records(data_dir)
    with pytest.raises(ValueError, match=r'class count must be an integer in '
                                         r'1\.\.2500000 \(MAX_CLASSES\)'):
        d2lf.FaceRecordIter(prefix, 4, num_classes=num_classes)


def test_load_data_facerec_uses_the_pack(d2lf, data_dir):
    train_iter, _ = d2lf.load_data_facerec(data_dir, [], 8)
    assert isinstance(train_iter, d2lf.FaceRecordIter)
    assert train_iter.pack.layout == 'flat'
    for name in ('train.rec', 'train.idx', 'train.d2l-pack.json'):
        assert os.path.isfile(os.path.join(data_dir, name))
    assert not temporaries(data_dir)


def test_bad_batch_size(d2lf):
    for batch_size in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match='batch_size'):
            d2lf.FaceRecordIter('nowhere', batch_size)


def record_offsets(prefix):
    return [offset for _, offset in recordio.read_index(prefix + '.idx')]


def test_damaged_record_is_named(d2lf, data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    offset = record_offsets(prefix)[3]
    with open(prefix + '.rec', 'r+b') as f:
        f.seek(offset)
        f.write(b'\0\0\0\0')
    with pytest.raises(recordio.PackError,
                       match=rf'train\.rec: record 3 at byte {offset}'):
        d2lf.FaceRecordIter(prefix, 4)


def test_damaged_index_is_named_and_not_to_be_deleted(d2lf, data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    with open(prefix + '.idx', 'a') as f:
        f.write('garbage\n')
    with pytest.raises(recordio.PackError, match=r'train\.idx') as error:
        d2lf.FaceRecordIter(prefix, 4)
    assert 'delete' not in str(error.value)


def first_sof_offset(jpeg):
    """Where the JPEG's frame header (SOF0) starts."""
    return jpeg.index(b'\xff\xc0')


def test_undecodable_image_in_a_record_is_named(d2lf, data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    with recordio.PackReader(prefix) as pack:
        jpeg = pack.jpeg(5).tobytes()
    offset = record_offsets(prefix)[5]
    with open(prefix + '.rec', 'r+b') as f:
        data = f.read()
        # Everything past the frame header, which the reader checks at
        # open, up to the end marker: no Huffman tables, no scan to decode.
        start = data.index(jpeg, offset) + jpeg.index(b'\xff\xc4')
        f.seek(start)
        f.write(b'\0' * (len(jpeg) - 2 - jpeg.index(b'\xff\xc4')))
    train_iter = d2lf.FaceRecordIter(prefix, 6, shuffle=False)
    with pytest.raises(ValueError, match=r'train\.rec: image 5 cannot be '
                                         r'decoded'):
        list(train_iter)
    with pytest.raises(ValueError, match=r'image 5 cannot be decoded'):
        list(train_iter)  # the next epoch fails the same way, no hang


def test_record_split_around_the_magic_number(d2lf, data_dir):
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
    onp.testing.assert_array_equal(to_numpy(X[0]), expected)
    assert int(y[0]) == 0


# Packs are fresh only when complete and current; others' packs are only read.

def rec_inode(data_dir):
    return os.stat(os.path.join(data_dir, 'train.rec')).st_ino


def test_fresh_pack_is_reused(d2lf, data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    built = rec_inode(data_dir)
    assert d2lf.pack_face_records(data_dir) == prefix
    assert rec_inode(data_dir) == built


def test_pack_is_rebuilt_when_an_image_changes(d2lf, data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    built = rec_inode(data_dir)
    path, label = d2lf.list_facerec_images(data_dir)[7]
    cv2.imwrite(path, onp.full((112, 112, 3), (10, 200, 30), onp.uint8))
    d2lf.pack_face_records(data_dir)
    assert rec_inode(data_dir) != built
    train_iter = d2lf.FaceRecordIter(prefix, 1, shuffle=False, flip=False)
    X, y = list(train_iter)[7]
    expected = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
    onp.testing.assert_array_equal(to_numpy(X[0]), expected)
    assert int(y[0]) == label


@pytest.mark.parametrize('change', ['add image', 'remove image', 'property'])
def test_pack_is_rebuilt_when_the_dataset_changes(d2lf, data_dir, change):
    d2lf.pack_face_records(data_dir)
    built = rec_inode(data_dir)
    folder = os.path.join(data_dir, '00000002')
    if change == 'add image':
        source = os.path.join(folder, sorted(os.listdir(folder))[0])
        shutil.copy(source, os.path.join(folder, 'extra.jpg'))
    elif change == 'remove image':
        os.remove(os.path.join(folder, sorted(os.listdir(folder))[0]))
    else:  # one identity fewer
        with open(os.path.join(data_dir, 'property'), 'w') as f:
            f.write(f'{NUM_CLASSES - 1},112,112\n')
    d2lf.pack_face_records(data_dir)
    assert rec_inode(data_dir) != built
    items = d2lf.list_facerec_images(data_dir)
    train_iter = d2lf.FaceRecordIter(os.path.join(data_dir, 'train'), 1)
    assert len(train_iter) == len(items)


@pytest.mark.parametrize('damage', ['no .idx', 'no .rec', 'neither'])
def test_incomplete_own_pack_is_rebuilt(d2lf, data_dir, damage):
    prefix = d2lf.pack_face_records(data_dir)
    for ext in ('.rec', '.idx'):
        if damage in ('no ' + ext, 'neither'):
            os.remove(prefix + ext)
    d2lf.pack_face_records(data_dir)
    assert len(d2lf.FaceRecordIter(prefix, 1)) == NUM_CLASSES * PER_CLASS


@pytest.mark.parametrize('change', ['shorter .rec', 'longer .idx',
                                    'a link', 'a folder'])
def test_own_pack_changed_since_is_not_ours_any_more(d2lf, data_dir, tmp_path,
                                                     change, capsys):
    prefix = d2lf.pack_face_records(data_dir)
    if change == 'shorter .rec':
        with open(prefix + '.rec', 'r+b') as f:
            f.truncate(1000)
    elif change == 'longer .idx':
        with open(prefix + '.idx', 'ab') as f:
            f.write(b'999\t0\n')
    else:
        os.rename(prefix + '.rec', tmp_path / 'elsewhere.rec')
        if change == 'a link':
            os.symlink(tmp_path / 'elsewhere.rec', prefix + '.rec')
        else:
            os.mkdir(prefix + '.rec')
    before = tree(data_dir)
    with pytest.raises(publish.ForeignError,
                       match='not made by d2l_face') as error:
        d2lf.pack_face_records(data_dir)
    assert str(error.value).startswith(prefix + '.rec/.idx: ')
    if change.endswith(('.rec', '.idx')):  # the sizes are named
        ext = change[-4:]
        assert f'{prefix}{ext} holds {os.path.getsize(prefix + ext)} bytes' \
            in str(error.value)
    assert 'delete' not in str(error.value).lower()
    if change == 'a link':  # read as it is: the pack the link points to
        train_iter, _ = d2lf.load_data_facerec(data_dir, [], 4)
        assert len(train_iter) == NUM_CLASSES * PER_CLASS // 4
    else:  # read as it is: damaged, refused by name
        with pytest.raises(recordio.PackError, match=r'train\.(rec|idx)'):
            d2lf.load_data_facerec(data_dir, [], 4)
    assert 'NOTICE' in capsys.readouterr().out
    assert tree(data_dir) == before  # nothing replaced, nothing removed


def tree(folder):
    """{name: bytes, or the link's target} of the files in `folder`."""
    out = {}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.islink(path):
            out[name] = os.readlink(path)
        elif os.path.isfile(path):
            with open(path, 'rb') as f:
                out[name] = f.read()
        else:
            out[name] = sorted(os.listdir(path))
    return out


def marker_variants(good):
    """Markers of the wrong shape, type or value, derived from a good one."""
    yield 'not JSON', '{"format": '
    yield 'a list', '[1, 2]'
    yield 'building', '{"packing": true}'
    for key in good:
        yield f'without {key}', {k: v for k, v in good.items() if k != key}
    yield 'extra key', dict(good, extra=1)
    yield 'bool count', dict(good, num_records=True)
    yield 'float count', dict(good, num_records=float(good['num_records']))
    yield 'string count', dict(good, num_records=str(good['num_records']))
    yield 'other count', dict(good, num_records=good['num_records'] - 1)
    yield 'other version', dict(good, version=good['version'] + 1)
    yield 'other sources', dict(good, sources='0' * 40)
    yield 'other size', dict(good, rec_bytes=good['rec_bytes'] + 4)
    # What a packer that was killed while renaming leaves: ours, not fresh.
    yield 'a claim', {'format': good['format'], 'version': good['version'],
                      'packing': True, 'rec_bytes': [None, good['rec_bytes']],
                      'idx_bytes': [good['idx_bytes'], 7]}


# Markers that cannot vouch for the files as they are: their packs are not
# ours to replace any more. The other variants are ours, but never fresh.
FOREIGN_MARKERS = {'not JSON', 'a list', 'building', 'without format',
                   'without rec_bytes', 'without idx_bytes', 'other size'}


def test_a_marker_of_the_wrong_shape_is_never_fresh(d2lf, data_dir):
    import json
    prefix = d2lf.pack_face_records(data_dir)
    marker = prefix + packs.MARKER
    with open(marker) as f:
        good = json.load(f)
    items = d2lf.list_facerec_images(data_dir)
    sources = packs.fingerprint(data_dir, items)
    assert packs.is_fresh(prefix, len(items), sources)
    for name, bad in marker_variants(good):
        with open(marker, 'w') as f:
            f.write(bad if isinstance(bad, str) else json.dumps(bad))
        assert not packs.is_fresh(prefix, len(items), sources), name
        ours = name not in FOREIGN_MARKERS
        assert (packs.foreign_reason(prefix) is None) == ours, name
        built = rec_inode(data_dir)
        if ours:
            d2lf.pack_face_records(data_dir)  # rebuilt, and fresh again
            assert rec_inode(data_dir) != built, name
            assert packs.is_fresh(prefix, len(items), sources), name
        else:
            with pytest.raises(publish.ForeignError, match='not made by'):
                d2lf.pack_face_records(data_dir)
            assert rec_inode(data_dir) == built, name


def replace_image(path, how):
    """Change the JPEG at `path` as another program might."""
    info = os.stat(path)
    with open(path, 'rb') as f:
        jpeg = bytearray(f.read())
    if how == 'grown by a byte':
        jpeg += b'\0'
    else:  # the same size: a byte of the picture changed
        jpeg[len(jpeg) // 2] ^= 0xFF
    target = path + '.new' if how.startswith('renamed over') else path
    with open(target, 'wb') as f:
        f.write(jpeg)
    if target != path:
        os.replace(target, path)
    if how.endswith('old time put back'):
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


@pytest.mark.parametrize('how', ['grown by a byte',
                                 'same size, old time put back',
                                 'renamed over, old time put back'])
def test_an_image_replaced_while_packing_leaves_no_fresh_pack(d2lf, data_dir,
                                                              monkeypatch,
                                                              how):
    items = d2lf.list_facerec_images(data_dir)
    victim = items[-1][0]
    read = d2lf.read_face_jpeg

    def read_and_replace(path, image_size=None):
        data = read(path, image_size)
        if path == items[3][0]:  # meanwhile, another program replaces one
            replace_image(victim, how)
        return data
    monkeypatch.setattr(d2lf, 'read_face_jpeg', read_and_replace)
    with pytest.raises(RuntimeError, match='changed while they were packed'):
        d2lf.pack_face_records(data_dir)
    names = os.listdir(data_dir)
    assert 'train.rec' not in names and 'train.idx' not in names
    assert not temporaries(data_dir)
    monkeypatch.undo()
    prefix = d2lf.pack_face_records(data_dir)  # the next run packs it
    new_items = d2lf.list_facerec_images(data_dir)
    assert packs.is_fresh(prefix, len(new_items), packs.fingerprint(
        data_dir, new_items))


def test_packing_names_a_bad_image_and_leaves_no_pack(d2lf, data_dir):
    path = d2lf.list_facerec_images(data_dir)[11][0]
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:200])
    with pytest.raises(ValueError, match=os.path.basename(path)):
        d2lf.pack_face_records(data_dir)
    names = os.listdir(data_dir)
    assert 'train.rec' not in names and 'train.idx' not in names
    assert not temporaries(data_dir)


def test_a_full_disk_while_packing_still_cleans_up(d2lf, data_dir,
                                                   monkeypatch):
    import errno
    write_pack = recordio.write_pack

    def fill_the_disk(prefix, records, **kwargs):
        def some_then_full():
            for i, record in enumerate(records):
                if i == 7:
                    raise OSError(errno.ENOSPC, 'No space left on device')
                yield record
        return write_pack(prefix, some_then_full(), **kwargs)
    monkeypatch.setattr(recordio, 'write_pack', fill_the_disk)
    with pytest.raises(OSError, match='No space left'):
        d2lf.pack_face_records(data_dir)
    names = os.listdir(data_dir)
    assert 'train.rec' not in names and 'train.idx' not in names
    assert not temporaries(data_dir)


def test_a_packer_stopped_between_its_renames_leaves_a_pack_of_ours(
        d2lf, data_dir, monkeypatch):
    prefix = d2lf.pack_face_records(data_dir)
    shutil.copy(d2lf.list_facerec_images(data_dir)[0][0],
                os.path.join(data_dir, '00000000', 'extra.jpg'))
    replace, calls = os.replace, []

    def die_after_the_rec(src, dst):
        calls.append(dst)
        if dst == prefix + '.idx':  # .rec is new, .idx still the old one
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(os, 'replace', die_after_the_rec)
    with pytest.raises(KeyboardInterrupt):
        d2lf.pack_face_records(data_dir)
    monkeypatch.undo()
    assert calls[-2:] == [prefix + '.rec', prefix + '.idx']
    assert not temporaries(data_dir)
    assert packs.foreign_reason(prefix) is None  # the claim vouches for both
    d2lf.pack_face_records(data_dir)
    items = d2lf.list_facerec_images(data_dir)
    assert packs.is_fresh(prefix, len(items), packs.fingerprint(data_dir,
                                                                items))
    assert len(d2lf.FaceRecordIter(prefix, 1)) == len(items)


def dead_pid():
    """The id of a process that has ended."""
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


@pytest.mark.parametrize('already_packed', [False, True])
def test_stale_temporary_files_of_dead_packers_are_removed(d2lf, data_dir,
                                                           already_packed):
    if already_packed:  # so the next call finds the pack fresh
        d2lf.pack_face_records(data_dir)
    dead = publish.temp_path(data_dir, suffix='.train', pid=dead_pid())
    dead_download = publish.temp_path(data_dir, suffix='.part', pid=dead_pid())
    alive = publish.temp_path(data_dir, suffix='.train', pid=os.getppid())
    elsewhere = os.path.join(data_dir, f'{publish.PREFIX}otherhost-'
                             f'{dead_pid()}-{"0" * 16}.train')
    others = [os.path.join(data_dir, f'{publish.PREFIX}notes.txt'),
              os.path.join(data_dir, 'mine.rec')]
    for path in [dead + '.rec', dead + '.idx', dead_download, alive + '.rec',
                 elsewhere + '.rec'] + others:
        with open(path, 'wb') as f:
            f.write(b'partial')
    d2lf.pack_face_records(data_dir)
    for path in [dead + '.rec', dead + '.idx', dead_download]:
        assert not os.path.exists(path), path
    for path in [alive + '.rec', elsewhere + '.rec'] + others:
        assert os.path.exists(path), path


def test_a_packer_killed_midway_leaves_what_the_next_run_removes(d2lf,
                                                                 data_dir):
    import signal
    import subprocess
    import sys
    from synthetic import REPO
    tab = d2lf.__name__.rsplit('.', 1)[1]
    # The child writes part of the pack, then waits to be killed.
    script = (
        'import sys, time\n'
        'from d2l_face import recordio\n'
        f'from d2l_face import {tab} as d2lf\n'
        'write_pack = recordio.write_pack\n'
        'def stall(prefix, records, **kwargs):\n'
        '    def some():\n'
        '        for i, record in enumerate(records):\n'
        '            if i == 7:\n'
        '                print("stalled", flush=True)\n'
        '                time.sleep(60)\n'
        '            yield record\n'
        '    return write_pack(prefix, some(), **kwargs)\n'
        'recordio.write_pack = stall\n'
        'd2lf.pack_face_records(sys.argv[1])\n')
    child = subprocess.Popen([sys.executable, '-c', script, data_dir],
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert child.stdout.readline() == 'stalled\n'
        assert temporaries(data_dir)  # the half-written pack
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    prefix = d2lf.pack_face_records(data_dir)
    assert not temporaries(data_dir)
    items = d2lf.list_facerec_images(data_dir)
    assert packs.is_fresh(prefix, len(items), packs.fingerprint(data_dir,
                                                                items))


@pytest.mark.parametrize('umask', [0o002, 0o027])
def test_pack_files_get_the_users_umask(d2lf, data_dir, umask):
    old = os.umask(umask)
    try:
        d2lf.pack_face_records(data_dir)
    finally:
        os.umask(old)
    for name in ('train.rec', 'train.idx', 'train.d2l-pack.json'):
        mode = os.stat(os.path.join(data_dir, name)).st_mode & 0o777
        assert mode == 0o666 & ~umask, (name, oct(mode))


def foreign_pack_dir(d2lf, data_dir, tmp_path, layout, label_vector=False,
                     with_folders=False):
    """A folder holding a pack that d2l_face did not make, and property."""
    folder = tmp_path / f'foreign-{layout}-{label_vector}'
    if with_folders:
        shutil.copytree(data_dir, folder)
    else:
        folder.mkdir()
        shutil.copy(os.path.join(data_dir, 'property'), folder)
    items = d2lf.list_facerec_images(data_dir)
    recordio.write_pack(str(folder / 'train'),
                        ((label, open(path, 'rb').read())
                         for path, label in items),
                        layout=layout, label_vector=label_vector)
    return str(folder), items


@pytest.mark.parametrize('layout, label_vector', [
    ('insightface', False), ('insightface', True), ('flat', False),
    ('flat', True)])
def test_foreign_packs_read_back_exactly(d2lf, data_dir, tmp_path, layout,
                                         label_vector):
    folder, items = foreign_pack_dir(d2lf, data_dir, tmp_path, layout,
                                     label_vector)
    train_iter, _ = d2lf.load_data_facerec(folder, [], 4)
    assert train_iter.pack.layout == layout
    assert train_iter.num_classes == NUM_CLASSES
    assert len(train_iter) == len(items) // 4  # no header or id records
    ordered = d2lf.FaceRecordIter(os.path.join(folder, 'train'), 1,
                                  shuffle=False, flip=False)
    for (X, y), (path, label) in zip(ordered, items):
        expected = d2lf.read_face_image(path).transpose(2, 0, 1) / 255
        onp.testing.assert_array_equal(to_numpy(X[0]),
                                       expected.astype(onp.float32))
        assert int(y[0]) == label
    # The same shuffled, flipped batches as the chapter's own packs.
    expected = per_file_images(d2lf, data_dir)
    for X, y in epoch(train_iter):
        assert X.dtype == onp.float32 and y.dtype == onp.int64
        for x, label in zip(X, y):
            key = x.tobytes()
            if key not in expected:
                key = onp.ascontiguousarray(x[:, :, ::-1]).tobytes()
            assert expected[key] == label
    assert sorted(os.listdir(folder)) == ['property', 'train.idx',
                                          'train.rec']


@pytest.mark.parametrize('claim, message', [
    (40_000_000, 'property: 40000000 classes, more than MAX_CLASSES'),
    (2_000_000, rf'2000000 classes claimed, but the pack holds {NUM_CLASSES} '
                rf'\(labels up to {NUM_CLASSES - 1}, {NUM_CLASSES} identity'),
    (NUM_CLASSES - 1, f'{NUM_CLASSES - 1} classes claimed')])
def test_a_property_the_insightface_pack_disagrees_with_is_refused(d2lf, 
        data_dir, tmp_path, claim, message):
    folder, _ = foreign_pack_dir(d2lf, data_dir, tmp_path, 'insightface')
    with open(os.path.join(folder, 'property'), 'w') as f:
        f.write(f'{claim},112,112\n')
    with pytest.raises(ValueError, match=message):
        d2lf.load_data_facerec(folder, [], 4)


def test_foreign_pack_without_property(d2lf, data_dir, tmp_path):
    folder, items = foreign_pack_dir(d2lf, data_dir, tmp_path, 'insightface')
    os.remove(os.path.join(folder, 'property'))
    train_iter, _ = d2lf.load_data_facerec(folder, [], 4)
    assert train_iter.num_classes == NUM_CLASSES
    assert train_iter.image_size == (112, 112)


@pytest.mark.parametrize('cut', ['half', 'inside the header record'])
def test_truncated_foreign_pack_is_refused_by_name(d2lf, data_dir, tmp_path,
                                                   cut):
    folder, _ = foreign_pack_dir(d2lf, data_dir, tmp_path, 'insightface')
    rec = os.path.join(folder, 'train.rec')
    offsets = dict(recordio.read_index(os.path.join(folder, 'train.idx')))
    size = (os.path.getsize(rec) // 2 if cut == 'half' else offsets[0] + 12)
    with open(rec, 'r+b') as f:
        f.truncate(size)
    pattern = (r'train\.rec' if cut == 'half' else
               rf'train\.rec: record 0 at byte {offsets[0]}')
    with pytest.raises(recordio.PackError, match=pattern) as error:
        d2lf.load_data_facerec(folder, [], 4)
    assert 'delete' not in str(error.value)
    assert os.path.getsize(rec) == size  # still there, untouched


def test_a_foreign_pack_is_never_replaced(d2lf, data_dir, tmp_path, capsys):
    folder, _ = foreign_pack_dir(d2lf, data_dir, tmp_path, 'flat',
                                 with_folders=True)
    # Make the folders disagree with the pack: a packer would rebuild.
    first = d2lf.list_facerec_images(folder)[0][0]
    cv2.imwrite(first, onp.zeros((112, 112, 3), onp.uint8))
    files = {n: open(os.path.join(folder, n), 'rb').read()
             for n in ('train.rec', 'train.idx')}
    with pytest.raises(FileExistsError, match='not made by d2l_face') as e:
        d2lf.pack_face_records(folder)
    assert 'delete' not in str(e.value).lower()
    train_iter, _ = d2lf.load_data_facerec(folder, [], 4)
    assert 'NOTICE' in capsys.readouterr().out
    assert len(train_iter) == NUM_CLASSES * PER_CLASS // 4
    for name, data in files.items():
        assert open(os.path.join(folder, name), 'rb').read() == data
    assert 'train.d2l-pack.json' not in os.listdir(folder)


def test_a_marker_linked_from_another_pack_proves_nothing(d2lf, data_dir,
                                                          tmp_path):
    ours = d2lf.pack_face_records(data_dir)
    other = str(tmp_path / 'other')  # someone's pack of the same sizes
    os.mkdir(other)
    for ext in ('.rec', '.idx'):
        shutil.copy(ours + ext, os.path.join(other, 'train' + ext))
    os.symlink(ours + packs.MARKER,
               os.path.join(other, 'train' + packs.MARKER))
    assert 'not made by d2l_face' in packs.foreign_reason(
        os.path.join(other, 'train'))
    before = os.stat(os.path.join(other, 'train.rec')).st_ino
    with open(os.path.join(other, 'property'), 'w') as f:
        f.write(f'{NUM_CLASSES},112,112\n')
    with pytest.raises(publish.ForeignError):
        d2lf.pack_face_records(other)
    assert os.stat(os.path.join(other, 'train.rec')).st_ino == before


def test_write_insightface_pack_is_whole_or_absent(d2lf, data_dir, tmp_path,
                                                   monkeypatch):
    out = str(tmp_path / 'insightface')
    replace = os.replace

    def fail_at_the_last(src, dst):
        if dst.endswith('property'):
            raise OSError('disk gone')
        replace(src, dst)
    monkeypatch.setattr(os, 'replace', fail_at_the_last)
    with pytest.raises(OSError, match='disk gone'):
        d2lf.write_insightface_pack(data_dir, out, num_classes=2)
    assert os.listdir(out) == []  # the two files renamed before went back
    monkeypatch.undo()
    d2lf.write_insightface_pack(data_dir, out, num_classes=2)
    assert sorted(os.listdir(out)) == ['property', 'train.idx', 'train.rec']


def test_write_insightface_pack(d2lf, data_dir, tmp_path):
    out = str(tmp_path / 'insightface')
    d2lf.write_insightface_pack(data_dir, out, num_classes=2)
    assert sorted(os.listdir(out)) == ['property', 'train.idx', 'train.rec']
    assert d2lf.read_facerec_meta(out) == ((112, 112), 2)
    keys = [key for key, _ in recordio.read_index(os.path.join(out,
                                                                'train.idx'))]
    # images 1..10, identity records 11 and 12, the header (key 0) last
    assert keys == list(range(1, 2 * PER_CLASS + 3)) + [0]
    with pytest.raises(FileExistsError, match='already holds a pack'):
        d2lf.write_insightface_pack(data_dir, out)


# load_data_facerec: the training batches and the verification sets.

def test_loader_batches_and_verification_set(d2lf, data_dir):
    train_iter, sets = d2lf.load_data_facerec(data_dir, ['lfw_small'], 8)
    batches = list(train_iter)
    # last_batch='discard': only full batches.
    assert len(batches) == NUM_CLASSES * PER_CLASS // 8
    labels = []
    for X, y in batches:
        assert X.shape == (8, 3, 112, 112) and y.shape == (8,)
        labels += to_numpy(y).tolist()
    assert min(labels) >= 0 and max(labels) < NUM_CLASSES
    images, issame = sets['lfw_small']
    assert images.shape == (2, 40, 3, 112, 112) and images.dtype == onp.uint8
    assert issame.shape == (20,) and issame.sum() == 10


def test_missing_verification_set(d2lf, standin_root):
    with pytest.raises(FileNotFoundError, match='cfp_fp.bin'):
        d2lf.load_data_facerec(standin_root / standin.DATASET_DIR,
                                ['cfp_fp'], 8)


class Hang(BaseException):
    """No Exception: code that catches OSError cannot swallow it."""


def test_a_fifo_named_like_a_verification_set_is_named(d2lf, data_dir):
    os.mkfifo(os.path.join(data_dir, 'fifo.bin'))
    with deadline(HANG, Hang), pytest.raises(
            Exception, match='fifo.bin.*not a regular file'):
        d2lf.load_data_facerec(data_dir, ['fifo'])


# The PyTorch tab: the threads fill NumPy batches in both tabs and only the
# final wrap differs, so the batches must be equal, and not copies.

def tab_epoch(train_iter, seed):
    onp.random.seed(seed)  # the order and the flips come from NumPy
    return [(to_numpy(X).copy(), to_numpy(y).copy()) for X, y in train_iter]


@pytest.mark.parametrize('shuffle, flip', [(False, False), (True, True)])
def test_the_same_batches_in_both_tabs(data_dir, shuffle, flip):
    from d2l_face import mxnet as d2lf_mx
    from d2l_face import torch as d2lf_torch
    prefix = d2lf_torch.pack_face_records(data_dir)
    ours, theirs = (
        tab_epoch(lib.FaceRecordIter(prefix, 4, shuffle=shuffle, flip=flip),
                  3) for lib in (d2lf_torch, d2lf_mx))
    assert len(ours) == len(theirs) == NUM_CLASSES * PER_CLASS // 4
    for (X, y), (X_mx, y_mx) in zip(ours, theirs):
        assert X.dtype == X_mx.dtype == onp.float32
        assert y.dtype == y_mx.dtype == onp.int64
        onp.testing.assert_array_equal(X, X_mx)
        onp.testing.assert_array_equal(y, y_mx)
    if not shuffle:  # in order: the images of the folders, x / 255
        items = d2lf_torch.list_facerec_images(data_dir)
        X, y = ours[0]
        for x, label, (path, expected) in zip(X, y, items):
            image = d2lf_torch.read_face_image(path).transpose(2, 0, 1)
            onp.testing.assert_array_equal(x, image / onp.float32(255))
            assert label == expected


def test_batches_are_tensors_sharing_the_loaders_memory(data_dir):
    import torch
    from d2l_face import torch as d2lf_torch
    train_iter, _ = d2lf_torch.load_data_facerec(data_dir, ['lfw_small'], 4)
    X, y = next(iter(train_iter))
    assert isinstance(X, torch.Tensor) and isinstance(y, torch.Tensor)
    assert X.shape == (4, 3, 112, 112) and X.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64
    batches = [batch for batch, _ in train_iter._buffers]
    assert X.data_ptr() in [batch.ctypes.data for batch in batches]
    batch = next(b for b in batches if b.ctypes.data == X.data_ptr())
    assert onp.shares_memory(X.numpy(), batch)
    X[0, 0, 0, 0] = 7.0  # a write to the tensor is a write to the batch
    assert batch[0, 0, 0, 0] == 7.0


def test_a_batch_in_use_is_never_refilled(d2lf, data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    train_iter = d2lf.FaceRecordIter(prefix, 2, shuffle=False, flip=False)
    batches = iter(train_iter)
    kept, _ = next(batches)
    first = to_numpy(kept).copy()
    count = sum(1 for _ in batches)  # the others are dropped as they come
    assert count == NUM_CLASSES * PER_CLASS // 2 - 1
    onp.testing.assert_array_equal(to_numpy(kept), first)
    # The batches we dropped freed their arrays for reuse: a few suffice.
    assert len(train_iter._buffers) <= 4


# Property-based: a marker of any other content never vouches for a pack.

SETTINGS = settings(max_examples=60, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
    st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) |
    st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=12)


@pytest.fixture(scope='module')
def packed(standin_root, tmp_path_factory):
    """A packed copy of the small stand-in: (prefix, its good marker)."""
    import json
    from d2l_face import mxnet as d2lf_mx
    prefix = d2lf_mx.pack_face_records(
        packless_copy(standin_root, tmp_path_factory.mktemp('packed')))
    with open(prefix + packs.MARKER) as f:
        return prefix, json.load(f)


@SETTINGS
@given(value=json_values, tweak=st.sampled_from(['as is', 'merged']))
def test_any_other_marker_is_not_fresh(value, tweak, packed):
    import json
    prefix, good = packed
    marker = dict(good, **value) if tweak == 'merged' and isinstance(
        value, dict) else value
    with open(prefix + '.d2l-pack.json', 'w') as f:
        json.dump(marker, f)
    try:
        fresh = packs.is_fresh(prefix, good['num_records'],
                               good['sources'])
    finally:
        with open(prefix + '.d2l-pack.json', 'w') as f:
            json.dump(good, f)
    assert fresh == (marker == good and all(
        type(marker[k]) is type(good[k]) for k in good))
