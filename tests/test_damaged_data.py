"""Property-based tests: damaged datasets end in a result or a clear error.

Each case must either give a correct result or raise the documented error
type with a message that names the cause; never another exception, a hang
or an array of the wrong shape.
"""
import os
import shutil
import tempfile

import numpy as onp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2l_face import binsets, formats, packs, standin
from d2l_face import mxnet as d2lf

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope='module')
def small_standin(tmp_path_factory):
    root = tmp_path_factory.mktemp('standin')
    return standin.generate(str(root), num_classes=4, images_per_class=3,
                            num_val_pairs=4, num_wild=0)


@pytest.fixture(scope='module')
def a_jpeg(small_standin):
    with open(os.path.join(small_standin, '00000000', os.listdir(
            os.path.join(small_standin, '00000000'))[0]), 'rb') as f:
        return f.read()


@SETTINGS
@given(line=st.text(max_size=40))
def test_any_property_line(line, tmp_path):
    folder = tempfile.mkdtemp(dir=tmp_path)
    with open(os.path.join(folder, 'property'), 'w', encoding='utf-8',
              errors='surrogatepass') as f:
        f.write(line.replace('\r', '\n'))
    try:
        (h, w), n = d2lf.read_facerec_meta(folder)
    except ValueError as e:
        assert 'property' in str(e)
    else:
        first = line.replace('\r', '\n').split('\n')[0].strip()
        assert [n, h, w] == [int(x) for x in first.split(',')]
        assert min(n, h, w) >= 1


@SETTINGS
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_jpeg(data, tmp_path):
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), 'face.jpg')
    with open(path, 'wb') as f:
        f.write(data)
    try:
        image = d2lf.read_face_image(path, (112, 112))
    except ValueError as e:
        assert path in str(e)
    else:
        assert image.shape == (112, 112, 3) and image.dtype == onp.uint8


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_jpeg(cut, a_jpeg, tmp_path):
    cut = min(cut, len(a_jpeg))
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), 'face.jpg')
    with open(path, 'wb') as f:
        f.write(a_jpeg[:cut])
    if cut == len(a_jpeg):
        assert d2lf.read_face_image(path, (112, 112)).shape == (112, 112, 3)
    else:
        with pytest.raises(ValueError, match='face.jpg'):
            d2lf.read_face_image(path, (112, 112))


@SETTINGS
@given(missing=st.sets(st.integers(min_value=0, max_value=3)))
def test_missing_identity_folders(missing, small_standin, tmp_path):
    copy = os.path.join(tempfile.mkdtemp(dir=tmp_path), 'faces')
    shutil.copytree(small_standin, copy)
    for label in missing:
        shutil.rmtree(os.path.join(copy, formats.identity_folder(label)))
    if not missing:
        assert len(d2lf.FaceDataset(copy)) == 12
    else:
        with pytest.raises(FileNotFoundError,
                           match=formats.identity_folder(min(missing))):
            d2lf.FaceDataset(copy)


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
# Any finite double, 1e160 and 1e-300 included.
any_finite = st.floats(allow_nan=False, allow_infinity=False)


@SETTINGS
@given(points=st.lists(st.tuples(any_finite, any_finite), min_size=5,
                       max_size=5))
def test_random_landmarks(points):
    image = onp.full((64, 80, 3), 128, onp.uint8)
    try:
        aligned = d2lf.face_align(image, onp.array(points))
    except ValueError as e:
        assert 'landmark' in str(e)
    else:
        assert aligned.shape == (112, 112, 3) and aligned.dtype == onp.uint8


@SETTINGS
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True),
                       min_size=0, max_size=12))
def test_landmarks_of_any_shape_and_value(values):
    image = onp.zeros((32, 32), onp.uint8)
    try:
        aligned = d2lf.face_align(image, onp.array(values).reshape(-1, 2)
                                  if len(values) % 2 == 0 else values)
    except ValueError as e:
        assert 'landmark' in str(e)
    else:
        assert aligned.shape == (112, 112)


@SETTINGS
@given(origin=st.tuples(finite, finite),
       direction=st.tuples(finite, finite).filter(
           lambda d: 1e-3 < abs(d[0]) + abs(d[1])),
       steps=st.lists(st.floats(min_value=-10, max_value=10), min_size=5,
                      max_size=5))
def test_collinear_landmarks_are_refused(origin, direction, steps):
    points = [[origin[0] + t * direction[0], origin[1] + t * direction[1]]
              for t in steps]
    with pytest.raises(ValueError, match='landmark'):
        d2lf.face_align(onp.zeros((50, 50, 3), onp.uint8), points)


@SETTINGS
@given(images=st.lists(st.binary(max_size=300), min_size=2, max_size=6)
       .filter(lambda b: len(b) % 2 == 0 and all(b)))
def test_bin_with_random_images(images, a_jpeg, tmp_path):
    path = os.path.join(tempfile.mkdtemp(dir=tmp_path), 'set.bin')
    bins = [a_jpeg] + images[1:]
    binsets.save_bin_pairs(path, bins, [True] * (len(bins) // 2))
    try:
        data, issame = d2lf.load_bin(path)
    except ValueError as e:
        assert 'set.bin' in str(e) and 'image' in str(e)
    else:
        assert data.shape == (2, len(bins), 3, 112, 112)
        assert issame.shape == (len(bins) // 2,)


@SETTINGS
@given(points=st.lists(st.tuples(finite, finite), min_size=5, max_size=5),
       exponent=st.integers(min_value=7, max_value=307))
def test_landmarks_far_beyond_any_photo(points, exponent):
    """Shifted or scaled beyond a million pixels: refused, never a crop."""
    image = onp.full((64, 80, 3), 128, onp.uint8)
    points = onp.array(points)
    for far in (points + 10.0 ** exponent, points * 10.0 ** (exponent - 4)):
        if onp.abs(far).max() < 1e6:
            continue  # every point happened to be near 0
        with pytest.raises(ValueError, match='landmark'):
            d2lf.face_align(image, far)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
    st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) |
    st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=12)


@pytest.fixture(scope='module')
def packed(small_standin, tmp_path_factory):
    """A copy of the small stand-in with a fresh pack: (prefix, good marker)."""
    import json
    copy = str(tmp_path_factory.mktemp('packed') / 'faces')
    shutil.copytree(small_standin, copy)
    prefix = d2lf.pack_face_records(copy)
    with open(prefix + '.d2l-pack.json') as f:
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
