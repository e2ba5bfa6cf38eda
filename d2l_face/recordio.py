"""Training sets packed in MXNet's RecordIO format, without MXNet.

A pack is two files: ``prefix.rec`` holds the records one after another and
``prefix.idx`` has one line ``key<TAB>byte offset`` per record. The byte
layout follows MXNet's writer (dmlc-core's ``RecordIOWriter``):

- every record starts at a multiple of 4 bytes with the magic number
  ``0xced7230a`` and a 32-bit word whose top 3 bits are a continuation flag
  and whose low 29 bits are the length of the data; zero bytes pad the data
  to a multiple of 4;
- wherever the magic number occurs in the data at a multiple of 4, the
  writer cuts the data there and drops those 4 bytes: the parts carry the
  flags 1 (first), 2 (middle) and 3 (last), and a reader puts the magic
  number back between them (flag 0 marks a record in one piece);
- the data of an image record starts with MXNet's ``IRHeader``, packed as
  ``'<IfQQ'`` (flag, label, id, id2). A flag of 0 means the label is the
  float in the header; a flag n > 0 means n float32 labels follow the header
  (and the header's label is 0). The JPEG bytes come last.

Two layouts of keys occur in practice, and :class:`PackReader` tells them
apart from the pack itself:

- *flat*: every record is an image (the chapter's packs, and InsightFace's
  newer ``python-package`` builder, which starts at key 0);
- *insightface*: InsightFace's ``RecBuilder`` (used for MS1M-V2/V3 and
  similar sets) writes the images at keys 1..N, then one record per identity
  at keys N+1.. whose label vector is the (first, end) range of its image
  keys, and last a header record at key 0 whose label vector is the (first,
  end) range of the identity records. Readers such as InsightFace's
  ``arcface_torch`` take images 1..first-1 when key 0 has a flag > 0.

A pack may come from anywhere, so the reader trusts nothing in it: damage is
reported as :class:`PackError` naming the file, the record and the byte, and
memory stays bounded by the size of the files.
"""
import mmap
import os
import re
import stat
import struct

import numpy as onp

from d2l_face import formats

MAGIC = 0xced7230a
_MAGIC_BYTES = struct.pack('<I', MAGIC)
_LREC = struct.Struct('<II')             # magic, continuation flag | length
_HEADER = struct.Struct('<IfQQ')         # MXNet's IRHeader
_LENGTH_MASK = (1 << 29) - 1             # the low 29 bits hold the length
MAX_RECORD_BYTES = _LENGTH_MASK          # dmlc refuses records of 2**29 bytes
# Labels and keys are stored as float32, exact for integers up to 2**24.
_FLOAT_EXACT = 1 << 24
# Labels index a class weight matrix; above 2**24 float32 skips integers.
_MAX_LABEL = _FLOAT_EXACT
LAYOUTS = ('flat', 'insightface')


class PackError(ValueError):
    """A damaged or inconsistent pack; the message names file, record and byte.

    `path`, `key` and `offset` hold what the message names (None where the
    problem is not tied to one record)."""

    def __init__(self, message, path=None, key=None, offset=None):
        super().__init__(message)
        self.path, self.key, self.offset = path, key, offset


def _damaged(path, key, offset, problem):
    return PackError(f'{path}: record {key} at byte {offset}: {problem}',
                     path, key, offset)


def _open_regular(path):
    """Open `path` for reading, refusing FIFOs and devices without blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PackError(f'{path}: not a regular file', path)
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise


def _rec_path(idx_path):
    return os.path.splitext(idx_path)[0] + '.rec'


# ---------------------------------------------------------------------------
# The index

# Lines exactly as MXNet writes them: 'key\toffset\n' (a '\r' tolerated).
# 18 digits keep every value inside int64.
_IDX_LINES = re.compile(rb'(?:[0-9]{1,18}\t[0-9]{1,18}\r?\n)*')
_IDX_CHUNK = 1 << 20
_IDX_MAX_LINE = 64


def _idx_line_problem(line):
    """Say what is wrong with one line of an .idx file."""
    fields = line.rstrip(b'\r\n').split(b'\t')
    if len(fields) != 2:
        return f'expected "key<TAB>offset", got {line[:40]!r}'
    for name, field in zip(('key', 'offset'), fields):
        if field.startswith(b'-') and field[1:].isdigit():
            return f'negative {name} {field.decode()}'
        if not (field.isdigit() and len(field) <= 18):
            text = field[:40].decode('ascii', 'replace')
            return f'{name} {text!r} is not an integer below 10**18'
    return f'cannot read {line[:40]!r}'


def _idx_blocks(f, idx_path):
    """Yield the .idx file in blocks of whole lines (the last one ended)."""
    rest, num_lines = b'', 0
    while True:
        chunk = f.read(_IDX_CHUNK)
        if not chunk:
            if rest:
                yield rest if rest.endswith(b'\n') else rest + b'\n'
            return
        data = rest + chunk
        cut = data.rfind(b'\n') + 1
        if cut == 0 and len(data) > _IDX_MAX_LINE:
            raise PackError(f'{idx_path}, line {num_lines + 1}: longer than '
                            f'{_IDX_MAX_LINE} bytes', idx_path)
        rest = data[cut:]
        if cut:
            num_lines += data.count(b'\n', 0, cut)
            yield data[:cut]


def _parse_idx_block(block, idx_path, first_line):
    """Return the (key, offset) rows of a block of .idx lines."""
    if not _IDX_LINES.fullmatch(block):
        for n, line in enumerate(block.splitlines(True), first_line):
            if not _IDX_LINES.fullmatch(line):
                raise PackError(f'{idx_path}, line {n}: '
                                f'{_idx_line_problem(line)}', idx_path)
    return onp.array(block.split(), dtype=onp.int64).reshape(-1, 2)


def _read_index_arrays(idx_path, rec_size=None):
    """Return the keys and offsets of an .idx file as int64 arrays."""
    if rec_size is None:
        rec_size = os.stat(_rec_path(idx_path)).st_size
    # Every record takes at least 8 bytes of the .rec file; more lines than
    # that are refused as soon as they are seen, before they cost memory.
    max_records = rec_size // 8
    tables, num_lines = [], 0
    with _open_regular(idx_path) as f:
        for block in _idx_blocks(f, idx_path):
            tables.append(_parse_idx_block(block, idx_path, num_lines + 1))
            num_lines += len(tables[-1])
            if num_lines > max_records:
                raise PackError(
                    f'{idx_path}, line {max_records + 1}: more records than '
                    f'the {rec_size} bytes of {_rec_path(idx_path)} can hold',
                    idx_path)
    table = onp.concatenate(tables) if tables else onp.empty((0, 2), onp.int64)
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    _check_index(idx_path, keys, offsets, rec_size)
    return keys, offsets


def _check_index(idx_path, keys, offsets, rec_size):
    past = onp.flatnonzero(offsets + 8 > rec_size)
    if len(past):
        line = past[0] + 1
        raise PackError(f'{idx_path}, line {line}: offset {offsets[past[0]]} '
                        f'lies past the end of the {rec_size}-byte '
                        f'{_rec_path(idx_path)}', idx_path)
    order = onp.argsort(keys, kind='stable')
    same = onp.flatnonzero(keys[order][1:] == keys[order][:-1])
    if len(same):
        first, again = order[same].tolist(), order[same + 1].tolist()
        line = min(again)  # the first line that repeats an earlier key
        earlier = first[again.index(line)]
        raise PackError(f'{idx_path}, line {line + 1}: key {keys[line]} '
                        f'again (first on line {earlier + 1})', idx_path)


def read_index(idx_path, rec_size=None):
    """Return the (key, offset) pairs of an .idx file, in file order.

    Refuses lines that are not two non-negative integers, duplicate keys and
    offsets past the end of the .rec file (of `rec_size` bytes; by default
    the size of the .rec file next to the index)."""
    keys, offsets = _read_index_arrays(idx_path, rec_size)
    return list(zip(keys.tolist(), offsets.tolist()))


# ---------------------------------------------------------------------------
# Writing

def _frame(data):
    """Return `data` framed as one RecordIO record, as dmlc-core writes it."""
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f'a record holds at most {MAX_RECORD_BYTES} bytes, '
                         f'not {len(data)}')
    pieces, start, flag = [], 0, 1
    pos = data.find(_MAGIC_BYTES)
    while pos >= 0:
        if pos % 4 == 0:  # the writer only looks at 4-byte boundaries
            pieces += [_LREC.pack(MAGIC, flag << 29 | pos - start),
                       data[start:pos]]
            start, flag = pos + 4, 2
            pos = data.find(_MAGIC_BYTES, start)
        else:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    last = 3 if start else 0
    pieces += [_LREC.pack(MAGIC, last << 29 | len(data) - start),
               data[start:], bytes(-len(data) % 4)]
    return b''.join(pieces)


def _pack_record(key, label, data=b'', id2=0):
    """Return an IRHeader record: `label` a number, or a tuple (a vector)."""
    if isinstance(label, tuple):
        head = _HEADER.pack(len(label), 0.0, key, id2)
        head += struct.pack(f'<{len(label)}f', *label)
    else:
        head = _HEADER.pack(0, label, key, id2)
    return head + bytes(data)


def _image_label(label, label_vector, where):
    """Return the identity of a record's label and the label to write."""
    if isinstance(label, (tuple, list, onp.ndarray)):
        values = tuple(float(x) for x in onp.asarray(label).ravel())
        if not values:
            raise ValueError(f'{where}: empty label vector')
        identity = values[0]
    else:
        identity = label
        values = None
    try:
        identity = float(identity)
    except (TypeError, ValueError):
        raise ValueError(f'{where}: label {label!r} is not a number') from None
    if label_vector and values is None:
        values = (identity,)
    if not identity.is_integer() or not 0 <= identity < _FLOAT_EXACT:
        raise ValueError(f'{where}: the identity label must be an integer in '
                         f'[0, 2**24) (stored exactly as float32), '
                         f'not {identity!r}')
    return int(identity), values if values is not None else identity


class _Writer:
    """Appends framed records to an open .rec and their lines to the .idx."""

    def __init__(self, rec, idx):
        self.rec, self.idx, self.pos = rec, idx, 0

    def write(self, key, data):
        framed = _frame(data)
        self.rec.write(framed)
        self.idx.write(b'%d\t%d\n' % (key, self.pos))
        self.pos += len(framed)


def write_pack(prefix, records, layout='flat', label_vector=False):
    """Write (label, JPEG bytes) pairs to prefix.rec and prefix.idx.

    `layout` 'flat' puts image i at key i; 'insightface' writes as
    InsightFace's RecBuilder does: images at keys 1..N, one record per
    identity, then the header record at key 0 (the images of an identity
    must then come together, identities in increasing order). A label is an
    integer, or a sequence whose first entry is the identity;
    `label_vector=True` writes integer labels as one-entry vectors too.
    Records stream through: memory stays bounded. The files are written in
    place; write under temporary names and rename to publish a pack.
    Returns the number of images written."""
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {LAYOUTS}, not {layout!r}')
    insightface = layout == 'insightface'
    key = 1 if insightface else 0
    identities = []  # [first key, end key, label]: InsightFace's id records
    with open(prefix + '.rec', 'wb') as rec, \
            open(prefix + '.idx', 'wb') as idx:
        writer = _Writer(rec, idx)
        for label, jpeg in records:
            where = f'{prefix}.rec: image {key - insightface}'
            identity, label = _image_label(label, label_vector, where)
            formats.check_jpeg_header(jpeg, where,
                                      max_pixels=formats.MAX_CROP_PIXELS)
            if insightface:
                _extend_identities(identities, identity, key, where)
            writer.write(key, _pack_record(key, label, jpeg))
            key += 1
        num_images = key - insightface
        if insightface:
            _write_identity_records(writer, identities, key)
    return num_images


def _extend_identities(identities, identity, key, where):
    if key >= _FLOAT_EXACT - 1:
        raise ValueError(f'{where}: InsightFace\'s layout stores keys as '
                         f'float32, exact only below 2**24')
    if identities and identities[-1][2] == identity:
        identities[-1][1] = key + 1
    elif not identities or identities[-1][2] < identity:
        identities.append([key, key + 1, identity])
    else:
        raise ValueError(f'{where}: label {identity} after label '
                         f'{identities[-1][2]}; InsightFace\'s layout needs '
                         f'the images of an identity together, labels '
                         f'increasing')


def _write_identity_records(writer, identities, first):
    key = first
    if first + len(identities) >= _FLOAT_EXACT:
        raise ValueError('InsightFace\'s layout stores keys as float32, '
                         'exact only below 2**24')
    for begin, end, _ in identities:
        writer.write(key, _pack_record(key, (begin, end)))
        key += 1
    # Written last, as RecBuilder does; its id2 is 1 there.
    writer.write(0, _pack_record(0, (first, key), id2=1))


# ---------------------------------------------------------------------------
# Reading

class PackReader:
    """The images and labels of a RecordIO pack, read-only.

    The layout ('flat' or 'insightface') is read from the pack: a key 0
    whose flag is > 0 and that carries no image is InsightFace's header
    record. Every image record is parsed and its JPEG header checked (at
    size `image_size` (h, w) when given) when the reader is created, through
    a memory map of the .rec file. The map is released then: images are
    read with positional reads, so that a file another program cuts short
    meanwhile gives an error rather than the SIGBUS that kills a process
    touching a vanished page of a map."""

    def __init__(self, prefix, image_size=None):
        self.prefix = prefix
        self.rec_path, self.idx_path = prefix + '.rec', prefix + '.idx'
        self._map, self._joined, self._closed = None, {}, False
        self._file = _open_regular(self.rec_path)
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            if self._size:
                self._map = mmap.mmap(self._file.fileno(), 0,
                                      access=mmap.ACCESS_READ)
            self._open(image_size)
        except BaseException:
            self.close()
            raise
        self._release_map()

    def _open(self, image_size):
        buf = self._map if self._map is not None else b''
        self._bytes = onp.frombuffer(buf, onp.uint8)
        keys, offsets = _read_index_arrays(self.idx_path, self._size)
        self._keys, self._offsets = keys, offsets
        header = self._header_record()
        if header is None:
            self.layout, rows, num_ids = 'flat', onp.arange(len(keys)), 0
            extra = head = onp.empty(0, onp.int64)
        else:
            self.layout = 'insightface'
            rows, extra = self._insightface_rows(*header)
            num_ids, head = len(extra), onp.flatnonzero(keys == 0)
        everything = onp.concatenate([rows, extra, head])
        parsed = self._parse(everything)
        self._check_whole(everything, parsed['stop'])
        n = len(rows)
        if num_ids:
            self._check_identities(extra, parsed, n, header)
        self.keys = keys[rows]
        self.labels = self._image_labels(rows, parsed, n)
        if num_ids:
            self._check_identity_ranges(extra, parsed, n)
        self._begin, self._end = parsed['begin'][:n], parsed['end'][:n]
        self._joined = {i: parsed['joined'][i]
                        for i in parsed['joined'] if i < n}
        self.num_classes = max(int(self.labels.max()) + 1 if n else 0, num_ids)
        self.num_identity_records = num_ids
        self._check_jpegs(offsets[rows], image_size)

    def _check_whole(self, rows, stops):
        """Refuse an index that misses records: its records must fill the .rec.

        A writer puts each record right after the one before, so records
        that leave bytes uncovered, or an index with lines the layout does
        not use, mean a cut or damaged index, not a smaller pack."""
        if len(rows) != len(self._keys):
            unused = onp.setdiff1d(onp.arange(len(self._keys)), rows)[0]
            raise PackError(f'{self.idx_path}, line {unused + 1}: key '
                            f'{self._keys[unused]} is not a record of this '
                            f'{self.layout} pack', self.idx_path)
        order = onp.argsort(self._offsets[rows], kind='stable')
        found = onp.append(self._offsets[rows][order], self._size)
        expected = onp.append(0, stops[order])  # each record starts where
        gap = onp.flatnonzero(found != expected)  # the one before stopped
        if len(gap):
            a, b = int(expected[gap[0]]), int(found[gap[0]])
            raise PackError(f'{self.rec_path}: bytes {a} to {b} belong to no '
                            f'record that {self.idx_path} lists (is the index '
                            f'cut short or damaged?)', self.rec_path)

    # -- layout ------------------------------------------------------------

    def _rows_of(self, wanted):
        """Return the index rows of keys `wanted`, and a key that is absent."""
        order = onp.argsort(self._keys)
        found = order[onp.minimum(onp.searchsorted(self._keys, wanted,
                                                 sorter=order),
                                 len(order) - 1)]
        absent = onp.flatnonzero(self._keys[found] != wanted)
        return found, (int(wanted[absent[0]]) if len(absent) else None)

    def _header_record(self):
        """Return (offset, first, end) of InsightFace's header, or None."""
        rows = onp.flatnonzero(self._keys == 0)
        if not len(rows):
            return None
        offset = int(self._offsets[rows[0]])
        rec = self._parse(rows)
        flag, payload = int(rec['flags'][0]), rec['end'][0] - rec['begin'][0]
        if 0 in rec['joined']:
            payload = len(rec['joined'][0])
        if flag == 0 or payload > 0:
            return None  # key 0 is an image (a flat pack)
        first, end = rec['label0'][0], rec['label1'][0]
        if flag < 2 or not _is_range(first, end, 1, len(self._keys) + 1):
            raise _damaged(self.rec_path, 0, offset,
                           f'InsightFace header record with label '
                           f'{(first, end)[:flag]}, expected the (first, end) '
                           f'keys of the identity records')
        return offset, int(first), int(end)

    def _insightface_rows(self, offset, first, end):
        """Rows of the images 1..first-1 and identity records first..end-1."""
        wanted = onp.arange(1, end, dtype=onp.int64)
        rows, missing = self._rows_of(wanted)
        if missing is not None:
            raise PackError(
                f'{self.idx_path}: no key {missing}, which the header record '
                f'(key 0 at byte {offset} of {self.rec_path}) lists among '
                f'the images 1..{first - 1} and identities {first}..{end - 1}',
                self.idx_path, 0, offset)
        return rows[:first - 1], rows[first - 1:]

    def _check_identities(self, rows, parsed, n, header):
        first = header[1]
        for j, row in enumerate(rows.tolist(), n):
            a, b = parsed['label0'][j], parsed['label1'][j]
            if parsed['flags'][j] < 2 or not _is_range(a, b, 1, first):
                raise _damaged(self.rec_path, int(self._keys[row]),
                               int(self._offsets[row]),
                               f'identity record without a (first, end) '
                               f'range of image keys in 1..{first - 1}')

    def _check_identity_ranges(self, rows, parsed, n):
        """Refuse identity ranges that overlap, leave gaps, or disagree with
        the labels: in order, they cover images 1..n once, each holds one
        label, and the labels increase, as InsightFace's RecBuilder writes
        them (its sampler draws an identity's images from its range)."""
        ids = slice(n, n + len(rows))  # after them: the header record
        first = parsed['label0'][ids].astype(onp.int64)
        end = parsed['label1'][ids].astype(onp.int64)
        stops = onp.concatenate([[1], end[:-1]])  # where each should start
        for j in onp.flatnonzero(first != stops).tolist():
            problem = ('overlaps the one before' if first[j] < stops[j] else
                       f'leaves images {stops[j]}..{first[j] - 1} out')
            self._bad_identity(rows, j, n, first[j], end[j], problem)
        if end[-1] != n + 1:
            self._bad_identity(rows, len(end) - 1, n, first[-1], end[-1],
                               f'is the last, yet images {end[-1]}..{n} '
                               f'follow it')
        owner = onp.repeat(onp.arange(len(first)), end - first)
        mixed = onp.flatnonzero((owner[1:] == owner[:-1]) &
                               (self.labels[1:] != self.labels[:-1]))
        if len(mixed):
            j, k = int(owner[mixed[0]]), int(mixed[0]) + 1
            self._bad_identity(rows, j, n, first[j], end[j],
                               f'holds images of labels {self.labels[k - 1]} '
                               f'and {self.labels[k]}')
        own = self.labels[first[first < end] - 1]
        if onp.any(own[1:] <= own[:-1]):
            j = int(onp.flatnonzero(first < end)[
                onp.flatnonzero(own[1:] <= own[:-1])[0] + 1])
            self._bad_identity(rows, j, n, first[j], end[j],
                               f'holds label {self.labels[first[j] - 1]}, '
                               f'not above the label of the one before')

    def _bad_identity(self, rows, j, n, first, end, problem):
        row = rows[j]
        raise _damaged(self.rec_path, int(self._keys[row]),
                       int(self._offsets[row]),
                       f'identity record {j} (images {first}..{end - 1} of '
                       f'1..{n}) {problem}')

    # -- records -----------------------------------------------------------

    def _parse(self, rows):
        """Parse the records at `rows` of the index into arrays.

        Returns a dict: `flags`, `label0` and `label1` (the first two labels,
        NaN where absent), `begin` and `end` of the payload after the header
        and labels (-1 for records MXNet split: their payload is a joined
        copy in `joined`, by position), and `stop`, the byte after the
        record."""
        offsets, n = self._offsets[rows], len(rows)
        out = {'flags': onp.zeros(n, onp.int64), 'joined': {},
               'label0': onp.full(n, onp.nan, onp.float32),
               'label1': onp.full(n, onp.nan, onp.float32),
               'begin': onp.full(n, -1, onp.int64),
               'end': onp.full(n, -1, onp.int64),
               'stop': onp.zeros(n, onp.int64)}
        if not n:
            return out
        ok = self._parse_fast(offsets, out)
        # Records in order of position: each may only reach the next one,
        # so walking split or damaged records reads each byte at most once.
        order = onp.argsort(offsets, kind='stable')
        limits = onp.append(offsets[order][1:], self._size)
        limit_of = onp.empty(n, onp.int64)
        limit_of[order] = limits
        for i in onp.flatnonzero(~ok).tolist():
            self._parse_slow(rows[i], i, int(limit_of[i]), out)
        stops = out['stop'][order]
        overlap = onp.flatnonzero(stops[:-1] > offsets[order][1:])
        if len(overlap):
            a, b = order[overlap[0]], order[overlap[0] + 1]
            raise _damaged(self.rec_path, int(self._keys[rows[a]]),
                           int(offsets[a]), f'runs into record '
                           f'{self._keys[rows[b]]} at byte {offsets[b]}')
        return out

    def _parse_fast(self, offsets, out):
        """Parse, all at once, the records that are in one piece and sound.

        Returns a mask of the records done; the rest go to `_parse_slow`,
        which also says what is wrong."""
        words = onp.frombuffer(self._bytes, '<u4', count=self._size // 4)
        aligned = offsets % 4 == 0
        at = offsets // 4

        def word(k):  # clipped: used only where the record holds it
            return words.take(at + k, mode='clip')

        lrec = word(1).astype(onp.int64)
        length, cflag = lrec & _LENGTH_MASK, lrec >> 29
        flags = word(2).astype(onp.int64)
        need = 24 + 4 * flags
        stop = offsets + 8 + (length + 3) // 4 * 4
        ok = (aligned & (word(0) == MAGIC) & (cflag == 0) & (length >= need)
              & (stop <= self._size))
        # flag 0: the label is in the header; flag n: the n labels follow it.
        label0 = onp.where(flags == 0, word(3).view('<f4'), word(8).view('<f4'))
        label1 = onp.where(flags >= 2, word(9).view('<f4'), onp.nan)
        out['flags'][ok], out['stop'][ok] = flags[ok], stop[ok]
        out['label0'][ok], out['label1'][ok] = label0[ok], label1[ok]
        out['begin'][ok] = (offsets + 8 + need)[ok]
        out['end'][ok] = (offsets + 8 + length)[ok]
        return ok

    def _parse_slow(self, row, i, limit, out):
        """Parse one record byte by byte, joining parts; raise if damaged."""
        key, start = int(self._keys[row]), int(self._offsets[row])
        parts, pos, total = [], start, 0
        while True:
            if pos + 8 > limit:
                raise self._cut_short(key, start, pos, limit)
            magic, lrec = _LREC.unpack_from(self._map, pos)
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if magic != MAGIC:
                raise _damaged(self.rec_path, key, start,
                               f'wrong magic number 0x{magic:08x} at byte '
                               f'{pos} (expected 0x{MAGIC:08x})')
            if cflag not in ((2, 3) if parts else (0, 1)):
                raise _damaged(self.rec_path, key, start,
                               f'continuation flag {cflag} at byte {pos}, '
                               f'expected {"2 or 3" if parts else "0 or 1"}')
            if pos + 8 + (length + 3) // 4 * 4 > limit:
                raise self._cut_short(key, start, pos, limit, length)
            total += length + 4 * bool(parts)
            if total > MAX_RECORD_BYTES:
                raise _damaged(self.rec_path, key, start, 'longer than '
                               f'the {MAX_RECORD_BYTES} bytes RecordIO allows')
            parts.append((pos + 8, pos + 8 + length))
            pos += 8 + (length + 3) // 4 * 4
            if cflag in (0, 3):
                break
        out['stop'][i] = pos
        if len(parts) == 1:
            data, base = memoryview(self._map)[parts[0][0]:parts[0][1]], \
                parts[0][0]
        else:  # put back the magic numbers the writer cut out
            data = _MAGIC_BYTES.join(self._map[a:b] for a, b in parts)
            base = None
        self._parse_header(key, start, data, base, i, out)

    def _cut_short(self, key, start, pos, limit, length=None):
        if limit < self._size:
            where = 'runs into the next record'
        else:
            where = 'the file ends inside it'
        claim = '' if length is None else f', a part of {length} bytes'
        return _damaged(self.rec_path, key, start,
                        f'{where} (at byte {pos}{claim}; {limit - pos} bytes '
                        f'left before byte {limit})')

    def _parse_header(self, key, start, data, base, i, out):
        if len(data) < _HEADER.size:
            raise _damaged(self.rec_path, key, start, f'{len(data)} bytes, '
                           f'too short for the {_HEADER.size}-byte header')
        flag, label, _, _ = _HEADER.unpack_from(data)
        need = _HEADER.size + 4 * flag
        if len(data) < need:
            raise _damaged(self.rec_path, key, start, f'{len(data)} bytes, '
                           f'too short for the header and {flag} labels')
        labels = onp.frombuffer(data, '<f4', min(flag, 2), _HEADER.size) \
            if flag else onp.array([label], onp.float32)
        out['flags'][i] = flag
        out['label0'][i] = labels[0]
        out['label1'][i] = labels[1] if len(labels) > 1 else onp.nan
        if base is None:
            out['joined'][i] = onp.frombuffer(data, onp.uint8, offset=need)
        else:
            out['begin'][i], out['end'][i] = base + need, base + len(data)

    def _image_labels(self, rows, parsed, n):
        labels = parsed['label0'][:n]
        bad = ~(onp.isfinite(labels) & (labels >= 0) & (labels < _MAX_LABEL))
        bad[~bad] = labels[~bad] != onp.floor(labels[~bad])
        if bad.any():
            i = int(onp.flatnonzero(bad)[0])
            raise _damaged(self.rec_path, int(self._keys[rows[i]]),
                           int(self._offsets[rows[i]]),
                           f'bad label {labels[i]!r}, expected an integer '
                           f'in [0, 2**24)')
        return labels.astype(onp.int64)

    def _check_jpegs(self, offsets, image_size):
        """Check the header of every JPEG, refusing huge or wrong sizes.

        The JPEGs of a pack mostly come from one encoder and agree byte for
        byte up to the end of the frame header, where the size is: an image
        that starts with the same bytes as one already checked passes the
        same check, so only the first of each kind is parsed."""
        checked = {}  # length of a header -> the headers of that length seen
        spans = zip(self._begin.tolist(), self._end.tolist())
        for i, (begin, end) in enumerate(spans):
            if begin >= 0 and any(end - begin >= n and
                                  self._map[begin:begin + n] in heads
                                  for n, heads in checked.items()):
                continue
            data = self.jpeg(i)
            where = (f'{self.rec_path}: record {self.keys[i]} at byte '
                     f'{offsets[i]}')
            try:
                formats.check_jpeg_header(data, where, image_size,
                                          formats.MAX_CROP_PIXELS)
            except ValueError as e:
                raise PackError(str(e), self.rec_path, int(self.keys[i]),
                                int(offsets[i])) from None
            n = formats.jpeg_header_length(data)
            heads = checked.get(n, set())
            # Bounded, so that a pack of all different headers costs no more
            # than parsing each: few lengths to try, a few qualities each.
            if len(heads) < 256 and (n in checked or len(checked) < 4):
                checked[n] = heads | {data[:n].tobytes()}

    # -- access ------------------------------------------------------------

    def __len__(self):
        return len(self.labels)

    def jpeg(self, i):
        """Return the JPEG bytes of image `i` (a read-only uint8 array)."""
        if self._closed:
            raise ValueError(f'{self.rec_path}: the reader is closed')
        if not -len(self) <= i < len(self):
            raise IndexError(f'image {i} of {len(self)}')
        i %= len(self)
        begin, end = int(self._begin[i]), int(self._end[i])
        if begin < 0:
            return self._joined[i]
        if self._map is not None:  # while the reader opens the pack
            return self._bytes[begin:end]
        data = os.pread(self._file.fileno(), end - begin, begin)
        if len(data) != end - begin:
            raise PackError(f'{self.rec_path}: image {i} (bytes {begin} to '
                            f'{end}) is gone: the file was cut short while '
                            f'it was read', self.rec_path, int(self.keys[i]),
                            begin)
        return onp.frombuffer(data, onp.uint8)

    def _release_map(self):
        """Drop the memory map. Views from it keep it alive until they go."""
        self._bytes = onp.empty(0, onp.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still in use: freed with the last
                pass
            self._map = None

    def close(self):
        """Release the file."""
        self._closed = True
        self._joined = {}
        self._release_map()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f'PackReader({self.prefix!r}: {len(self)} images, '
                f'{self.num_classes} classes, {self.layout} layout)')


def check_num_classes(pack, num_classes=None):
    """Return the class count of `pack`, refusing a `num_classes` (from
    ``property``, say) that disagrees with it or exceeds ``MAX_CLASSES``.

    A pack's count is one more than its largest label, or, in InsightFace's
    layout, its number of identity records if that is more. The class count
    sizes the classification layer: a count the pack does not bear out
    would allocate memory for identities that do not exist."""
    if num_classes is None:
        num_classes = pack.num_classes
    if isinstance(num_classes, bool) or not isinstance(
            num_classes, (int, onp.integer)) or num_classes < 1 \
            or num_classes > formats.MAX_CLASSES:
        raise ValueError(f'{pack.rec_path}: the class count must be an '
                         f'integer in 1..{formats.MAX_CLASSES} (MAX_CLASSES), '
                         f'not {num_classes!r}')
    if num_classes != pack.num_classes:
        labels = (f'labels up to {int(pack.labels.max())}' if len(pack)
                  else 'no images')
        raise ValueError(f'{pack.rec_path}: {num_classes} classes claimed, '
                         f'but the pack holds {pack.num_classes} ({labels}, '
                         f'{pack.num_identity_records} identity records)')
    return int(num_classes)


def _is_range(first, end, low, high):
    """Whether `first` and `end` are integers, low <= first <= end <= high."""
    return (onp.isfinite(first) and onp.isfinite(end) and first == int(first)
            and end == int(end) and low <= first <= end <= high)
