"""The framework-free format facts: folder names, property, JPEG headers."""
import os

import cv2
import numpy as onp
import pytest
from hypothesis import given, strategies as st

from d2l_face import formats
from synthetic import jpeg, smuggled, with_claimed_size


def test_template_is_the_arcface_template_of_112_crops():
    assert formats.ARCFACE_TEMPLATE.shape == (5, 2)
    assert formats.ARCFACE_TEMPLATE.dtype == onp.float32
    # Eyes above the nose above the mouth, left points left of right ones.
    t = formats.ARCFACE_TEMPLATE
    assert t[0, 0] < t[1, 0] and t[3, 0] < t[4, 0]
    assert max(t[0, 1], t[1, 1]) < t[2, 1] < min(t[3, 1], t[4, 1])
    assert (0 < t).all() and (t < formats.TEMPLATE_SIZE).all()


@given(st.integers(0, 99_999_999))
def test_identity_folder_has_eight_digits_and_reads_back(label):
    name = formats.identity_folder(label)
    assert len(name) == 8 and int(name) == label


def test_identity_folder_refuses_negative_labels():
    with pytest.raises(ValueError, match='non-negative'):
        formats.identity_folder(-1)


@given(st.integers(1, 10**6), st.integers(1, 4096), st.integers(1, 4096))
def test_property_line_reads_back_or_refuses_what_is_no_crop(num_classes,
                                                             height, width):
    line = formats.format_property(num_classes, height, width)
    if height * width <= formats.MAX_CROP_PIXELS:
        assert formats.parse_property(line) == ((height, width), num_classes)
    else:  # a batch of such "crops" would cost gigabytes
        with pytest.raises(ValueError, match=f'{width}x{height} pixels'):
            formats.parse_property(line)


@pytest.mark.parametrize('line', ['', '300,112', '300,112,112,3', 'a,b,c',
                                  '300,112,-1', '0,112,112', '3²,112,112',
                                  '300,١١٢,112', '300, ,112'])
def test_bad_property_lines_are_refused_by_name(line):
    with pytest.raises(ValueError, match='some/property'):
        formats.parse_property(line, 'some/property')


@given(st.text(max_size=20))
def test_any_property_line_parses_or_raises_value_error(line):
    try:
        (height, width), num_classes = formats.parse_property(line)
    except ValueError:
        return
    assert min(height, width, num_classes) >= 1


@pytest.mark.parametrize('height,width', [(112, 112), (1, 1), (300, 451)])
@pytest.mark.parametrize('progressive', [False, True])
def test_jpeg_size_reads_the_frame_header(height, width, progressive):
    data = jpeg(height, width, progressive=progressive)
    assert formats.jpeg_size(data) == (height, width)
    assert formats.check_jpeg_header(data, 'x', (height, width)) == \
        (height, width)


def test_a_huge_claimed_size_is_refused_before_decoding():
    bomb = with_claimed_size(jpeg(16, 16), 20000, 20000)
    assert len(bomb) < 4096 and formats.jpeg_size(bomb) == (20000, 20000)
    with pytest.raises(ValueError, match='20000x20000'):
        formats.check_jpeg_header(bomb, 'bomb.jpg')


def test_a_wrong_size_is_refused_by_name():
    with pytest.raises(ValueError, match=r'a\.jpg: image is 20x10, expected '
                                         r'112x112'):
        formats.check_jpeg_header(jpeg(10, 20), 'a.jpg', (112, 112))


@pytest.mark.parametrize('height,width', [(112, 112), (300, 451)])
def test_header_length_is_the_fewest_bytes_that_tell_the_size(height, width):
    data = jpeg(height, width)
    n = formats.jpeg_header_length(data)
    assert formats.jpeg_size(data[:n]) == (height, width)
    assert formats.jpeg_size(data[:n - 1]) is None


def padded(data, segment):
    """`data` with `segment` inserted right after its start-of-image marker."""
    return data[:2] + segment + data[2:]


def test_long_runs_of_fill_bytes_are_skipped_at_once():
    # 1 MB of 0xFF before a marker: one step, not a million.
    data = padded(jpeg(16, 16), b'\xff' * (1 << 20))
    assert formats.jpeg_size(data) == (16, 16)


def test_a_frame_header_after_too_many_segments_is_not_looked_for():
    # Each tiny segment costs a step: a few KB could otherwise cost seconds.
    empty_comment = b'\xff\xfe\x00\x02'
    assert formats.jpeg_size(padded(jpeg(16, 16), empty_comment * 100)) == \
        (16, 16)
    many = empty_comment * formats.MAX_JPEG_SEGMENTS
    assert formats.jpeg_size(padded(jpeg(16, 16), many)) is None


def test_a_frame_header_far_into_the_file_is_not_looked_for():
    comments = b''.join(b'\xff\xfe\xff\xff' + b'c' * 65533 for _ in range(40))
    assert formats.jpeg_size(padded(jpeg(16, 16), comments[:65537])) == (16, 16)
    assert len(comments) > formats.MAX_JPEG_HEADER_BYTES
    with pytest.raises(ValueError, match='not a JPEG'):
        formats.check_jpeg_header(padded(jpeg(16, 16), comments), 'x.jpg')


def test_a_frame_hidden_behind_ff00_is_not_taken_for_another():
    # libjpeg drops FF 00 as stray data and decodes the hidden frame; a
    # reader that skips it by its "length" would see only the shown one.
    data = smuggled((1500, 1500))
    decoded = cv2.imdecode(onp.frombuffer(data, onp.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape[:2] == (1500, 1500)
    assert formats.jpeg_size(data) is None
    with pytest.raises(ValueError, match='not a JPEG'):
        formats.check_jpeg_header(data, 'x.jpg', (112, 112))


@pytest.mark.parametrize('marker', [0x00, 0x02, 0xBF, 0xF0])
def test_markers_libjpeg_stops_at_end_the_search(marker):
    data = jpeg(16, 16)
    assert formats.jpeg_size(padded(data, bytes([0xFF, marker, 0, 4, 0, 0]))) is None
    assert formats.jpeg_size(padded(data, b'\xff\xfe\x00\x04ab')) == (16, 16)


def test_a_socket_named_like_an_image_is_refused(tmp_path):
    import socket
    path = str(tmp_path / 'face.jpg')
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        with pytest.raises(ValueError, match='not a regular file'):
            formats.read_regular_file(path)


@given(st.binary(max_size=64))
def test_jpeg_size_never_fails_on_garbage(data):
    size = formats.jpeg_size(b'\xff\xd8' + data)
    assert size is None or len(size) == 2


@pytest.mark.parametrize('data', [b'', b'GIF89a', jpeg(8, 8)[:20]])
def test_not_a_jpeg_is_refused(data):
    with pytest.raises(ValueError, match='not a JPEG'):
        formats.check_jpeg_header(data, 'x.jpg')


def test_read_regular_file_refuses_a_fifo_at_once(tmp_path):
    fifo = tmp_path / 'face.jpg'
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match='not a regular file'):
        formats.read_regular_file(str(fifo))


def test_read_regular_file_refuses_oversized_files(tmp_path):
    path = tmp_path / 'big.jpg'
    path.write_bytes(b'x' * 100)
    assert formats.read_regular_file(str(path), max_bytes=100) == b'x' * 100
    with pytest.raises(ValueError, match='101 bytes'):
        path.write_bytes(b'x' * 101)
        formats.read_regular_file(str(path), max_bytes=100)


def test_read_regular_file_refuses_a_folder(tmp_path):
    with pytest.raises(ValueError, match='not a regular file'):
        formats.read_regular_file(str(tmp_path))
