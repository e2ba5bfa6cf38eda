"""d2l_face.binsets: InsightFace's .bin verification sets, as they come and as an attacker makes them.

A set written by us, by numpy or by Python 2 loads; a pickle that would run
code, a malformed structure, garbage, a small file that would cost gigabytes,
too many pairs and a FIFO are refused with BinFormatError.
"""
import os
import pickle
import random
import tempfile
import threading
import tracemalloc

import numpy as onp
import pytest
from hypothesis import event, given, settings, strategies as st

from d2l_face import binsets
from d2l_face.binsets import BinFormatError, load_bin_pairs, save_bin_pairs

# ---------------------------------------------------------------- round trips and refusals

BINS = [b'\xff\xd8jpeg-%d' % i for i in range(6)]
ISSAME = [True, False, True]


def test_bin_round_trip(tmp_path):
    path = tmp_path / 'lfw.bin'
    save_bin_pairs(path, BINS, [onp.bool_(s) for s in ISSAME])
    bins, issame = load_bin_pairs(path)
    assert bins == BINS and issame == ISSAME
    assert all(type(s) is bool for s in issame)
    assert os.listdir(tmp_path) == ['lfw.bin']


@pytest.mark.parametrize('protocol', [2, 4])
def test_bin_with_numpy_bools(tmp_path, protocol):
    # Protocol 2 also stores bytes through _codecs.encode.
    path = tmp_path / 'onp.bin'
    path.write_bytes(pickle.dumps((BINS, [onp.bool_(s) for s in ISSAME]), protocol))
    bins, issame = load_bin_pairs(path)
    assert bins == BINS and issame == ISSAME and all(type(s) is bool for s in issame)


def test_bin_written_by_python2(tmp_path):
    # What Python 2 writes for (['ab', 'cd'], [True]) with protocol 2: SHORT_BINSTRING.
    path = tmp_path / 'py2.bin'
    path.write_bytes(b'\x80\x02]q\x00(U\x02abq\x01U\x02cdq\x02e]q\x03\x88a\x86q\x04.')
    assert load_bin_pairs(path) == ([b'ab', b'cd'], [True])


class _OpenFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_malicious_bin_runs_nothing(tmp_path):
    # Proof that the construction works: plain pickle creates the file.
    proof = tmp_path / 'proof'
    pickle.loads(pickle.dumps(([_OpenFile(str(proof)), b'x'], [True])))
    assert proof.exists()
    victim = tmp_path / 'created-by-pickle'
    path = tmp_path / 'evil.bin'
    path.write_bytes(pickle.dumps(([_OpenFile(str(victim)), b'x'], [True])))
    with pytest.raises(BinFormatError, match='refusing to load the global'):
        load_bin_pairs(path)
    assert not victim.exists()


def test_a_key_nested_too_deep_for_cpython_is_refused_before_unpickling(tmp_path):
    # A dict key of 140,000 nested tuples: hashing it overflows the C stack
    # (a segmentation fault at about 130 KB of file). A .bin has no dict.
    path = tmp_path / 'deep.bin'
    path.write_bytes(b'\x80\x04}' + b')' + b'\x85' * 140_000 + b'Ns.')
    with pytest.raises(BinFormatError, match='opcode EMPTY_DICT'):
        load_bin_pairs(path)


@pytest.mark.parametrize('pickled', [{'a': 1}, {1, 2}, frozenset([1]),
                                     bytearray(b'x')])
def test_dicts_sets_and_objects_are_refused(tmp_path, pickled):
    path = tmp_path / 'x.bin'
    path.write_bytes(pickle.dumps(([b'a', b'b'], [pickled]), protocol=5))
    with pytest.raises(BinFormatError, match='opcode'):
        load_bin_pairs(path)


def test_memo_bomb_is_refused_cheaply(tmp_path):
    # Without the pre-scan, CPython would allocate a 32 GiB memo table here.
    path = tmp_path / 'bomb.bin'
    path.write_bytes(b'\x80\x02N' + b'r' + (2 ** 31).to_bytes(4, 'little') + b'.')
    with pytest.raises(BinFormatError, match='memo index'):
        load_bin_pairs(path)


@pytest.mark.parametrize('obj, problem', [
    ((BINS, ISSAME, None), 'pair'),
    ({'bins': BINS}, 'opcode EMPTY_DICT'),
    ([s.decode('latin1') for s in BINS], 'pair'),
    (([s.decode('latin1') for s in BINS], ISSAME), 'bins.0. has type str, expected bytes'),
    ((BINS[:-1], ISSAME), '5 images for 3 pairs'),
    ((BINS, [1, 0, 1]), 'issame.0. has type int, expected bool'),
    ((BINS[:5] + [b''], ISSAME), 'bins.5. is empty'),
    (([bytearray(b) for b in BINS], ISSAME), 'bytearray'),
    (([], []), 'no pairs'),
    ((BINS, 'TFT'), 'must be lists'),
    ((BINS, onp.array(ISSAME)), 'refusing to load the global'),
])
def test_bin_wrong_structure(tmp_path, obj, problem):
    path = tmp_path / 'bad.bin'
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(BinFormatError, match=problem) as info:
        load_bin_pairs(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize('data', [
    pickle.dumps((BINS, ISSAME), 4)[:-20],
    random.Random(1).randbytes(500),
    b'',
])
def test_bin_truncated_or_garbage(tmp_path, data):
    path = tmp_path / 'bad.bin'
    path.write_bytes(data)
    with pytest.raises(BinFormatError, match='not a valid verification pickle'):
        load_bin_pairs(path)


@pytest.mark.parametrize('bins, issame', [
    (BINS, [1, 0, 1]), (BINS[:4], ISSAME), (['text'] * 6, ISSAME), (BINS, []),
])
def test_save_validates(tmp_path, bins, issame):
    with pytest.raises(BinFormatError):
        save_bin_pairs(tmp_path / 'x.bin', bins, issame)
    assert os.listdir(tmp_path) == []



VALID_BIN = pickle.dumps((BINS[:2], [True]), 2)


@st.composite
def bin_files(draw):
    """Random bytes, or a valid file with a few bytes changed and maybe cut short."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(VALID_BIN)
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=100, deadline=None)
@given(bin_files())
def test_random_bin_files_load_or_refuse(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'x.bin')
        with open(path, 'wb') as f:
            f.write(data)
        try:
            bins, issame = load_bin_pairs(path)
        except BinFormatError:
            event('refused')
            return
        event('loaded')
        assert len(bins) == 2 * len(issame) > 0
        assert all(type(b) is bytes and b for b in bins)
        assert all(type(s) is bool for s in issame)


# ---------------------------------------------------------------- bounds
# ---------------------------------------------------------------- .bin bounds

def codecs_bomb(text=30_000, size=60_000):
    """A protocol-2 pickle that calls _codecs.encode on one memoized string again and again."""
    head = (b'\x80\x02]('  # PROTO 2, EMPTY_LIST, MARK
            b'c_codecs\nencode\nq\x00'  # GLOBAL, BINPUT 0
            b'X' + text.to_bytes(4, 'little') + b'a' * text +  # BINUNICODE
            b'X\x06\x00\x00\x00latin1\x86q\x01R')  # TUPLE2, BINPUT 1, REDUCE
    calls = (size - len(head)) // 5
    return head + b'h\x00h\x01R' * calls + b'e]\x88a\x86.'  # APPENDS, [True], TUPLE2


def dtype_bomb(code=30_000, size=60_000):
    """numpy.dtype called again and again with one memoized long code."""
    head = (b'\x80\x02](cnumpy\ndtype\nq\x00'
            b'B' + code.to_bytes(4, 'little') + b'b' * code + b'\x85q\x01R')
    calls = (size - len(head)) // 5
    return head + b'h\x00h\x01R' * calls + b'e]\x88a\x86.'


def shared_reference_bomb(pairs=10_000, image=1000):
    """One stored image named 2 * pairs times, two bytes per reference."""
    return (b'\x80\x02](B' + image.to_bytes(4, 'little') + b'\xff' * image + b'q\x00'
            + b'h\x00' * (2 * pairs - 1) + b'e]' + b'(' + b'\x88' * pairs + b'e\x86.')


@pytest.mark.parametrize('build, problem', [
    (codecs_bomb, 'outgrow'), (dtype_bomb, 'dtype code'),
    (shared_reference_bomb, 'repeats images by reference')])
def test_small_bin_cannot_cost_much_memory(tmp_path, build, problem):
    path = tmp_path / 'bomb.bin'
    path.write_bytes(build())
    assert path.stat().st_size <= 64_000
    tracemalloc.start()
    try:
        with pytest.raises(BinFormatError, match=problem):
            load_bin_pairs(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f'{peak / 2**20:.0f} MiB for a {path.stat().st_size}-byte file'


def test_shared_reference_bomb_is_well_formed_otherwise(tmp_path):
    """The bomb is refused for its size alone: the same file with distinct images loads."""
    path = tmp_path / 'ok.bin'
    path.write_bytes(pickle.dumps(([b'\xff' * 1000 + bytes([i]) for i in range(20)],
                                   [True] * 10), 2))
    assert len(load_bin_pairs(path)[0]) == 20


def test_saved_files_load_even_when_images_repeat(tmp_path):
    image = b'\xff' * 1000
    path = tmp_path / 'repeats.bin'
    save_bin_pairs(path, [image] * 40, [True] * 20)
    assert load_bin_pairs(path) == ([image] * 40, [True] * 20)


def test_image_count_is_capped(tmp_path):
    path = tmp_path / 'many.bin'
    bins = [i.to_bytes(3, 'little') for i in range(2 * (binsets.MAX_PAIRS + 1))]
    save_bin_pairs(path, bins[:22], [True] * 11)
    assert len(load_bin_pairs(path, max_pairs=11)[1]) == 11
    with pytest.raises(BinFormatError, match='11 pairs, more than the 10 allowed'):
        load_bin_pairs(path, max_pairs=10)
    path.write_bytes(pickle.dumps((bins, [True] * (binsets.MAX_PAIRS + 1)), 4))
    with pytest.raises(BinFormatError, match=f'more than the {binsets.MAX_PAIRS} allowed'):
        load_bin_pairs(path)
    with pytest.raises(BinFormatError, match='allowed'):
        save_bin_pairs(tmp_path / 'out.bin', bins, [True] * (binsets.MAX_PAIRS + 1))


def test_fifo_named_bin_is_refused_not_waited_on(tmp_path):
    path = tmp_path / 'lfw.bin'
    os.mkfifo(path)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(
        pytest.raises(BinFormatError, load_bin_pairs, path)), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), 'load_bin_pairs blocked on a FIFO'
    assert 'regular file' in str(outcome[0].value)
