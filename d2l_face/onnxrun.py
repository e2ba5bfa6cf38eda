"""Face embedding networks as ONNX files, run with ONNX Runtime.

Framework-free: NumPy, ``onnx`` and ``onnxruntime`` only. The training
section exports its network (``export_onnx`` in the PyTorch tab) and runs the
file with this module; so can any program that never saw the chapter.

The files follow the convention of InsightFace's recognition models (its
``python-package/insightface/model_zoo/arcface_onnx.py``): one input, a batch
of aligned RGB faces in NCHW float32 layout scaled as ``(x - 127.5) / 127.5``
from their uint8 pixel values ``x``; one output, an embedding per face, not
normalized. The input convention is also written into the file's metadata
(``metadata_props``), which ``EmbeddingModel`` reads back.

A model file may come from anyone, so ``EmbeddingModel`` refuses, before ONNX
Runtime sees it, one that keeps tensor data in other files (ONNX Runtime would
read them), uses operators beyond ``ALLOWED_OPS``, or whose tensors for one
face have unknown shapes or more elements than ``MAX_TENSOR_ELEMENTS`` (all
together ``MAX_TOTAL_ELEMENTS``); and then one that does not give one finite
embedding per face.
"""
import math
import os

import numpy as onp
import onnx
import onnxruntime

from d2l_face import formats, publish

# InsightFace's recognition models take (x - INPUT_MEAN) / INPUT_STD.
INPUT_MEAN = 127.5
INPUT_STD = 127.5
# A full-width Face-ResNet-100 takes a few hundred MB; protobuf, which holds
# an ONNX model, stops at 2 GB anyway.
MAX_MODEL_BYTES = 2 << 30
# The operators of an exported Face-ResNet (export_onnx) and of InsightFace's
# recognition models, with the few that a dynamic reshape or a pooling head
# adds. Others, such as ConstantOfShape, Expand, Tile, Resize, Range or If,
# can make tensors far larger than the file, or hold graphs of their own.
ALLOWED_OPS = frozenset({
    'Add', 'AveragePool', 'BatchNormalization', 'Cast', 'Concat', 'Constant',
    'Conv',
    'Div', 'Dropout', 'Flatten', 'Gather', 'Gemm', 'GlobalAveragePool',
    'Identity', 'LeakyRelu', 'MatMul', 'MaxPool', 'Mul', 'PRelu', 'Relu',
    'Reshape', 'Shape', 'Sigmoid', 'Squeeze', 'Sub', 'Transpose', 'Unsqueeze'})
# Elements of one tensor, and of all weights and values of the graph together,
# for one face: a Face-ResNet-100 at 112x112 has 65 M weights and its largest
# value 0.8 M elements. Checked before ONNX Runtime allocates anything.
MAX_TENSOR_ELEMENTS = 1 << 26
MAX_TOTAL_ELEMENTS = 1 << 28
# The faces a model embeds when it is opened, to see that it embeds at all.
PROBE_FACES = 2


class ModelFileError(ValueError):
    """A file that is not an ONNX face embedding model we can run."""


def insightface_metadata(image_size=(112, 112), **extra):
    """The metadata (str -> str) that states an exported model's input."""
    height, width = image_size
    metadata = {
        'input_layout': 'NCHW', 'input_color': 'RGB', 'input_dtype': 'float32',
        'input_size': f'{height}x{width}',
        'input_scaling': f'(x - {INPUT_MEAN}) / {INPUT_STD}, x the uint8 '
                         f'pixel value',
        'input_mean': str(INPUT_MEAN), 'input_std': str(INPUT_STD),
        'output': 'one embedding per face, not normalized; compare two by '
                  'their cosine similarity'}
    metadata.update({key: str(value) for key, value in extra.items()})
    return metadata


def write_model(model_bytes, path, metadata):
    """Check a serialized ONNX model, add metadata, write it atomically."""
    model = _parse(model_bytes, '<exported model>')
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f'metadata keys and values must be str, not '
                            f'{key!r}: {value!r}')
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    # Written under a new temporary name and renamed: a reader never sees
    # half a model, and a failed or killed write leaves an older file.
    with publish.writing(path) as f:
        f.write(model.SerializeToString())
    return path


def _parse(data, name):
    """An onnx.ModelProto from bytes, checked, or ModelFileError."""
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # protobuf raises its own DecodeError
        raise ModelFileError(f'{name}: not an ONNX model '
                             f'({type(e).__name__}: {e})') from e
    if not model.graph.node:
        raise ModelFileError(f'{name}: not an ONNX model (no graph)')
    _check_contents(model, name)  # before the checker looks for data files
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first_line = str(e).strip().splitlines()[0]
        raise ModelFileError(f'{name}: invalid ONNX model: {first_line}') \
            from e
    return model


def _graphs(graph):
    """`graph` and every graph nested in the attributes of its nodes."""
    stack = [graph]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField('g'):
                    stack.append(attribute.g)
                stack.extend(attribute.graphs)


def _tensors(graph):
    """The tensors a graph holds: initializers and attribute values, dense
    and sparse (a sparse one as its values, its indices and its dense
    shape)."""
    sparse = list(graph.sparse_initializer)
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField('t'):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField('sparse_tensor'):
                sparse.append(attribute.sparse_tensor)
            sparse.extend(attribute.sparse_tensors)
    for tensor in sparse:
        yield tensor.values
        yield tensor.indices
        # ONNX Runtime makes it dense: as large as its dims say
        yield onnx.TensorProto(name=tensor.values.name, dims=tensor.dims)


def _elements(dims):
    """The number of elements of a shape, or None if a dimension is < 0."""
    return None if any(d < 0 for d in dims) else math.prod(dims)


def _check_tensor(tensor, name):
    """Refuse a tensor whose data is in another file, or that is too large."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or \
            len(tensor.external_data):
        where = {e.key: e.value for e in tensor.external_data}
        raise ModelFileError(
            f'{name}: tensor {tensor.name!r} keeps its data in another file '
            f'({where.get("location", "no location")!r}); a model must hold '
            f'all its data: it reads no file but itself')
    elements = _elements(tensor.dims)
    if elements is None or elements > MAX_TENSOR_ELEMENTS:
        raise ModelFileError(
            f'{name}: tensor {tensor.name!r} has shape {list(tensor.dims)}, '
            f'a negative dimension or more than MAX_TENSOR_ELEMENTS = '
            f'{MAX_TENSOR_ELEMENTS} elements')


def _check_contents(model, name):
    """Refuse data kept in other files, large tensors and unknown operators,
    in the graph and in any graph nested in it."""
    if len(model.functions) or len(model.training_info):
        # graphs of their own, which no face embedding network needs
        raise ModelFileError(f'{name}: holds model-local functions or '
                             f'training information; an embedding network '
                             f'needs neither')
    graphs = list(_graphs(model.graph))
    for graph in graphs:  # data first: what an operator's graph would read
        for tensor in _tensors(graph):
            _check_tensor(tensor, name)
    for graph in graphs:
        for node in graph.node:
            if node.domain not in ('', 'ai.onnx') or \
                    node.op_type not in ALLOWED_OPS:
                raise ModelFileError(
                    f'{name}: operator {node.domain or "ai.onnx"}.'
                    f'{node.op_type} is not one of a face embedding network '
                    f'({", ".join(sorted(ALLOWED_OPS))})')


def _static_dims(value):
    """The dimensions of a ValueInfoProto's tensor; None if any is unknown."""
    if value is None or not value.type.HasField('tensor_type') or \
            not value.type.tensor_type.HasField('shape'):
        return None
    dims = value.type.tensor_type.shape.dim
    if not all(d.HasField('dim_value') and d.dim_value >= 0 for d in dims):
        return None
    return [d.dim_value for d in dims]


def _infer_for_one_face(model, name, input_name, image_size):
    """The model with every value's shape inferred for a batch of one face."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    shape = next(i for i in probe.graph.input
                 if i.name == input_name).type.tensor_type.shape
    del shape.dim[:]
    for size in (1, 3) + tuple(image_size):
        shape.dim.add().dim_value = size
    try:
        return onnx.shape_inference.infer_shapes(
            probe, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # InferenceError, ValidationError, ...
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelFileError(f'{name}: shapes cannot be inferred for one '
                             f'face: {first_line}') from e


def _check_sizes(model, name, input_name, image_size):
    """Refuse a graph whose values for one face have unknown shapes or more
    elements than MAX_TENSOR_ELEMENTS each, MAX_TOTAL_ELEMENTS in all."""
    graph = _infer_for_one_face(model, name, input_name, image_size).graph
    values = {v.name: v for v in [*graph.input, *graph.value_info,
                                  *graph.output]}
    total = sum(_elements(t.dims) for t in graph.initializer)
    for value_name, op in [(input_name, 'input')] + [
            (out, node.op_type) for node in graph.node for out in node.output
            if out]:
        dims = _static_dims(values.get(value_name))
        if dims is None:
            raise ModelFileError(f'{name}: the shape of {value_name!r} '
                                 f'({op}) is unknown for one face')
        if math.prod(dims) > MAX_TENSOR_ELEMENTS:
            raise ModelFileError(
                f'{name}: {value_name!r} ({op}) has shape {dims} for one '
                f'face, more than MAX_TENSOR_ELEMENTS = {MAX_TENSOR_ELEMENTS} '
                f'elements')
        total += math.prod(dims)
    if total > MAX_TOTAL_ELEMENTS:
        raise ModelFileError(f'{name}: {total} elements of weights and values '
                             f'for one face, more than MAX_TOTAL_ELEMENTS = '
                             f'{MAX_TOTAL_ELEMENTS}')


def _read(path):
    """The bytes of a model file: a regular file of bounded size."""
    size = os.stat(path).st_size  # FileNotFoundError names the path
    if size > MAX_MODEL_BYTES:
        raise ModelFileError(f'{path}: {size} bytes, more than the '
                             f'{MAX_MODEL_BYTES} an ONNX model can have')
    try:  # refuses a FIFO or a device instead of waiting on it
        return formats.read_regular_file(path, MAX_MODEL_BYTES)
    except ValueError as e:
        raise ModelFileError(str(e)) from e


class EmbeddingModel:
    """An ONNX face embedding model: InsightFace's input, one output."""

    def __init__(self, path, providers=('CPUExecutionProvider',)):
        self.path = path
        model = _parse(_read(path), path)
        initializers = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(model.graph.output) != 1:
            raise ModelFileError(
                f'{path}: expected one input and one output, not '
                f'{len(inputs)} and {len(model.graph.output)}')
        dims = [d.dim_value if d.HasField('dim_value') else None
                for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[1] != 3 or None in dims[2:] or \
                min(dims[2:]) < 1 or \
                inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ModelFileError(
                f'{path}: expected a float32 input of shape (batch, 3, '
                f'height, width) with a fixed height and width, not {dims}')
        if dims[0] is not None:
            raise ModelFileError(f'{path}: its input takes batches of '
                                 f'{dims[0]} faces only, not any number')
        self.input_name, self.image_size = inputs[0].name, tuple(dims[2:])
        # Before ONNX Runtime allocates anything for it
        _check_sizes(model, path, self.input_name, self.image_size)
        self.metadata = {p.key: p.value for p in model.metadata_props}
        # Files without our metadata, such as InsightFace's own, get
        # InsightFace's scaling.
        try:
            self.mean = float(self.metadata.get('input_mean', INPUT_MEAN))
            self.std = float(self.metadata.get('input_std', INPUT_STD))
        except ValueError as e:
            raise ModelFileError(f'{path}: metadata input_mean/input_std '
                                 f'are not numbers ({e})') from e
        if not (onp.isfinite(self.mean) and onp.isfinite(self.std)
                and self.std != 0):
            raise ModelFileError(f'{path}: metadata input_mean '
                                 f'{self.mean} and input_std {self.std} '
                                 f'cannot scale pixels')
        try:
            self.session = onnxruntime.InferenceSession(
                model.SerializeToString(), providers=list(providers))
        except Exception as e:  # onnxruntime's own Fail, NotImplemented...
            raise ModelFileError(f'{path}: ONNX Runtime cannot run it '
                                 f'({type(e).__name__}: {e})') from e
        self._check_embeds()

    def _check_embeds(self):
        """Refuse a model that does not give one embedding per face: run it
        on PROBE_FACES different faces, expect as many different rows."""
        faces = onp.random.default_rng(0).integers(
            0, 256, (PROBE_FACES, 3) + self.image_size, dtype=onp.uint8)
        try:
            out = onp.asarray(self.session.run(
                None, {self.input_name: self.scale(faces)})[0])
        except Exception as e:  # e.g. a batch size fixed inside the graph
            raise ModelFileError(
                f'{self.path}: ONNX Runtime cannot run it on {PROBE_FACES} '
                f'faces ({type(e).__name__}: {e})') from e
        if out.ndim != 2 or out.shape[0] != PROBE_FACES or \
                out.shape[1] == 0 or not onp.issubdtype(out.dtype, onp.floating):
            raise ModelFileError(
                f'{self.path}: gives {out.dtype} of shape {out.shape} for '
                f'{PROBE_FACES} faces, not one embedding per face, of shape '
                f'({PROBE_FACES}, d)')
        if not onp.isfinite(out).all():
            raise ModelFileError(f'{self.path}: gives embeddings that are not '
                                 f'finite (NaN or infinity)')
        if all(onp.array_equal(out[0], row) for row in out[1:]):
            raise ModelFileError(f'{self.path}: gives {PROBE_FACES} '
                                 f'different faces the same embedding')

    def check_faces(self, images):
        """uint8 faces of shape (n, 3, h, w) with n > 0 and h, w the model's."""
        images = onp.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (3,) + self.image_size \
                or len(images) == 0:
            raise ValueError(f'expected faces of shape (n, 3, '
                             f'{self.image_size[0]}, {self.image_size[1]}) '
                             f'with n > 0, not {images.shape}')
        if images.dtype != onp.uint8:
            raise ValueError(f'expected uint8 pixel values, not {images.dtype}')
        return images

    def scale(self, images):
        """uint8 faces (n, 3, h, w) -> the float32 input of the model."""
        images = self.check_faces(images)
        return ((images.astype(onp.float32) - onp.float32(self.mean)) /
                onp.float32(self.std))

    def embed(self, images, batch_size=256):
        """Embeddings (float32, not normalized) of uint8 faces (n, 3, h, w)."""
        images = self.check_faces(images)
        # Scaled a batch at a time: as float32 a whole set takes 4x its size.
        return onp.concatenate([
            self.session.run(None, {self.input_name: self.scale(
                images[i:i + batch_size])})[0]
            for i in range(0, len(images), batch_size)])

    def embed_pairs(self, images, batch_size=256):
        """Unit-length sums of the embeddings of images[0] and images[1]."""
        images = onp.asarray(images)
        if images.ndim != 5 or images.shape[0] != 2 or images.shape[1] == 0:
            raise ValueError(f'expected images of shape (2, n, 3, h, w) with '
                             f'n > 0, not {images.shape}')
        total = (self.embed(images[0], batch_size).astype(onp.float64) +
                 self.embed(images[1], batch_size))
        return total / onp.linalg.norm(total, axis=1, keepdims=True)
