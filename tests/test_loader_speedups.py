"""Section 1's packed loader: the same batches as the per-file one, faster.

`pack_face_records` + `FaceRecordIter` (behind `load_data_facerec`) must give
what `FaceDataset` + `DataLoader` give: RGB float32 x/255 in (3, h, w), each
image flipped with probability 1/2, a new order each epoch, full batches only.
The byte-level format is `d2l_face.recordio`'s (tested in test_recordio.py);
here we test what the section builds on it.
"""
import collections
import os
import shutil
import struct

import cv2
import numpy as onp
import pytest

from d2l_face import packs, publish, recordio
from d2l_face import mxnet as d2lf

from synthetic import NUM_CLASSES, PER_CLASS, packless_copy
MAGIC = struct.pack('<I', recordio.MAGIC)


def temporaries(folder):
    """The names in `folder` that d2l_face.publish made."""
    return [n for n in os.listdir(folder) if publish.parse(n) is not None]


@pytest.fixture
def data_dir(standin_root, tmp_path):
    return packless_copy(standin_root, tmp_path)


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


def test_iterator_carries_crop_size_and_class_count(data_dir):
    train_iter, _ = d2lf.load_data_facerec(data_dir, [], 8)
    assert train_iter.num_classes == NUM_CLASSES
    assert train_iter.image_size == (112, 112)
    # Without property, the pack tells: its labels and its first JPEG.
    alone = d2lf.FaceRecordIter(os.path.join(data_dir, 'train'), 8)
    assert alone.num_classes == NUM_CLASSES and alone.image_size == (112, 112)


def test_property_is_read_once_per_load(data_dir, monkeypatch):
    calls = []
    read = d2lf.read_facerec_meta
    monkeypatch.setattr(d2lf, 'read_facerec_meta',
                        lambda *args: calls.append(args) or read(*args))
    d2lf.load_data_facerec(data_dir, ['lfw_small'], 8)
    assert len(calls) == 1


def test_labels_beyond_the_class_count_are_refused(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    with pytest.raises(ValueError, match=rf'train\.rec: 3 classes claimed, '
                                         rf'but the pack holds {NUM_CLASSES} '
                                         rf'\(labels up to {NUM_CLASSES - 1}'):
        d2lf.FaceRecordIter(prefix, 4, num_classes=3)


@pytest.mark.parametrize('num_classes', [NUM_CLASSES + 1, 2_000_000])
def test_more_classes_than_the_labels_are_refused(data_dir, num_classes):
    prefix = d2lf.pack_face_records(data_dir)
    with pytest.raises(ValueError, match=rf'{num_classes} classes claimed, '
                                         rf'but the pack holds {NUM_CLASSES}'):
        d2lf.FaceRecordIter(prefix, 4, num_classes=num_classes)


@pytest.mark.parametrize('num_classes', [0, -1, 2.5, True, 40_000_000])
def test_class_counts_outside_the_limit_are_refused(data_dir, num_classes):
    prefix = d2lf.pack_face_records(data_dir)
    with pytest.raises(ValueError, match=r'class count must be an integer in '
                                         r'1\.\.2500000 \(MAX_CLASSES\)'):
        d2lf.FaceRecordIter(prefix, 4, num_classes=num_classes)


def test_load_data_facerec_uses_the_pack(data_dir):
    train_iter, _ = d2lf.load_data_facerec(data_dir, [], 8)
    assert isinstance(train_iter, d2lf.FaceRecordIter)
    assert train_iter.pack.layout == 'flat'
    for name in ('train.rec', 'train.idx', 'train.d2l-pack.json'):
        assert os.path.isfile(os.path.join(data_dir, name))
    assert not temporaries(data_dir)


def test_bad_batch_size():
    for batch_size in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match='batch_size'):
            d2lf.FaceRecordIter('nowhere', batch_size)


def record_offsets(prefix):
    return [offset for _, offset in recordio.read_index(prefix + '.idx')]


def test_damaged_record_is_named(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    offset = record_offsets(prefix)[3]
    with open(prefix + '.rec', 'r+b') as f:
        f.seek(offset)
        f.write(b'\0\0\0\0')
    with pytest.raises(recordio.PackError,
                       match=rf'train\.rec: record 3 at byte {offset}'):
        d2lf.FaceRecordIter(prefix, 4)


def test_damaged_index_is_named_and_not_to_be_deleted(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    with open(prefix + '.idx', 'a') as f:
        f.write('garbage\n')
    with pytest.raises(recordio.PackError, match=r'train\.idx') as error:
        d2lf.FaceRecordIter(prefix, 4)
    assert 'delete' not in str(error.value)


def first_sof_offset(jpeg):
    """Where the JPEG's frame header (SOF0) starts."""
    return jpeg.index(b'\xff\xc0')


def test_undecodable_image_in_a_record_is_named(data_dir):
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


# Packs are fresh only when complete and current; others' packs are only read.

def rec_inode(data_dir):
    return os.stat(os.path.join(data_dir, 'train.rec')).st_ino


def test_fresh_pack_is_reused(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    built = rec_inode(data_dir)
    assert d2lf.pack_face_records(data_dir) == prefix
    assert rec_inode(data_dir) == built


def test_pack_is_rebuilt_when_an_image_changes(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    built = rec_inode(data_dir)
    path, label = d2lf.list_facerec_images(data_dir)[7]
    cv2.imwrite(path, onp.full((112, 112, 3), (10, 200, 30), onp.uint8))
    d2lf.pack_face_records(data_dir)
    assert rec_inode(data_dir) != built
    train_iter = d2lf.FaceRecordIter(prefix, 1, shuffle=False, flip=False)
    X, y = list(train_iter)[7]
    expected = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
    onp.testing.assert_array_equal(X[0].asnumpy(), expected)
    assert int(y[0]) == label


@pytest.mark.parametrize('change', ['add image', 'remove image', 'property'])
def test_pack_is_rebuilt_when_the_dataset_changes(data_dir, change):
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
def test_incomplete_own_pack_is_rebuilt(data_dir, damage):
    prefix = d2lf.pack_face_records(data_dir)
    for ext in ('.rec', '.idx'):
        if damage in ('no ' + ext, 'neither'):
            os.remove(prefix + ext)
    d2lf.pack_face_records(data_dir)
    assert len(d2lf.FaceRecordIter(prefix, 1)) == NUM_CLASSES * PER_CLASS


@pytest.mark.parametrize('change', ['shorter .rec', 'longer .idx',
                                    'a link', 'a folder'])
def test_own_pack_changed_since_is_not_ours_any_more(data_dir, tmp_path,
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


def test_a_marker_of_the_wrong_shape_is_never_fresh(data_dir):
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
def test_an_image_replaced_while_packing_leaves_no_fresh_pack(data_dir,
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


def test_packing_names_a_bad_image_and_leaves_no_pack(data_dir):
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


def test_a_full_disk_while_packing_still_cleans_up(data_dir, monkeypatch):
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
        data_dir, monkeypatch):
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
def test_stale_temporary_files_of_dead_packers_are_removed(data_dir,
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


def test_a_packer_killed_midway_leaves_what_the_next_run_removes(data_dir):
    import signal
    import subprocess
    import sys
    from synthetic import REPO
    # The child writes part of the pack, then waits to be killed.
    script = (
        'import sys, time\n'
        'from d2l_face import recordio\n'
        'from d2l_face import mxnet as d2lf\n'
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
def test_pack_files_get_the_users_umask(data_dir, umask):
    old = os.umask(umask)
    try:
        d2lf.pack_face_records(data_dir)
    finally:
        os.umask(old)
    for name in ('train.rec', 'train.idx', 'train.d2l-pack.json'):
        mode = os.stat(os.path.join(data_dir, name)).st_mode & 0o777
        assert mode == 0o666 & ~umask, (name, oct(mode))


def foreign_pack_dir(data_dir, tmp_path, layout, label_vector=False,
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
def test_foreign_packs_read_back_exactly(data_dir, tmp_path, layout,
                                         label_vector):
    folder, items = foreign_pack_dir(data_dir, tmp_path, layout, label_vector)
    train_iter, _ = d2lf.load_data_facerec(folder, [], 4)
    assert train_iter.pack.layout == layout
    assert train_iter.num_classes == NUM_CLASSES
    assert len(train_iter) == len(items) // 4  # no header or id records
    ordered = d2lf.FaceRecordIter(os.path.join(folder, 'train'), 1,
                                  shuffle=False, flip=False)
    for (X, y), (path, label) in zip(ordered, items):
        expected = d2lf.read_face_image(path).transpose(2, 0, 1) / 255
        onp.testing.assert_array_equal(X[0].asnumpy(),
                                       expected.astype(onp.float32))
        assert int(y[0]) == label
    # The same shuffled, flipped batches as the chapter's own packs.
    expected = per_file_images(data_dir)
    for X, y in epoch(train_iter):
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
def test_a_property_the_insightface_pack_disagrees_with_is_refused(
        data_dir, tmp_path, claim, message):
    folder, _ = foreign_pack_dir(data_dir, tmp_path, 'insightface')
    with open(os.path.join(folder, 'property'), 'w') as f:
        f.write(f'{claim},112,112\n')
    with pytest.raises(ValueError, match=message):
        d2lf.load_data_facerec(folder, [], 4)


def test_foreign_pack_without_property(data_dir, tmp_path):
    folder, items = foreign_pack_dir(data_dir, tmp_path, 'insightface')
    os.remove(os.path.join(folder, 'property'))
    train_iter, _ = d2lf.load_data_facerec(folder, [], 4)
    assert train_iter.num_classes == NUM_CLASSES
    assert train_iter.image_size == (112, 112)


@pytest.mark.parametrize('cut', ['half', 'inside the header record'])
def test_truncated_foreign_pack_is_refused_by_name(data_dir, tmp_path, cut):
    folder, _ = foreign_pack_dir(data_dir, tmp_path, 'insightface')
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


def test_a_foreign_pack_is_never_replaced(data_dir, tmp_path, capsys):
    folder, _ = foreign_pack_dir(data_dir, tmp_path, 'flat', with_folders=True)
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


def test_a_marker_linked_from_another_pack_proves_nothing(data_dir,
                                                          tmp_path):
    ours = d2lf.pack_face_records(data_dir)
    other = str(tmp_path / 'other')  # someone's pack of the same sizes
    os.mkdir(other)
    for ext in ('.rec', '.idx'):
        shutil.copy(ours + ext, os.path.join(other, 'train' + ext))
    os.symlink(ours + packs.MARKER, os.path.join(other, 'train' + packs.MARKER))
    assert 'not made by d2l_face' in packs.foreign_reason(
        os.path.join(other, 'train'))
    before = os.stat(os.path.join(other, 'train.rec')).st_ino
    with open(os.path.join(other, 'property'), 'w') as f:
        f.write(f'{NUM_CLASSES},112,112\n')
    with pytest.raises(publish.ForeignError):
        d2lf.pack_face_records(other)
    assert os.stat(os.path.join(other, 'train.rec')).st_ino == before


def test_write_insightface_pack_is_whole_or_absent(data_dir, tmp_path,
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


def test_write_insightface_pack(data_dir, tmp_path):
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
