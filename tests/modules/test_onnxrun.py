"""Hostile and broken ONNX files: onnxrun.EmbeddingModel refuses each by
name, before ONNX Runtime reads another file or allocates for it."""
import os

import numpy as onp
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from d2l_face import onnxrun, publish

SIZE = 112


def graph_model(nodes, initializers=(), input_shape=('n', 3, SIZE, SIZE),
                output_shape=('n', 'd'), sparse=()):
    """A model from image input 'x' to output 'y' through `nodes`."""
    graph = helper.make_graph(
        nodes, 'hostile',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, output_shape)],
        initializer=list(initializers), sparse_initializer=list(sparse))
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid('', 17)])
    model.ir_version = 8
    return model


def write(path, model):
    path.write_bytes(model.SerializeToString())
    return str(path)


def faces(n, seed=0):
    return onp.random.default_rng(seed).integers(
        0, 256, (n, 3, SIZE, SIZE), dtype=onp.uint8)


@pytest.fixture
def no_session(monkeypatch):
    """Fails the test if ONNX Runtime is asked to build a session."""
    def refuse(*args, **kwargs):
        raise AssertionError('InferenceSession was created')
    monkeypatch.setattr(onnxruntime, 'InferenceSession', refuse)


# -- a model reads nothing but itself ---------------------------------------

SECRET = onp.array([11.0, 22.0, 33.0], onp.float32)


def external(name, dims=(3,)):
    """A float tensor whose data, by its own account, is in secret.bin."""
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT,
                              dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in [('location', 'secret.bin'), ('offset', '0'),
                       ('length', str(4 * int(onp.prod(dims))))]:
        tensor.external_data.add(key=key, value=value)
    return tensor


def pooled(then):
    """x -> its mean per channel (n, 3) -> `then` nodes -> y."""
    return [helper.make_node('GlobalAveragePool', ['x'], ['p']),
            helper.make_node('Flatten', ['p'], ['f'])] + then


def external_models():
    add = helper.make_node('Add', ['f', 'w'], ['y'])
    constant = helper.make_node('Constant', [], ['w'], value=external('c'))
    sparse = helper.make_sparse_tensor(
        external('w'), numpy_helper.from_array(onp.arange(3)), [3])
    branch = helper.make_graph(
        [helper.make_node('Constant', [], ['b'], value=external('b'))],
        'branch', [], [helper.make_tensor_value_info('b', TensorProto.FLOAT,
                                                     [3])])
    subgraph = [helper.make_node('Constant', [], ['always'], value=(
                    numpy_helper.from_array(onp.array(True)))),
                helper.make_node('If', ['always'], ['w'], then_branch=branch,
                                 else_branch=branch), add]
    return {
        'initializer': graph_model(pooled([add]), [external('w')]),
        'constant': graph_model(pooled([constant, add])),
        'sparse': graph_model(pooled([add]), sparse=[sparse]),
        'subgraph': graph_model(pooled(subgraph)),
    }


@pytest.mark.parametrize('where', ['initializer', 'constant', 'sparse',
                                   'subgraph'])
def test_data_in_another_file_is_refused(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)  # where ONNX Runtime would look for it
    (tmp_path / 'secret.bin').write_bytes(SECRET.tobytes())
    path = write(tmp_path / 'm.onnx', external_models()[where])
    with pytest.raises(onnxrun.ModelFileError,
                       match=r"m\.onnx: tensor .* another file "
                             r"\('secret\.bin'\)"):
        onnxrun.EmbeddingModel(path)


@pytest.mark.parametrize('where', ['sparse', 'subgraph'])
def test_the_secret_would_come_out_as_the_embedding(tmp_path, monkeypatch,
                                                    where):
    # The threat is real: ONNX Runtime reads secret.bin from the working
    # folder when given the model's bytes (dense initializers and Constant
    # nodes it refuses without a model path).
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'secret.bin').write_bytes(SECRET.tobytes())
    model = external_models()[where]
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=['CPUExecutionProvider'])
    x = onp.zeros((1, 3, SIZE, SIZE), onp.float32)
    assert onp.array_equal(session.run(None, {'x': x})[0][0], SECRET)


def test_graphs_outside_the_main_one_are_refused(tmp_path):
    # A local function, or training information, holds nodes of its own.
    function = helper.make_function(
        'local', 'Secret', [], ['w'],
        [helper.make_node('Constant', [], ['w'], value=external('c'))],
        [helper.make_opsetid('', 17)])
    model = graph_model(pooled([helper.make_node('Secret', [], ['w'],
                                                 domain='local'),
                                helper.make_node('Add', ['f', 'w'],
                                                 ['y'])]))
    model.opset_import.add(domain='local', version=1)
    model.functions.append(function)
    path = write(tmp_path / 'm.onnx', model)
    with pytest.raises(onnxrun.ModelFileError, match='model-local functions'):
        onnxrun.EmbeddingModel(path)


# -- memory bounded before anything is allocated ----------------------------

def int64s(name, values):
    return numpy_helper.from_array(onp.array(values, onp.int64), name)


def large_models():
    huge = 1 << 20
    conv_w = numpy_helper.from_array(onp.ones((1, 3, 1, 1), onp.float32), 'w')
    return {
        'ConstantOfShape': (graph_model(
            [helper.make_node('ConstantOfShape', ['s'], ['c']),
             helper.make_node('Flatten', ['x'], ['f']),
             helper.make_node('Add', ['f', 'c'], ['y'])],
            [int64s('s', [huge, 3 * SIZE * SIZE])]), 'ConstantOfShape'),
        'Expand': (graph_model(
            [helper.make_node('Expand', ['x', 's'], ['y'])],
            [int64s('s', [huge, 3, SIZE, SIZE])]), 'Expand'),
        'Tile': (graph_model(
            [helper.make_node('Tile', ['x', 's'], ['y'])],
            [int64s('s', [1, 1, huge, huge])]), 'Tile'),
        'conv pads': (graph_model(
            [helper.make_node('Conv', ['x', 'w'], ['y'],
                              pads=[huge, huge, huge, huge])],
            [conv_w], output_shape=('n', 1, 'h', 'w')), 'MAX_TENSOR_ELEMENTS'),
        'declared initializer': (graph_model(
            [helper.make_node('Flatten', ['x'], ['f']),
             helper.make_node('Add', ['f', 'big'], ['y'])],
            [onnx.TensorProto(name='big', data_type=TensorProto.FLOAT,
                              dims=[huge, huge])]), 'MAX_TENSOR_ELEMENTS'),
        'declared input': (graph_model(
            [helper.make_node('Flatten', ['x'], ['y'])],
            input_shape=('n', 3, 1 << 15, 1 << 15)), 'MAX_TENSOR_ELEMENTS'),
    }


@pytest.mark.parametrize('case', ['ConstantOfShape', 'Expand', 'Tile',
                                  'conv pads', 'declared initializer',
                                  'declared input'])
def test_a_small_file_asking_for_much_memory_is_refused_before_a_session(
        tmp_path, no_session, case):
    model, message = large_models()[case]
    path = write(tmp_path / 'm.onnx', model)
    assert os.path.getsize(path) < 1000  # a few hundred bytes
    with pytest.raises(onnxrun.ModelFileError, match=message) as info:
        onnxrun.EmbeddingModel(path)
    assert path in str(info.value)


def test_a_value_of_unknown_shape_is_refused(tmp_path, no_session):
    # ONNX's shape inference does not follow Div into Reshape's shape: at
    # run time it could be anything, so it is refused.
    model = graph_model([helper.make_node('Flatten', ['x'], ['f']),
                         helper.make_node('Div', ['a', 'b'], ['s']),
                         helper.make_node('Reshape', ['f', 's'], ['y'])],
                        [int64s('a', [2, 2 * 3 * SIZE * SIZE]),
                         int64s('b', [2, 2])])
    path = write(tmp_path / 'm.onnx', model)
    with pytest.raises(onnxrun.ModelFileError,
                       match=r"m\.onnx: the shape of 'y' \(Reshape\) is "
                             r"unknown"):
        onnxrun.EmbeddingModel(path)


def test_many_moderate_values_are_refused_by_their_total(tmp_path,
                                                         no_session):
    # Each value is allowed; together they pass MAX_TOTAL_ELEMENTS.
    count = onnxrun.MAX_TOTAL_ELEMENTS // (3 * SIZE * SIZE) + 1
    names = ['x'] + [f'v{i}' for i in range(count)] + ['y']
    nodes = [helper.make_node('Identity', [a], [b])
             for a, b in zip(names, names[1:])]
    path = write(tmp_path / 'm.onnx', graph_model(
        nodes, output_shape=('n', 3, SIZE, SIZE)))
    with pytest.raises(onnxrun.ModelFileError, match='MAX_TOTAL_ELEMENTS'):
        onnxrun.EmbeddingModel(path)


# -- one embedding per face ------------------------------------------------

def nan_model():
    nan = numpy_helper.from_array(onp.array([onp.nan], onp.float32), 'nan')
    return graph_model([helper.make_node('Flatten', ['x'], ['f']),
                        helper.make_node('Mul', ['f', 'nan'], ['y'])], [nan])


@pytest.mark.parametrize('model, message', [
    (graph_model([helper.make_node('Flatten', ['x'], ['y'])],
                 input_shape=(1, 3, SIZE, SIZE)), 'batches of 1 faces only'),
    (graph_model([helper.make_node('Flatten', ['x'], ['f']),
                  helper.make_node('Gather', ['f', 'first'], ['y'], axis=0)],
                 [int64s('first', [0, 0])]), 'the same embedding'),
    (graph_model([helper.make_node('Flatten', ['x'], ['f']),
                  helper.make_node('Reshape', ['f', 's'], ['y'])],
                 [int64s('s', [1, -1])]), r'shape \(1, 75264\)'),
    (nan_model(), 'not finite'),
    (graph_model([helper.make_node('Identity', ['x'], ['y'])],
                 output_shape=('n', 3, SIZE, SIZE)),
     r'shape \(2, 3, 112, 112\)'),
], ids=['fixed batch', 'ignores the batch', 'one row', 'NaN', 'image out'])
def test_a_model_that_does_not_embed_each_face_is_refused(tmp_path, model,
                                                          message):
    path = write(tmp_path / 'm.onnx', model)
    with pytest.raises(onnxrun.ModelFileError, match=message) as info:
        onnxrun.EmbeddingModel(path)
    assert path in str(info.value)


def test_a_model_that_embeds_each_face_is_taken(tmp_path):
    model = graph_model(pooled([helper.make_node('Identity', ['f'], ['y'])]))
    loaded = onnxrun.EmbeddingModel(write(tmp_path / 'm.onnx', model))
    images = faces(3)
    expected = ((images - 127.5) / 127.5).mean(axis=(2, 3))
    assert onp.allclose(loaded.embed(images), expected, atol=1e-5)


# -- written whole or not at all -------------------------------------------

def flatten_bytes():
    return graph_model([helper.make_node('Flatten', ['x'], ['y'])]) \
        .SerializeToString()


def test_write_model_never_follows_a_link_at_the_old_temporary_name(
        tmp_path):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'keep')
    path = tmp_path / 'net.onnx'
    # where versions before publish.writing wrote their temporary
    os.symlink(victim, f'{path}.tmp-{os.getpid()}')
    onnxrun.write_model(flatten_bytes(), str(path), {'note': 'new'})
    assert victim.read_bytes() == b'keep'
    assert onnxrun.EmbeddingModel(str(path)).metadata['note'] == 'new'


def test_write_model_replaces_a_link_at_the_path(tmp_path):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'keep')
    path = tmp_path / 'net.onnx'
    path.symlink_to(victim)
    onnxrun.write_model(flatten_bytes(), str(path), {})
    assert victim.read_bytes() == b'keep' and not path.is_symlink()


def test_write_model_keeps_the_old_file_when_writing_fails(tmp_path,
                                                           monkeypatch):
    path = tmp_path / 'net.onnx'
    onnxrun.write_model(flatten_bytes(), str(path), {'note': 'first'})

    def full_disk(fd):  # the data did not reach the disk
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full_disk)
    with pytest.raises(OSError, match='No space'):
        onnxrun.write_model(flatten_bytes(), str(path), {'note': 'second'})
    monkeypatch.undo()
    assert onnxrun.EmbeddingModel(str(path)).metadata['note'] == 'first'
    assert os.listdir(tmp_path) == ['net.onnx']


def test_write_model_removes_what_a_killed_writer_left(tmp_path):
    dead = publish.temp_path(str(tmp_path), pid=2 ** 31 + 7)  # no such pid
    open(dead, 'wb').close()
    onnxrun.write_model(flatten_bytes(), str(tmp_path / 'net.onnx'), {})
    assert os.listdir(tmp_path) == ['net.onnx']
