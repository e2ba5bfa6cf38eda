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
"""
import os

import numpy as np
import onnx
import onnxruntime

from d2l_face import formats

# InsightFace's recognition models take (x - INPUT_MEAN) / INPUT_STD.
INPUT_MEAN = 127.5
INPUT_STD = 127.5
# A full-width Face-ResNet-100 takes a few hundred MB; protobuf, which holds
# an ONNX model, stops at 2 GB anyway.
MAX_MODEL_BYTES = 2 << 30


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
    # Written under a temporary name and renamed: a reader never sees half
    # a model, and a failed write leaves an older file in place.
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
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
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first_line = str(e).strip().splitlines()[0]
        raise ModelFileError(f'{name}: invalid ONNX model: {first_line}') \
            from e
    return model


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
                inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ModelFileError(
                f'{path}: expected a float32 input of shape (batch, 3, '
                f'height, width) with a fixed height and width, not {dims}')
        self.input_name, self.image_size = inputs[0].name, tuple(dims[2:])
        self.metadata = {p.key: p.value for p in model.metadata_props}
        # Files without our metadata, such as InsightFace's own, get
        # InsightFace's scaling.
        try:
            self.mean = float(self.metadata.get('input_mean', INPUT_MEAN))
            self.std = float(self.metadata.get('input_std', INPUT_STD))
        except ValueError as e:
            raise ModelFileError(f'{path}: metadata input_mean/input_std '
                                 f'are not numbers ({e})') from e
        if not (np.isfinite(self.mean) and np.isfinite(self.std)
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

    def check_faces(self, images):
        """uint8 faces of shape (n, 3, h, w) with n > 0 and h, w the model's."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (3,) + self.image_size \
                or len(images) == 0:
            raise ValueError(f'expected faces of shape (n, 3, '
                             f'{self.image_size[0]}, {self.image_size[1]}) '
                             f'with n > 0, not {images.shape}')
        if images.dtype != np.uint8:
            raise ValueError(f'expected uint8 pixel values, not {images.dtype}')
        return images

    def scale(self, images):
        """uint8 faces (n, 3, h, w) -> the float32 input of the model."""
        images = self.check_faces(images)
        return ((images.astype(np.float32) - np.float32(self.mean)) /
                np.float32(self.std))

    def embed(self, images, batch_size=256):
        """Embeddings (float32, not normalized) of uint8 faces (n, 3, h, w)."""
        images = self.check_faces(images)
        # Scaled a batch at a time: as float32 a whole set takes 4x its size.
        return np.concatenate([
            self.session.run(None, {self.input_name: self.scale(
                images[i:i + batch_size])})[0]
            for i in range(0, len(images), batch_size)])

    def embed_pairs(self, images, batch_size=256):
        """Unit-length sums of the embeddings of images[0] and images[1]."""
        images = np.asarray(images)
        if images.ndim != 5 or images.shape[0] != 2 or images.shape[1] == 0:
            raise ValueError(f'expected images of shape (2, n, 3, h, w) with '
                             f'n > 0, not {images.shape}')
        total = (self.embed(images[0], batch_size).astype(np.float64) +
                 self.embed(images[1], batch_size))
        return total / np.linalg.norm(total, axis=1, keepdims=True)
