"""The deployment section: embedding one face, identification against a
gallery (both tabs, through the `d2lf` fixture), and the PyTorch tab's ONNX
export (export_onnx, InsightFaceInput) with d2l_face.onnxrun, which runs
such files with ONNX Runtime."""
import os

import cv2
import numpy as onp
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper

from d2l_face import onnxrun
from d2l_face import torch as d2lf_torch
from synthetic import synthetic_pairs
from tiny_models import cpus, tiny_net


# ------------------------------------------------------- one face at a time

def test_embed_face_matches_embed_pairs_and_checks_shape(d2lf):
    net = tiny_net(d2lf)
    images, _ = synthetic_pairs()
    face = images[0, 3].transpose(1, 2, 0)
    emb = d2lf.embed_face(net, face, devices=cpus(d2lf))
    assert emb.shape == (8,) and onp.linalg.norm(emb) == pytest.approx(1)
    pairs = d2lf.embed_pairs(net, images, devices=cpus(d2lf))
    assert onp.abs(emb - pairs[3]).max() < 1e-5
    with pytest.raises(ValueError, match='RGB'):
        d2lf.embed_face(net, face[:, :, 0])


@pytest.mark.parametrize('dtype', ['float32', 'float64', 'bool', 'int64'])
def test_embed_face_refuses_what_is_not_uint8(d2lf, dtype):
    # Once cast: 0.5 became 0, 300 became 44 and NaN some byte.
    images, _ = synthetic_pairs()
    face = images[0, 3].transpose(1, 2, 0).astype(dtype)
    if dtype.startswith('float'):
        face[0, 0, 0] = onp.nan
    with pytest.raises(ValueError, match=r'uint8 RGB image .*not ' + dtype):
        d2lf.embed_face(tiny_net(d2lf), face, devices=cpus(d2lf))


# ------------------------------------------------------------ identification

def unit_rows(x):
    x = onp.asarray(x, onp.float64)
    return x / onp.linalg.norm(x, axis=1, keepdims=True)


def test_identify_names_the_most_similar_gallery_entry(d2lf):
    gallery = onp.eye(4)[:3]  # three people along three axes
    probes = unit_rows([[0.1, 0.9, 0, 0.1],   # close to #1
                        [0, 0.1, 0.2, 0.97],  # mostly outside the gallery
                        [0.8, 0, 0.6, 0]])    # #0, cosine 0.8
    best, cosine = d2lf.identify(probes, gallery)
    assert best.tolist() == [1, 2, 0]
    assert cosine == pytest.approx([probes[0, 1], probes[1, 2], 0.8])
    best, _ = d2lf.identify(probes, gallery, threshold=0.5)
    assert best.tolist() == [1, -1, 0]  # the second probe is nobody
    best, _ = d2lf.identify(probes, gallery, threshold=0.8)
    assert best.tolist() == [1, -1, -1]  # "above" the threshold is strict


def test_identify_matches_a_loop_over_the_gallery(d2lf):
    rng = onp.random.default_rng(0)
    probes, gallery = unit_rows(rng.normal(size=(50, 16))), \
        unit_rows(rng.normal(size=(30, 16)))
    best, cosine = d2lf.identify(probes, gallery, threshold=0.2)
    for p, b, c in zip(probes, best, cosine):
        similarities = [p @ g for g in gallery]
        assert c == pytest.approx(max(similarities))
        expected = int(onp.argmax(similarities)) if max(similarities) > 0.2 \
            else -1
        assert b == expected


@pytest.mark.parametrize('probes, gallery', [
    (onp.ones((2, 3)), onp.ones((4, 5))),   # different embedding sizes
    (onp.ones(3), onp.ones((4, 3))),        # one probe without its batch axis
    (onp.ones((2, 3)), onp.ones((0, 3))),   # nobody enrolled
])
def test_identify_rejects_bad_shapes(d2lf, probes, gallery):
    with pytest.raises(ValueError, match='expected real probes'):
        d2lf.identify(probes, gallery)


def test_a_nan_gallery_row_never_wins(d2lf):
    gallery = onp.eye(3)
    gallery[1] = onp.nan  # a failed enrollment
    probes = unit_rows([[0.1, 0.99, 0], [0, 0.6, 0.8]])
    best, cosine = d2lf.identify(probes, gallery)
    assert best.tolist() == [0, 2]
    assert cosine == pytest.approx([probes[0, 0], 0.8])
    best, _ = d2lf.identify(probes, gallery, threshold=0.5)
    assert best.tolist() == [-1, 2]


@pytest.mark.parametrize('value', [onp.inf, -onp.inf])
def test_an_infinite_gallery_row_never_wins(d2lf, value):
    gallery = onp.eye(3)
    gallery[1, 1] = value
    best, cosine = d2lf.identify(unit_rows([[0.6, 0.8, 0]]), gallery)
    assert best.tolist() == [0] and cosine == pytest.approx([0.6])


@pytest.mark.parametrize('scale', [1e300, 5.0, 0.0])
def test_rows_that_are_not_unit_embeddings_are_refused(d2lf, scale):
    gallery = onp.eye(3)
    gallery[2] *= scale
    with pytest.raises(ValueError, match='gallery rows must be unit'):
        d2lf.identify(unit_rows([[0.6, 0.8, 0]]), gallery)
    with pytest.raises(ValueError, match='probe rows must be unit'):
        d2lf.identify(onp.eye(3) * scale, onp.eye(3))


@pytest.mark.parametrize('threshold', [onp.nan, 'abc'])
def test_a_threshold_that_is_not_a_number_is_refused(d2lf, threshold):
    with pytest.raises(ValueError):
        d2lf.identify(onp.eye(3), onp.eye(3), threshold)


def test_complex_embeddings_are_refused(d2lf):
    with pytest.raises(ValueError, match='expected real probes'):
        d2lf.identify(onp.eye(3) * (1 + 0j), onp.eye(3))


def test_a_nan_probe_or_an_all_nan_gallery_finds_nobody(d2lf):
    gallery = onp.eye(3)
    probes = onp.array([[onp.nan, 0, 0], [1.0, 0, 0]])
    best, _ = d2lf.identify(probes, gallery)
    assert best.tolist() == [-1, 0]
    best, _ = d2lf.identify(probes, onp.full((2, 3), onp.nan))
    assert best.tolist() == [-1, -1]
    best, cosine = d2lf.identify(onp.ones((0, 3)), gallery)
    assert best.shape == cosine.shape == (0,)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**32 - 1), st.lists(st.booleans(), min_size=2,
                                            max_size=12))
def test_nan_rows_are_as_if_left_out_of_the_gallery(d2lf, seed, is_nan):
    """identify with NaN rows = identify on the other rows, renumbered."""
    rng = onp.random.default_rng(seed)
    is_nan = onp.array(is_nan)
    gallery = unit_rows(rng.normal(size=(len(is_nan), 5)))
    gallery[is_nan] = onp.nan
    probes = unit_rows(rng.normal(size=(7, 5)))
    best, cosine = d2lf.identify(probes, gallery, threshold=0.1)
    if is_nan.all():
        assert (best == -1).all()
        return
    kept = onp.flatnonzero(~is_nan)
    expected, expected_cosine = d2lf.identify(probes, gallery[kept], 0.1)
    assert best.tolist() == [kept[i] if i >= 0 else -1 for i in expected]
    assert cosine == pytest.approx(expected_cosine)


# ------------------------------------------------ ONNX (the PyTorch tab)

SIZE = 112


@pytest.fixture(scope='module')
def trained_like_net():
    """A small Face-ResNet whose batch norms hold non-trivial statistics."""
    torch.manual_seed(0)
    net = d2lf_torch.face_resnet(18, 0.125, 64)
    net.train()
    with torch.no_grad():  # a few batches move the running statistics
        for _ in range(3):
            net(torch.rand(8, 3, SIZE, SIZE) * 0.8 + 0.1)
    return net.eval()


@pytest.fixture(scope='module')
def exported(trained_like_net, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('onnx') / 'net.onnx')
    assert d2lf_torch.export_onnx(trained_like_net, path) == path
    return path


def faces(n, seed=0):
    return onp.random.default_rng(seed).integers(
        0, 256, (n, 3, SIZE, SIZE), dtype=onp.uint8)


def torch_embed(net, images):
    """The network on its own input convention: RGB pixels / 255."""
    with torch.no_grad():
        return net(torch.from_numpy(images).float() / 255).numpy()


def test_onnx_runtime_equals_torch_on_insightface_input(trained_like_net,
                                                        exported):
    images = faces(6)
    scaled = ((images.astype(onp.float32) - 127.5) / 127.5)
    session = onnxrun.EmbeddingModel(exported).session
    onnx_out = session.run(None, {'input': scaled})[0]
    reference = torch_embed(trained_like_net, images)
    assert onnx_out.shape == (6, 64)
    assert onp.abs(onnx_out - reference).max() < 1e-4
    # not a vacuous comparison: the embeddings differ from face to face
    assert onp.abs(reference - reference[:1]).max() > 1e-2


def test_bridge_maps_insightface_input_to_the_networks(trained_like_net):
    images = faces(4, seed=1)
    scaled = torch.from_numpy((images.astype(onp.float32) - 127.5) / 127.5)
    with torch.no_grad():
        bridged = d2lf_torch.InsightFaceInput(trained_like_net)(scaled).numpy()
    assert onp.abs(bridged - torch_embed(trained_like_net, images)).max() \
        < 1e-5


def test_uint8_faces_both_ways_give_the_same_embeddings(trained_like_net,
                                                        exported):
    images = faces(5, seed=2)
    model = onnxrun.EmbeddingModel(exported)
    ours = model.embed(images, batch_size=2)  # batches of 2, 2 and 1
    # InsightFace's ArcFaceONNX.get_feat: BGR crops, blobFromImages with
    # mean and scale 127.5 and swapRB
    bgr = [onp.ascontiguousarray(image.transpose(1, 2, 0)[:, :, ::-1])
           for image in images]
    blob = cv2.dnn.blobFromImages(bgr, 1 / 127.5, (SIZE, SIZE),
                                  (127.5, 127.5, 127.5), swapRB=True)
    insightface_way = model.session.run(None, {'input': blob})[0]
    reference = torch_embed(trained_like_net, images)
    assert onp.abs(ours - reference).max() < 1e-4
    assert onp.abs(insightface_way - reference).max() < 1e-4


def test_the_file_takes_insightface_scaling_not_the_networks(
        trained_like_net, exported):
    images = faces(3, seed=3)
    session = onnxrun.EmbeddingModel(exported).session
    wrong = session.run(None, {'input': images.astype(onp.float32) / 255})[0]
    assert onp.abs(wrong - torch_embed(trained_like_net, images)).max() > 1e-2


def test_metadata_states_the_input(exported):
    metadata = {p.key: p.value for p in onnx.load(exported).metadata_props}
    assert metadata['input_layout'] == 'NCHW'
    assert metadata['input_color'] == 'RGB'
    assert metadata['input_size'] == '112x112'
    assert float(metadata['input_mean']) == 127.5
    assert float(metadata['input_std']) == 127.5
    assert '(x - 127.5) / 127.5' in metadata['input_scaling']
    model = onnxrun.EmbeddingModel(exported)
    assert model.metadata == metadata
    assert (model.mean, model.std, model.image_size) == (127.5, 127.5,
                                                         (SIZE, SIZE))


def test_graph_has_one_input_any_batch_and_one_output(exported):
    graph = onnx.load(exported).graph
    assert [i.name for i in graph.input] == ['input']
    assert [o.name for o in graph.output] == ['embedding']
    model = onnxrun.EmbeddingModel(exported)
    for n in (1, 7):
        assert model.embed(faces(n)).shape == (n, 64)


def test_insightface_would_use_its_127_5_scaling(exported):
    # arcface_onnx.py: Sub and Mul among the first 8 node names mean "a
    # model that scales itself", fed with mean 0 and std 1 instead.
    names = [node.name for node in onnx.load(exported).graph.node[:8]]
    find_sub = any(n.startswith(('Sub', '_minus')) for n in names)
    find_mul = any(n.startswith(('Mul', '_mul')) for n in names)
    assert not (find_sub and find_mul)


def test_export_keeps_training_mode_and_exports_eval_mode(trained_like_net,
                                                          tmp_path):
    net = trained_like_net
    net.train()
    try:
        path = d2lf_torch.export_onnx(net, str(tmp_path / 'net.onnx'))
        assert net.training
    finally:
        net.eval()
    images = faces(4, seed=4)
    out = onnxrun.EmbeddingModel(path).embed(images)
    assert onp.abs(out - torch_embed(net, images)).max() < 1e-4
    assert os.listdir(tmp_path) == ['net.onnx']  # no temporary file left


def test_embed_pairs_is_the_unit_flip_sum(exported):
    model = onnxrun.EmbeddingModel(exported)
    images = faces(4, seed=5)
    pairs = onp.stack([images, images[:, :, :, ::-1]])
    total = model.embed(pairs[0]).astype(onp.float64) + model.embed(pairs[1])
    expected = total / onp.linalg.norm(total, axis=1, keepdims=True)
    assert onp.allclose(model.embed_pairs(pairs), expected)
    with pytest.raises(ValueError, match=r'\(2, n, 3, h, w\)'):
        model.embed_pairs(images)


def test_bad_faces_are_refused(exported):
    model = onnxrun.EmbeddingModel(exported)
    with pytest.raises(ValueError, match='uint8'):
        model.embed(faces(2).astype(onp.float32))
    with pytest.raises(ValueError, match=r'\(n, 3, 112, 112\)'):
        model.embed(faces(2)[:, :, :100])
    with pytest.raises(ValueError, match='n > 0'):
        model.embed(faces(0))


def write(path, model):
    with open(path, 'wb') as f:
        f.write(model.SerializeToString())
    return str(path)


def tiny_model(inputs, outputs, nodes, metadata=None):
    graph = helper.make_graph(nodes, 'tiny', inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('',
                                                                        17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model


def image_input(name='x', shape=('n', 3, SIZE, SIZE), dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def flat_output(name='y'):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ('n', 'd'))


def test_a_model_without_our_metadata_gets_insightfaces_scaling(tmp_path):
    model = tiny_model([image_input()], [flat_output()],
                       [helper.make_node('Flatten', ['x'], ['y'])])
    loaded = onnxrun.EmbeddingModel(write(tmp_path / 'm.onnx', model))
    assert (loaded.mean, loaded.std) == (127.5, 127.5)
    images = faces(2)
    assert onp.allclose(loaded.embed(images),
                        ((images - 127.5) / 127.5).reshape(2, -1))


@pytest.mark.parametrize('content, message', [
    (b'', 'not an ONNX model'),
    (b'\x08\x07 this is not protobuf \xff\xff\xff' * 20, 'not an ONNX model'),
    (b'\x89PNG\r\n\x1a\n' + bytes(200), 'not an ONNX model'),
])
def test_a_file_that_is_not_a_model_is_refused_by_name(tmp_path, content,
                                                       message):
    path = tmp_path / 'bad.onnx'
    path.write_bytes(content)
    with pytest.raises(onnxrun.ModelFileError, match=message) as info:
        onnxrun.EmbeddingModel(str(path))
    assert str(path) in str(info.value)


def test_an_invalid_graph_is_refused_by_name(tmp_path):
    # the node reads an input that nothing defines
    model = tiny_model([image_input()], [flat_output()],
                       [helper.make_node('Flatten', ['missing'], ['y'])])
    path = write(tmp_path / 'm.onnx', model)
    with pytest.raises(onnxrun.ModelFileError, match='invalid ONNX model') \
            as info:
        onnxrun.EmbeddingModel(path)
    assert path in str(info.value)


@pytest.mark.parametrize('inputs, outputs, nodes, message', [
    ([image_input('a'), image_input('b')], [flat_output()],
     [helper.make_node('Add', ['a', 'b'], ['y'])], 'one input and one output'),
    ([image_input()], [flat_output('y'), flat_output('z')],
     [helper.make_node('Flatten', ['x'], ['y']),
      helper.make_node('Flatten', ['x'], ['z'])], 'one input and one output'),
    ([image_input(shape=('n', 1, SIZE, SIZE))], [flat_output()],
     [helper.make_node('Flatten', ['x'], ['y'])], 'shape'),
    ([image_input(shape=('n', 3, 'h', 'w'))], [flat_output()],
     [helper.make_node('Flatten', ['x'], ['y'])], 'fixed height'),
    ([image_input(dtype=TensorProto.UINT8)], [flat_output()],
     [helper.make_node('Flatten', ['x'], ['y'])], 'float32'),
])
def test_a_model_of_another_shape_is_refused(tmp_path, inputs, outputs,
                                             nodes, message):
    path = write(tmp_path / 'm.onnx', tiny_model(inputs, outputs, nodes))
    with pytest.raises(onnxrun.ModelFileError, match=message) as info:
        onnxrun.EmbeddingModel(path)
    assert path in str(info.value)


@pytest.mark.parametrize('metadata', [{'input_std': '0'},
                                      {'input_mean': 'middle gray'},
                                      {'input_std': 'nan'}])
def test_unusable_scaling_metadata_is_refused(tmp_path, metadata):
    model = tiny_model([image_input()], [flat_output()],
                       [helper.make_node('Flatten', ['x'], ['y'])], metadata)
    with pytest.raises(onnxrun.ModelFileError, match='input_'):
        onnxrun.EmbeddingModel(write(tmp_path / 'm.onnx', model))


def test_missing_file_fifo_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        onnxrun.EmbeddingModel(str(tmp_path / 'absent.onnx'))
    fifo = tmp_path / 'fifo.onnx'
    os.mkfifo(fifo)  # a plain open() would wait for a writer forever
    with pytest.raises(onnxrun.ModelFileError, match='not a regular file'):
        onnxrun.EmbeddingModel(str(fifo))
    with pytest.raises((onnxrun.ModelFileError, IsADirectoryError)):
        onnxrun.EmbeddingModel(str(tmp_path))


def test_write_model_refuses_bad_bytes_and_keeps_the_old_file(exported,
                                                              tmp_path):
    path = tmp_path / 'net.onnx'
    with open(exported, 'rb') as f:
        good = f.read()
    onnxrun.write_model(good, str(path), {'note': 'first'})
    with pytest.raises(onnxrun.ModelFileError, match='not an ONNX model'):
        onnxrun.write_model(b'garbage' * 10, str(path), {'note': 'second'})
    with pytest.raises(TypeError, match='must be str'):
        onnxrun.write_model(good, str(path), {'note': 2})
    assert onnxrun.EmbeddingModel(str(path)).metadata['note'] == 'first'
    assert os.listdir(tmp_path) == ['net.onnx']
