"""d2l_face.recordio: MXNet's RecordIO packs, read and written without MXNet.

The packs are checked against MXNet itself (byte for byte, and both ways),
in the two layouts InsightFace uses, and under damage: every damaged pack
must raise PackError naming the record and the byte, without decoding an
image or reading more than the files hold.
"""
import os
import struct
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as onp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2l_face import recordio
from d2l_face.recordio import MAGIC, PackError, PackReader, write_pack

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[
                        HealthCheck.function_scoped_fixture])
MAGIC_BYTES = struct.pack('<I', MAGIC)
SIZE = 16  # small crops keep the packs small and the tests fast


def make_jpeg(seed, size=SIZE):
    image = onp.random.default_rng(seed).integers(0, 256, (size, size, 3),
                                                  dtype=onp.uint8)
    return cv2.imencode('.jpg', image)[1].tobytes()


def with_comment(jpeg, comment):
    """Insert a JPEG comment segment (FF FE) holding `comment` after SOI."""
    return (jpeg[:2] + b'\xff\xfe' + struct.pack('>H', len(comment) + 2)
            + comment + jpeg[2:])


# The JPEG starts 24 bytes (scalar label) or 28 bytes (one-entry vector)
# into the record, both multiples of 4: MXNet splits the record at the
# magic numbers at JPEG offsets 8 and 12 (an empty part between them).
MAGIC_JPEG = with_comment(make_jpeg(99), b'ab' + MAGIC_BYTES * 2 + b'cd')

LABELS = [0, 0, 0, 1, 2, 2, 5, 5]
JPEGS = [make_jpeg(i) for i in range(len(LABELS) - 1)] + [MAGIC_JPEG]


def mxnet_pack(prefix, labels, jpegs, layout='flat', label_vector=False):
    """Write a pack with MXNet's own writer, following InsightFace's recipe.

    flat: image i at key i; insightface: images at keys 1..N, one record
    per identity whose label is its (first, end) key range, then key 0."""
    writer = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec',
                                           'w')
    key = 1 if layout == 'insightface' else 0
    ranges = []
    for label, jpeg in zip(labels, jpegs):
        value = [label] if label_vector else label
        header = mx.recordio.IRHeader(0, value, key, 0)
        writer.write_idx(key, mx.recordio.pack(header, jpeg))
        if ranges and ranges[-1][2] == label:
            ranges[-1][1] = key + 1
        else:
            ranges.append([key, key + 1, label])
        key += 1
    if layout == 'insightface':
        first = key
        for begin, end, _ in ranges:
            header = mx.recordio.IRHeader(0, (begin, end), key, 0)
            writer.write_idx(key, mx.recordio.pack(header, b''))
            key += 1
        header = mx.recordio.IRHeader(0, (first, key), 0, 1)
        writer.write_idx(0, mx.recordio.pack(header, b''))
    writer.close()


def file_state(prefix):
    return [(open(prefix + ext, 'rb').read(),
             os.stat(prefix + ext).st_mtime_ns) for ext in ('.rec', '.idx')]


def read_all(prefix, image_size=None):
    with PackReader(prefix, image_size) as reader:
        return (reader.layout, reader.labels.tolist(), reader.num_classes,
                [bytes(reader.jpeg(i)) for i in range(len(reader))])


# ---------------------------------------------------------------------------
# Compatibility with MXNet

@pytest.mark.parametrize('layout', recordio.LAYOUTS)
@pytest.mark.parametrize('label_vector', [False, True])
def test_same_bytes_as_mxnet(tmp_path, layout, label_vector):
    ours, theirs = str(tmp_path / 'ours'), str(tmp_path / 'theirs')
    num = write_pack(ours, zip(LABELS, JPEGS), layout, label_vector)
    mxnet_pack(theirs, LABELS, JPEGS, layout, label_vector)
    assert num == len(LABELS)
    for ext in ('.rec', '.idx'):
        assert open(ours + ext, 'rb').read() == open(theirs + ext, 'rb').read()


@pytest.mark.parametrize('layout', recordio.LAYOUTS)
@pytest.mark.parametrize('label_vector', [False, True])
def test_mxnet_reads_what_we_write(tmp_path, layout, label_vector):
    prefix = str(tmp_path / 'pack')
    write_pack(prefix, zip(LABELS, JPEGS), layout, label_vector)
    rec = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec', 'r')
    first = 1 if layout == 'insightface' else 0
    for i, (label, jpeg) in enumerate(zip(LABELS, JPEGS)):
        header, data = mx.recordio.unpack(rec.read_idx(first + i))
        assert data == jpeg
        assert onp.ravel(header.label)[0] == label
        assert header.flag == (1 if label_vector else 0)
    if layout == 'insightface':  # read key 0 as arcface_torch does
        header, _ = mx.recordio.unpack(rec.read_idx(0))
        assert header.flag > 0
        assert header.label.tolist() == [len(LABELS) + 1,
                                         len(LABELS) + 1 + len(set(LABELS))]
    rec.close()


@pytest.mark.parametrize('layout', recordio.LAYOUTS)
@pytest.mark.parametrize('label_vector', [False, True])
def test_we_read_what_mxnet_writes(tmp_path, layout, label_vector):
    prefix = str(tmp_path / 'pack')
    mxnet_pack(prefix, LABELS, JPEGS, layout, label_vector)
    assert read_all(prefix, (SIZE, SIZE)) == (layout, LABELS, max(LABELS) + 1,
                                              JPEGS)


def test_mxnet_split_the_magic_record(tmp_path):
    """The last record holds the magic number, so MXNet wrote it in parts."""
    prefix = str(tmp_path / 'pack')
    mxnet_pack(prefix, LABELS, JPEGS)
    data = open(prefix + '.rec', 'rb').read()
    last = recordio.read_index(prefix + '.idx')[-1][1]
    flags = [struct.unpack_from('<I', data, pos + 4)[0] >> 29
             for pos in (last, last + 8 + 32, last + 16 + 32)]
    assert flags == [1, 2, 3]
    with PackReader(prefix) as reader:
        assert bytes(reader.jpeg(len(reader) - 1)) == MAGIC_JPEG
        image = cv2.imdecode(reader.jpeg(len(reader) - 1), cv2.IMREAD_COLOR)
        assert image.shape == (SIZE, SIZE, 3)


@SETTINGS
@given(pieces=st.lists(st.one_of(st.binary(max_size=9), st.just(MAGIC_BYTES)),
                       max_size=12))
def test_framing_matches_mxnet_for_any_data(pieces, tmp_path):
    data = b''.join(pieces)
    path = str(tmp_path / 'raw.rec')
    writer = mx.recordio.MXRecordIO(path, 'w')
    writer.write(data)
    writer.close()
    assert recordio._frame(data) == open(path, 'rb').read()


@SETTINGS
@given(pieces=st.lists(st.one_of(st.binary(max_size=7), st.just(MAGIC_BYTES)),
                       max_size=10),
       label=st.integers(0, 1000), vector=st.booleans())
def test_we_read_any_split_mxnet_writes(pieces, label, vector, tmp_path):
    jpeg = with_comment(JPEGS[0], b''.join(pieces))
    prefix = str(tmp_path / f'p{len(os.listdir(tmp_path))}')
    mxnet_pack(prefix, [label], [jpeg], label_vector=vector)
    assert read_all(prefix) == ('flat', [label], label + 1, [jpeg])


# ---------------------------------------------------------------------------
# Round trips and layouts

@SETTINGS
@given(counts=st.lists(st.integers(1, 3), max_size=6),
       gaps=st.lists(st.integers(1, 3), min_size=6, max_size=6),
       layout=st.sampled_from(recordio.LAYOUTS), vector=st.booleans())
def test_round_trip(counts, gaps, layout, vector, tmp_path):
    labels = []  # grouped and increasing, as InsightFace's builder needs
    for count, gap in zip(counts, gaps):
        labels += [(labels[-1] if labels else -1) + gap] * count
    jpegs = [JPEGS[i % 7] for i in range(len(labels))]
    prefix = str(tmp_path / f'p{len(os.listdir(tmp_path))}')
    num = write_pack(prefix, zip(labels, jpegs), layout, vector)
    assert num == len(labels)
    num_classes = max(labels) + 1 if labels else 0
    assert read_all(prefix) == (layout, labels, num_classes, jpegs)


def test_vector_labels_keep_their_identity(tmp_path):
    """Newer packs: a label vector whose first entry is the identity."""
    prefix = str(tmp_path / 'pack')
    vectors = [(3, 0.5, 7), (1, 2.25, 0)]
    write_pack(prefix, zip(vectors, JPEGS), 'flat')
    rec = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec', 'r')
    header, _ = mx.recordio.unpack(rec.read_idx(1))
    assert header.label.tolist() == [1, 2.25, 0]
    rec.close()
    with PackReader(prefix) as reader:
        assert reader.layout == 'flat' and reader.labels.tolist() == [3, 1]
        assert reader.num_classes == 4


def test_key_zero_image_with_vector_label_is_flat(tmp_path):
    """InsightFace's newer builder starts images at key 0; with a label
    vector, key 0 has a flag > 0 yet is an image, not a header."""
    prefix = str(tmp_path / 'pack')
    mxnet_pack(prefix, LABELS, JPEGS, 'flat', label_vector=True)
    with PackReader(prefix) as reader:
        assert reader.layout == 'flat' and len(reader) == len(LABELS)


def test_insightface_header_sets_images_and_classes(tmp_path):
    prefix = str(tmp_path / 'pack')
    write_pack(prefix, zip(LABELS, JPEGS), 'insightface')
    with PackReader(prefix) as reader:
        assert reader.keys.tolist() == list(range(1, len(LABELS) + 1))
        # labels 0, 1, 2, 5: four identity records, six classes
        assert reader.num_classes == max(LABELS) + 1


def test_insightface_layout_needs_grouped_increasing_labels(tmp_path):
    with pytest.raises(ValueError, match='label 0 after label 1'):
        write_pack(str(tmp_path / 'p'), zip([0, 1, 0], JPEGS), 'insightface')
    assert write_pack(str(tmp_path / 'q'), zip([0, 1, 0], JPEGS)) == 3


@pytest.mark.parametrize('label', [-1, 0.5, 2**24, float('nan'), 'a', ()])
def test_writer_refuses_bad_labels(tmp_path, label):
    with pytest.raises(ValueError, match='image 0'):
        write_pack(str(tmp_path / 'p'), [(label, JPEGS[0])])


def test_writer_refuses_non_jpeg_and_huge_claims(tmp_path):
    with pytest.raises(ValueError, match='not a JPEG'):
        write_pack(str(tmp_path / 'p'), [(0, b'GIF89a' + bytes(100))])
    with pytest.raises(ValueError, match='20000x20000'):
        write_pack(str(tmp_path / 'p'), [(0, claim_size(JPEGS[0], 20000))])


def test_writer_closes_files_when_records_fail(tmp_path):
    def records():
        yield 0, JPEGS[0]
        raise RuntimeError('source failed')

    before = len(os.listdir('/proc/self/fd'))
    with pytest.raises(RuntimeError, match='source failed'):
        write_pack(str(tmp_path / 'p'), records())
    assert len(os.listdir('/proc/self/fd')) == before


@pytest.mark.parametrize('layout', recordio.LAYOUTS)
def test_empty_pack(tmp_path, layout):
    prefix = str(tmp_path / 'empty')
    assert write_pack(prefix, [], layout) == 0
    with PackReader(prefix) as reader:
        assert len(reader) == 0 and reader.num_classes == 0
        assert reader.labels.dtype == onp.int64
        with pytest.raises(IndexError):
            reader.jpeg(0)


# ---------------------------------------------------------------------------
# The reader only reads

@pytest.fixture
def pack(tmp_path):
    prefix = str(tmp_path / 'pack')
    write_pack(prefix, zip(LABELS, JPEGS), 'insightface')
    return prefix


def test_jpegs_are_read_only_arrays(pack):
    with PackReader(pack) as reader:
        view = reader.jpeg(0)
        assert view.dtype == onp.uint8 and not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 0
    assert bytes(view) == JPEGS[0]  # still valid after close
    with pytest.raises(ValueError, match='closed'):
        reader.jpeg(0)


def test_reader_never_modifies_the_files(pack):
    before = file_state(pack)
    with PackReader(pack) as reader:
        for i in range(len(reader)):
            cv2.imdecode(reader.jpeg(i), cv2.IMREAD_COLOR)
    patch(pack, 0, b'\0')  # damage it, then read again
    damaged = file_state(pack)
    with pytest.raises(PackError):
        PackReader(pack)
    assert file_state(pack) == damaged != before


def test_image_size_is_checked(pack):
    with pytest.raises(PackError, match=r'record 1 at byte 0: .*16x16, '
                                        r'expected 8x12'):
        PackReader(pack, image_size=(12, 8))


# ---------------------------------------------------------------------------
# Damaged index

@pytest.mark.parametrize('line, problem', [
    ('0\t-8', 'negative offset'),
    ('-1\t0', 'negative key'),
    ('0\tabc', "offset 'abc' is not an integer"),
    ('0 0', 'expected "key<TAB>offset"'),
    ('', 'expected "key<TAB>offset"'),
    ('0\t1.5', "offset '1.5' is not an integer"),
    ('0\t0\t0', 'expected "key<TAB>offset"'),
    ('0\t%d' % 10**30, 'offset .* is not an integer below'),
])
def test_garbage_index_lines(pack, line, problem):
    lines = open(pack + '.idx').read().splitlines()
    lines[3] = line
    open(pack + '.idx', 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(PackError, match=f'pack.idx, line 4: {problem}'):
        recordio.read_index(pack + '.idx')
    with pytest.raises(PackError, match='line 4'):
        PackReader(pack)


def test_duplicate_keys(pack):
    lines = open(pack + '.idx').read().splitlines()
    lines[5] = '2\t' + lines[5].split('\t')[1]
    open(pack + '.idx', 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(PackError, match=r'line 6: key 2 again \(first on '
                                        r'line 2\)'):
        PackReader(pack)


def test_offset_past_the_end(pack):
    size = os.path.getsize(pack + '.rec')
    with open(pack + '.idx', 'a') as f:
        f.write(f'99\t{size - 4}\n')
    with pytest.raises(PackError, match=f'line {len(LABELS) + 6}: offset '
                                        f'{size - 4} lies past the end'):
        recordio.read_index(pack + '.idx')


def test_index_reads_like_mxnet(pack):
    rec = mx.recordio.MXIndexedRecordIO(pack + '.idx', pack + '.rec', 'r')
    assert recordio.read_index(pack + '.idx') == list(rec.idx.items())
    rec.close()


def test_huge_index_refused_early(tmp_path):
    """A million keys for a 64-byte .rec: refused after 8 lines."""
    prefix = str(tmp_path / 'p')
    open(prefix + '.rec', 'wb').write(bytes(64))
    with open(prefix + '.idx', 'w') as f:
        f.write(''.join(f'{k}\t0\n' for k in range(1_000_000)))
    with pytest.raises(PackError, match='line 9: more records than the 64 '
                                        'bytes'):
        recordio.read_index(prefix + '.idx')


def test_endless_line_refused_early(pack):
    """An .idx of one 3 MB line is refused without holding the line."""
    with open(pack + '.idx', 'ab') as f:
        f.write(b'7' * (3 << 20))
    with pytest.raises(PackError, match=f'line {len(LABELS) + 6}: longer '
                                        'than 64 bytes'):
        recordio.read_index(pack + '.idx')


def test_records_that_overlap(pack):
    """Two keys at one offset would make one record count (and cost) twice."""
    lines = open(pack + '.idx').read().splitlines()
    lines[2] = '3\t' + lines[1].split('\t')[1]  # key 3 at key 2's offset
    open(pack + '.idx', 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(PackError, match='record 2 at byte .* runs into '
                                        'record 3'):
        PackReader(pack)


# ---------------------------------------------------------------------------
# Damaged records

def record_offset(prefix, key):
    return dict(recordio.read_index(prefix + '.idx'))[key]


def patch(prefix, pos, data):
    with open(prefix + '.rec', 'r+b') as f:
        f.seek(pos)
        f.write(data)


@SETTINGS
@given(cut=st.integers(0, 10_000))
def test_truncated_rec(cut, tmp_path):
    prefix = str(tmp_path / f'p{len(os.listdir(tmp_path))}')
    write_pack(prefix, zip(LABELS, JPEGS))
    index = recordio.read_index(prefix + '.idx')
    size = os.path.getsize(prefix + '.rec')
    cut = min(cut, size)
    os.truncate(prefix + '.rec', cut)
    if cut == size:
        assert len(PackReader(prefix)) == len(LABELS)
        return
    starts = [pos for _, pos in index]
    with pytest.raises(PackError) as error:
        PackReader(prefix)
    if any(pos + 8 > cut for pos in starts):  # the index points past the end
        line = next(i for i, pos in enumerate(starts, 1) if pos + 8 > cut)
        named = int(str(error.value).split('.idx, line ')[1].split(':')[0])
        # Either the first line whose record cannot start in the cut file, or
        # the first line past what the file could hold at 8 bytes a record
        # (counted while reading, before the offsets are checked).
        by_offset, by_count = line, cut // 8 + 1
        assert min(by_offset, by_count) <= named <= max(by_offset, by_count)
    else:  # the last record is cut short
        key, pos = index[-1]
        assert f'record {key} at byte {pos}: the file ends inside it' in \
            str(error.value)
        assert (error.value.key, error.value.offset) == (key, pos)


def test_wrong_magic(pack):
    pos = record_offset(pack, 3)
    patch(pack, pos, b'\0')
    with pytest.raises(PackError, match=f'pack.rec: record 3 at byte {pos}: '
                                        f'wrong magic number 0xced72300'):
        PackReader(pack)


@pytest.mark.parametrize('cflag', [2, 3, 4, 7])
def test_bad_continuation_flag(pack, cflag):
    pos = record_offset(pack, 2)
    length = struct.unpack_from('<I', open(pack + '.rec', 'rb').read(),
                                pos + 4)[0]
    patch(pack, pos + 4, struct.pack('<I', length | cflag << 29))
    with pytest.raises(PackError, match=f'record 2 at byte {pos}: '
                                        f'continuation flag {cflag}'):
        PackReader(pack)


def test_split_record_missing_its_end(tmp_path):
    prefix = str(tmp_path / 'p')
    write_pack(prefix, [(0, MAGIC_JPEG), (1, JPEGS[0])])
    second = record_offset(prefix, 1)
    # The split record's last part (flag 3) marked as a middle part (2):
    # the next record in the file is then taken as its continuation.
    data = open(prefix + '.rec', 'rb').read()
    pos = 8 + 32 + 8  # the third part of record 0
    assert struct.unpack_from('<I', data, pos + 4)[0] >> 29 == 3
    length = struct.unpack_from('<I', data, pos + 4)[0] & (1 << 29) - 1
    patch(prefix, pos + 4, struct.pack('<I', 2 << 29 | length))
    with pytest.raises(PackError, match='record 0 at byte 0: (continuation '
                                        f'flag 0 at byte {second}|runs into)'):
        PackReader(prefix)


@pytest.mark.parametrize('key, problem', [
    (4, 'runs into the next record'),
    (0, 'the file ends inside it')])  # key 0 is the last in the file
def test_length_claiming_500mb(pack, key, problem):
    """A length far beyond the file is refused without reading anything."""
    pos = record_offset(pack, key)
    patch(pack, pos + 4, struct.pack('<I', 500 << 20))
    with pytest.raises(PackError, match=f'record {key} at byte {pos}: '
                                        f'{problem}'):
        PackReader(pack)


def test_record_too_short_for_the_header(tmp_path):
    prefix = str(tmp_path / 'p')
    writer = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec',
                                           'w')
    writer.write_idx(0, mx.recordio.pack((0, 1, 0, 0), JPEGS[0]))
    writer.write_idx(1, b'0123456789')
    writer.close()
    pos = record_offset(prefix, 1)
    with pytest.raises(PackError, match=f'record 1 at byte {pos}: 10 bytes, '
                                        'too short for the 24-byte header'):
        PackReader(prefix)


@pytest.mark.parametrize('label', [-1.0, 0.5, float('nan'), float('inf'),
                                   2.0**24, 2e9, (2.5, 1)])
def test_bad_label(tmp_path, label):
    prefix = str(tmp_path / 'p')
    writer = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec',
                                           'w')
    writer.write_idx(0, mx.recordio.pack((0, 1, 0, 0), JPEGS[0]))
    writer.write_idx(1, mx.recordio.pack((0, label, 1, 0), JPEGS[1]))
    writer.close()
    pos = record_offset(prefix, 1)
    with pytest.raises(PackError, match=f'record 1 at byte {pos}: bad label'):
        PackReader(prefix)


def test_label_vector_longer_than_the_record(tmp_path):
    prefix = str(tmp_path / 'p')
    writer = mx.recordio.MXIndexedRecordIO(prefix + '.idx', prefix + '.rec',
                                           'w')
    writer.write_idx(0, struct.pack('<IfQQ', 10**9, 0, 0, 0) + JPEGS[0])
    writer.close()
    with pytest.raises(PackError, match='record 0 at byte 0: .* too short '
                                        'for the header and 1000000000'):
        PackReader(prefix)


def claim_size(jpeg, size):
    """Return `jpeg` with its frame header claiming size x size pixels."""
    pos = jpeg.index(b'\xff\xc0')
    return (jpeg[:pos + 5] + struct.pack('>HH', size, size)
            + jpeg[pos + 9:])


def test_jpeg_claiming_huge_size_refused_before_decoding(tmp_path):
    prefix = str(tmp_path / 'p')
    mxnet_pack(prefix, [0, 1], [JPEGS[0], claim_size(JPEGS[1], 20000)])
    pos = record_offset(prefix, 1)
    with pytest.raises(PackError, match=f'record 1 at byte {pos}: the header '
                                        'claims 20000x20000'):
        PackReader(prefix)


def test_damaged_insightface_header(pack):
    """Key 0 claims more images than the index lists."""
    pos = record_offset(pack, 0)
    patch(pack, pos + 8 + 24, struct.pack('<ff', 50, 60))
    with pytest.raises(PackError, match=f'record 0 at byte {pos}: '
                                        'InsightFace header record'):
        PackReader(pack)
    patch(pack, pos + 8 + 24, struct.pack('<ff', 3, 14))
    with pytest.raises(PackError, match='pack.idx: no key 13, which the '
                                        'header record'):
        PackReader(pack)


def test_damaged_identity_record(pack):
    first = len(LABELS) + 1
    pos = record_offset(pack, first)
    patch(pack, pos + 8 + 24, struct.pack('<ff', 5, 2))  # end before first
    with pytest.raises(PackError, match=f'record {first} at byte {pos}: '
                                        'identity record'):
        PackReader(pack)


# LABELS in InsightFace's layout: identity records at keys 9 to 12 with the
# image ranges (1, 4), (4, 5), (5, 7) and (7, 9).
@pytest.mark.parametrize('ranges,problem', [
    ({10: (3, 5)}, r'record 10 at byte \d+: identity record 1 \(images 3..4 '
                   r'of 1..8\) overlaps the one before'),
    ({10: (5, 5)}, 'identity record 1 .* leaves images 4..4 out'),
    ({12: (7, 8)}, 'identity record 3 .* is the last, yet images 8..8 follow'),
    ({9: (1, 5), 10: (5, 5)}, r'identity record 0 \(images 1..4 of 1..8\) '
                              r'holds images of labels 0 and 1'),
], ids=['overlap', 'gap', 'short', 'mixed labels'])
def test_identity_ranges_must_tile_the_images_by_label(pack, ranges,
                                                       problem):
    for key, (first, end) in ranges.items():
        patch(pack, record_offset(pack, key) + 8 + 24,
              struct.pack('<ff', first, end))
    with pytest.raises(PackError, match=problem):
        PackReader(pack)


def test_every_image_header_is_checked(tmp_path):
    """Same-encoder headers are recognized, yet a later odd one is caught."""
    image = onp.zeros((SIZE, SIZE, 3), onp.uint8)
    jpegs = [cv2.imencode('.jpg', image + i, [cv2.IMWRITE_JPEG_QUALITY, q])[1]
             .tobytes() for i, q in enumerate([95] * 5 + [60, 95])]
    jpegs.append(make_jpeg(0, size=SIZE + 4))
    prefix = str(tmp_path / 'p')
    write_pack(prefix, enumerate(jpegs))
    assert len(PackReader(prefix)) == len(jpegs)
    pos = record_offset(prefix, len(jpegs) - 1)
    with pytest.raises(PackError, match=f'record {len(jpegs) - 1} at byte '
                                        f'{pos}: image is 20x20, expected'):
        PackReader(prefix, (SIZE, SIZE))


@pytest.mark.parametrize('layout', recordio.LAYOUTS)
@pytest.mark.parametrize('cut', ['last line', 'first line', 'every line'])
def test_an_index_that_lost_lines_is_not_a_smaller_pack(tmp_path, layout, cut):
    prefix = str(tmp_path / 'p')
    write_pack(prefix, zip(LABELS, JPEGS), layout)
    lines = open(prefix + '.idx').read().splitlines(keepends=True)
    kept = {'last line': lines[:-1], 'first line': lines[1:],
            'every line': []}[cut]
    open(prefix + '.idx', 'w').write(''.join(kept))
    # InsightFace's header record lists its images: a lost one is named.
    named = layout == 'insightface' and cut == 'first line'
    with pytest.raises(PackError, match=r'p\.idx: no key 1, which the header'
                       if named else r'p\.rec: bytes \d+ to \d+ belong to '
                                     r'no record that .*p\.idx lists'):
        PackReader(prefix)


def test_an_index_line_the_layout_does_not_use_is_refused(pack):
    size = os.path.getsize(pack + '.rec')
    with open(pack + '.idx', 'a') as f:  # a key past the identity records
        f.write(f'{len(LABELS) + 20}\t{record_offset(pack, 1)}\n')
    with pytest.raises(PackError, match=f'line {len(LABELS) + 6}: key '
                                        f'{len(LABELS) + 20} is not a record'):
        PackReader(pack)
    assert os.path.getsize(pack + '.rec') == size


def test_a_pack_alone_cannot_claim_crops_beyond_a_face_crop(tmp_path):
    # Without property, the first image tells the crop size, and a batch
    # of those would cost gigabytes: 8000x8000 is a photo, not a crop.
    prefix = str(tmp_path / 'p')
    mxnet_pack(prefix, [0, 1], [claim_size(JPEGS[0], 8000),
                                claim_size(JPEGS[1], 8000)])
    with pytest.raises(PackError, match=r'record 0 at byte 0: the header '
                                        r'claims 8000x8000'):
        PackReader(prefix)
    with pytest.raises(ValueError, match='8000x8000'):
        write_pack(str(tmp_path / 'q'), [(0, claim_size(JPEGS[0], 8000))])


def test_a_rec_cut_short_while_read_is_an_error_not_a_crash(pack):
    # Through a memory map, the cut would kill the process with SIGBUS;
    # so the check runs in a child, and the child must report an error.
    script = (
        'import os, sys\n'
        'from d2l_face.recordio import PackReader, PackError\n'
        'reader = PackReader(sys.argv[1])\n'
        'os.truncate(sys.argv[1] + ".rec", 0)  # as another program might\n'
        'try:\n'
        '    bytes(reader.jpeg(1))\n'
        'except PackError as e:\n'
        '    print(e)\n')
    result = subprocess.run([sys.executable, '-c', script, pack],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'the file was cut short while it was read' in result.stdout
