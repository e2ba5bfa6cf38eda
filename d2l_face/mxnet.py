"""Code saved from the Face Recognition chapter (MXNet).

Everything below the WARNING line is written by ``make lib`` (``d2lbook build
lib``) from the cells marked ``#@save`` in ``chapter_face_recognition/*.md``;
only this header, which holds the imports that code needs, is edited by hand.
"""
import collections
import concurrent.futures
import glob
import json
import math
import mmap
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import weakref

import cv2
import numpy as onp
from d2l import mxnet as d2l
from IPython import display
import mxnet as mx
from mxnet import autograd, gluon, init, kv, np, npx
from mxnet.gluon import nn
from mxnet.gluon.data.vision import transforms

import d2l_face
from d2l_face import datahub, standin

npx.set_np()

#################   WARNING   ################
# The below part is generated automatically through:
#    d2lbook build lib
# Don't edit it directly

d2l.DATA_HUB['faces-casia-small'] = (
    d2l.DATA_URL + 'faces-casia-small.zip',
    'b2eed95fd98296c25af65623b8aaa3ee87f982ff')

d2l.DATA_HUB['faces-casia-ultrasmall'] = (
    d2l.DATA_URL + 'faces-casia-ultrasmall.zip',
    '352b9a33ca089307a07cec80c23b1765d304e95a')

def get_facerec_dir(name='faces-casia-ultrasmall'):
    """Return the folder of a face dataset, downloading or generating it.

    Defined in :numref:`sec_facerecognition_dataset`"""
    source = os.environ.get('D2L_FACE_SOURCE', 'auto').lower()
    if source not in ('auto', 'real', 'standin'):
        raise ValueError(f'D2L_FACE_SOURCE must be auto, real or standin, '
                         f'not {source!r}')
    if source == 'standin':
        return standin_facerec_dir(name)
    url, sha1_hash = d2l.DATA_HUB[name]
    try:
        return datahub.download_extract(url, sha1_hash, d2l_face.data_root(),
                                        subdir=name)
    except datahub.DownloadError as e:
        if source == 'real':
            raise
        print(f'NOTICE: the real {name} dataset is out of reach ({e}).\n'
              f'Using the generated stand-in data instead.')
        return standin_facerec_dir(name)

def standin_facerec_dir(name='faces-casia-ultrasmall'):
    """Generate (once) and return the stand-in for the ultrasmall set.

    Defined in :numref:`sec_facerecognition_dataset`"""
    if name != 'faces-casia-ultrasmall':
        raise ValueError(f'there is a stand-in for faces-casia-ultrasmall '
                         f'only, not for {name}')
    return standin.generate(os.path.join(d2l_face.data_root(), 'standin'))

def read_facerec_meta(data_dir):
    """Read `property`: return the crop size (h, w) and the class count.

    Defined in :numref:`sec_facerecognition_dataset`"""
    file_name = os.path.join(data_dir, 'property')
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f'{file_name}: no property file, is '
                                f'{data_dir} a face dataset folder?')
    with open(file_name, encoding='utf-8', errors='replace') as f:
        line = f.readline().strip()
    fields = line.split(',')
    if len(fields) != 3 or not all(x.strip().isdigit() for x in fields):
        raise ValueError(f'{file_name}: first line should be '
                         f'"num_classes,height,width", not {line!r}')
    num_classes, height, width = (int(x) for x in fields)
    if min(num_classes, height, width) < 1:
        raise ValueError(f'{file_name}: counts must be positive: {line!r}')
    return (height, width), num_classes

def read_face_image(path, image_size=None):
    """Read a JPEG face crop as an RGB uint8 array of shape (h, w, 3).

    Defined in :numref:`sec_facerecognition_dataset`"""
    with open(path, 'rb') as f:
        data = f.read()
    # libjpeg decodes a cut-off file with only a warning; a JPEG ends with
    # the EOI marker, so its absence means the file was truncated.
    if not data.rstrip(b'\0').endswith(b'\xff\xd9'):
        raise ValueError(f'{path}: not a complete JPEG file (truncated?)')
    image = cv2.imdecode(onp.frombuffer(data, onp.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f'{path}: cannot be decoded as an image')
    if image_size is not None and image.shape[:2] != tuple(image_size):
        raise ValueError(f'{path}: image is {image.shape[1]}x'
                         f'{image.shape[0]}, expected {image_size[1]}x'
                         f'{image_size[0]}')
    return image[:, :, ::-1]

def read_identity_images(data_dir, person_id, max_num=None):
    """Read the face crops of one identity, in file-name order.

    Defined in :numref:`sec_facerecognition_dataset`"""
    folder = os.path.join(data_dir, '%08d' % person_id)
    paths = sorted(glob.glob(os.path.join(folder, '*.jpg')))[:max_num]
    if not paths:
        raise FileNotFoundError(f'{folder}: no .jpg images for identity '
                                f'{person_id}')
    return [read_face_image(p) for p in paths]

def show_identities(data_dir, person_ids, num_per_id=8, scale=1.2):
    """Plot `num_per_id` face crops for each identity, one row each.

    Defined in :numref:`sec_facerecognition_dataset`"""
    imgs, titles = [], []
    for person_id in person_ids:
        row = read_identity_images(data_dir, person_id, num_per_id)
        imgs += row + [onp.zeros_like(row[0])] * (num_per_id - len(row))
        titles += [f'id {person_id}'] + [''] * (num_per_id - 1)
    return d2l.show_images(imgs, len(person_ids), num_per_id, titles,
                           scale=scale)

def list_facerec_images(data_dir):
    """Return [(path, label)] for every crop of every identity folder.

    Defined in :numref:`sec_facerecognition_dataset`"""
    _, num_classes = read_facerec_meta(data_dir)
    items = []
    for label in range(num_classes):
        folder = os.path.join(data_dir, '%08d' % label)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'{folder}: missing, although property '
                                    f'says there are {num_classes} classes')
        paths = sorted(glob.glob(os.path.join(folder, '*.jpg')))
        if not paths:
            raise FileNotFoundError(f'{folder}: holds no .jpg images')
        items += [(path, label) for path in paths]
    return items

class FaceDataset(gluon.data.Dataset):
    """Face crops with identity labels, randomly flipped left-right.

    Defined in :numref:`sec_facerecognition_dataset`"""
    def __init__(self, data_dir):
        self.image_size, self.num_classes = read_facerec_meta(data_dir)
        self.items = list_facerec_images(data_dir)
        self.transform = transforms.Compose([
            transforms.RandomFlipLeftRight(), transforms.ToTensor()])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        path, label = self.items[idx]
        image = np.array(read_face_image(path, self.image_size),
                         dtype='uint8')
        return self.transform(image), label

def facerec_pack_is_fresh(data_dir, prefix, items):
    """Whether prefix.rec/.idx hold the current `items` of a dataset.

    Defined in :numref:`sec_facerecognition_dataset`"""
    try:
        built = min(os.stat(prefix + ext).st_mtime_ns
                    for ext in ('.rec', '.idx'))
        with open(prefix + '.idx') as f:
            num_records = sum(1 for line in f if line.strip())
    except OSError:
        return False
    sources = [os.path.join(data_dir, 'property')]
    sources += sorted({os.path.dirname(path) for path, _ in items})
    sources += [path for path, _ in items]
    return (num_records == len(items) and
            all(os.stat(p).st_mtime_ns <= built for p in sources))

def pack_face_records(data_dir, name='train'):
    """Pack the JPEG crops of a dataset into name.rec/.idx (once).

    Defined in :numref:`sec_facerecognition_dataset`"""
    prefix = os.path.join(data_dir, name)
    items = list_facerec_images(data_dir)
    if facerec_pack_is_fresh(data_dir, prefix, items):
        return prefix
    image_size = read_facerec_meta(data_dir)[0]

    def checked_jpeg(item):
        read_face_image(item[0], image_size)  # complete, decodable, size
        with open(item[0], 'rb') as f:
            return f.read()

    # Write under temporary names, then move into place: an interrupted
    # run never leaves a pack that looks complete.
    tmp = f'{prefix}-tmp{os.getpid()}'
    writer = mx.recordio.MXIndexedRecordIO(tmp + '.idx', tmp + '.rec', 'w')
    try:
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            for first in range(0, len(items), 1024):  # check in threads
                chunk = items[first:first + 1024]
                jpegs = pool.map(checked_jpeg, chunk)
                for i, ((_, label), jpeg) in enumerate(zip(chunk, jpegs),
                                                       first):
                    header = mx.recordio.IRHeader(0, label, i, 0)
                    writer.write_idx(i, mx.recordio.pack(header, jpeg))
        writer.close()
        os.replace(tmp + '.rec', prefix + '.rec')
        os.replace(tmp + '.idx', prefix + '.idx')
    finally:
        writer.close()
        for ext in ('.rec', '.idx'):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    return prefix

class FaceRecordIter:
    """Shuffled, randomly flipped float32 batches from a packed dataset."""
    MAGIC = 0xced7230a  # begins every record of an MXNet RecordIO file
    HEADER = struct.Struct('<IfQQ')  # flag, label, id, id2

    def __init__(self, prefix, batch_size, image_size=(112, 112),
                 shuffle=True, flip=True, num_threads=None):
        """Defined in :numref:`sec_facerecognition_dataset`"""
        if batch_size < 1:
            raise ValueError(f'batch_size must be positive, not {batch_size}')
        self.rec_file, self.batch_size = prefix + '.rec', batch_size
        self.image_size, self.shuffle, self.flip = image_size, shuffle, flip
        offsets = self._read_index(prefix + '.idx')
        with open(self.rec_file, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                if size else b''
        self._bytes = onp.frombuffer(self._map, onp.uint8)
        self._joined = {}  # the JPEGs of records that were split in parts
        self.labels = onp.empty(len(offsets), onp.int64)
        self._spans = onp.empty((len(offsets), 2), onp.int64)
        for i, pos in enumerate(offsets):
            self.labels[i], self._spans[i] = self._read_record(i, pos)
        self.num_threads = num_threads or os.cpu_count() or 1
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
        self._buffers = []  # [batch array, its user]

    @staticmethod
    def _read_index(path):
        """Return the byte offsets of the records listed in an .idx file."""
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        try:
            return [int(line.split('\t')[1]) for line in lines]
        except (IndexError, ValueError):
            raise ValueError(f'{path}: damaged index, expected lines '
                             f'"key<TAB>offset"; delete it to rebuild the '
                             f'pack') from None

    def _damaged(self, i, pos, problem):
        return ValueError(f'{self.rec_file}: record {i} at byte {pos} is '
                          f'damaged ({problem}); delete the file to rebuild '
                          f'the pack')

    def _read_record(self, i, pos):
        """Return the label of record i and the (begin, end) of its JPEG."""
        parts, start = [], pos
        while True:
            if pos + 8 > len(self._map):
                raise self._damaged(i, start, 'the file ends inside it')
            magic, length = struct.unpack_from('<II', self._map, pos)
            kind, length = length >> 29, length & (1 << 29) - 1
            if magic != self.MAGIC or kind not in ((2, 3) if parts
                                                   else (0, 1)):
                raise self._damaged(i, start, 'no record starts there')
            if pos + 8 + length > len(self._map):
                raise self._damaged(i, start, 'the file ends inside it')
            parts.append((pos + 8, pos + 8 + length))
            pos += 8 + (length + 3) // 4 * 4  # records are 4-byte aligned
            if kind in (0, 3):  # a whole record, or the last part of one
                break
        size = self.HEADER.size  # the JPEG follows the image header
        if len(parts) == 1:
            (begin, end), = parts
            header, data_size = self._map[begin:begin + size], end - begin
            begin += size
        else:  # put back the magic numbers that separated the parts
            data = struct.pack('<I', self.MAGIC).join(
                self._map[a:b] for a, b in parts)
            header, data_size, begin, end = data[:size], len(data), -1, -1
            self._joined[i] = onp.frombuffer(data[size:], onp.uint8)
        if data_size <= size:
            raise self._damaged(i, start, 'too short to hold an image')
        flag, label, _, _ = self.HEADER.unpack(header)
        if flag != 0 or not 0 <= label < 2**31 or label != int(label):
            raise self._damaged(i, start, f'bad header, label {label}')
        return int(label), (begin, end)

    def __len__(self):
        return len(self.labels) // self.batch_size

    def _fill(self, batch, first, records, flips):
        """Decode, flip and convert images into batch[first:] (a thread)."""
        h, w = self.image_size
        rgb = onp.empty((3, h, w), onp.uint8)
        planes = [rgb[2], rgb[1], rgb[0]]  # cv2.split writes B, G, R
        spans = self._spans[records].tolist()
        for j, (i, (begin, end), flip) in enumerate(
                zip(records.tolist(), spans, flips.tolist()), first):
            jpeg = self._bytes[begin:end] if begin >= 0 else self._joined[i]
            image = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
            if image is None or image.shape != (h, w, 3):
                problem = ('cannot be decoded' if image is None else
                           f'is {image.shape[1]}x{image.shape[0]}, expected '
                           f'{w}x{h}')
                raise ValueError(f'{self.rec_file}: the image of record {i} '
                                 f'{problem}')
            if flip:
                image = cv2.flip(image, 1)
            cv2.split(image, planes)  # BGR (h, w, 3) -> RGB (3, h, w)
            x = batch[j]
            x[...] = rgb  # uint8 -> float32
            x /= 255

    def _submit(self, records, flips):
        """Start filling a free batch array with `records` in the threads."""
        for slot, (batch, user) in enumerate(self._buffers):
            if user is None or isinstance(user, weakref.ref) and \
                    user() is None:
                break
        else:
            slot, batch = len(self._buffers), onp.empty(
                (self.batch_size, 3) + tuple(self.image_size), onp.float32)
            self._buffers.append([batch, None])
        self._buffers[slot][1] = 'filling'
        chunk = -(-len(records) // (2 * self.num_threads))
        jobs = [self._pool.submit(self._fill, batch, lo,
                                  records[lo:lo + chunk], flips[lo:lo + chunk])
                for lo in range(0, len(records), chunk)]
        return slot, records, jobs

    def _finish(self, slot, records, jobs):
        """Wait for a batch and wrap it for MXNet (without copying it)."""
        try:
            for job in jobs:
                job.result()
        finally:
            concurrent.futures.wait(jobs)
            self._buffers[slot][1] = None
        view = self._buffers[slot][0].view()
        X = mx.nd.from_numpy(view, zero_copy=True, array_cls=np.ndarray)
        self._buffers[slot][1] = weakref.ref(view)  # dead once MXNet is done
        return X, np.array(self.labels[records], dtype='int64')

    def __iter__(self):
        n, bs = len(self.labels), self.batch_size
        order = onp.random.permutation(n) if self.shuffle else onp.arange(n)
        flips = onp.random.uniform(size=n) < 0.5 if self.flip \
            else onp.zeros(n, bool)
        todo = collections.deque((order[b * bs:(b + 1) * bs],
                                  flips[b * bs:(b + 1) * bs])
                                 for b in range(len(self)))
        pending = collections.deque()
        try:
            while todo or pending:
                while todo and len(pending) < 2:  # this batch and the next
                    pending.append(self._submit(*todo.popleft()))
                yield self._finish(*pending.popleft())
        finally:  # also when a loop stops early: let the threads finish
            for slot, _, jobs in pending:
                for job in jobs:
                    job.cancel()
                concurrent.futures.wait(jobs)
                self._buffers[slot][1] = None

def load_bin(path, image_size=(112, 112)):
    """Defined in :numref:`sec_facerecognition_dataset`"""
    """Load a .bin verification set: (images, issame).

    images: uint8 array of shape (2, 2 * num_pairs, 3, h, w), the second
    copy flipped left-right; issame: bool array of shape (num_pairs,)."""
    bins, issame = datahub.load_bin_pairs(path)
    data = onp.empty((2, len(bins), 3) + tuple(image_size), dtype=onp.uint8)
    for i, jpeg in enumerate(bins):
        image = cv2.imdecode(onp.frombuffer(jpeg, onp.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f'{path}: image {i} cannot be decoded')
        if image.shape[:2] != tuple(image_size):
            image = cv2.resize(image, tuple(image_size)[::-1])
        image = image[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
        data[0, i] = image
        data[1, i] = image[:, :, ::-1]
    return data, onp.array(issame, dtype=bool)

def load_data_face_rec(data_dir, load_val=(), batch_size=512):
    """Return a training data iterator and a dict of verification sets.

    Defined in :numref:`sec_facerecognition_dataset`"""
    train_iter = FaceRecordIter(pack_face_records(data_dir), batch_size,
                                read_facerec_meta(data_dir)[0])
    val_sets = {}
    for name in load_val:
        path = os.path.join(data_dir, name + '.bin')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no verification set {name!r}')
        val_sets[name] = load_bin(path, read_facerec_meta(data_dir)[0])
    return train_iter, val_sets

def show_verification_pairs(images, issame, num_pairs=6, scale=1.5):
    """Plot the first pairs of a verification set with their labels.

    Defined in :numref:`sec_facerecognition_dataset`"""
    first = [images[0, 2 * i].transpose(1, 2, 0) for i in range(num_pairs)]
    second = [images[0, 2 * i + 1].transpose(1, 2, 0)
              for i in range(num_pairs)]
    titles = ['same' if issame[i] else 'different' for i in range(num_pairs)]
    return d2l.show_images(first + second, 2, num_pairs,
                           titles + [''] * num_pairs, scale=scale)

ARCFACE_TEMPLATE = onp.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]], dtype=onp.float32)

def check_landmarks(landmark):
    """Return landmarks as a float64 (5, 2) array, or raise ValueError.

    Defined in :numref:`sec_facerecognition_dataset`"""
    landmark = onp.asarray(landmark, dtype=onp.float64)
    if landmark.shape != (5, 2):
        raise ValueError(f'landmark must have shape (5, 2), not '
                         f'{landmark.shape}')
    if not onp.isfinite(landmark).all():
        raise ValueError('landmark holds NaN or infinite values')
    xs, ys = landmark.T.tolist()
    mean_x, mean_y = sum(xs) / 5, sum(ys) / 5
    sxx = syy = sxy = 0.0
    for x, y in zip(xs, ys):
        x, y = x - mean_x, y - mean_y
        sxx, syy, sxy = sxx + x * x, syy + y * y, sxy + x * y
    # Eigenvalues of [[sxx, sxy], [sxy, syy]], the squared singular values
    # of the centred points: the larger from the closed form, the smaller as
    # determinant / larger (which avoids subtracting nearly equal numbers).
    large = (sxx + syy) / 2 + (((sxx - syy) / 2) ** 2 + sxy ** 2) ** 0.5
    small = max(sxx * syy - sxy ** 2, 0.0) / large if large > 0 else 0.0
    if large < 1e-12:  # the points spread less than 1e-6 pixels
        raise ValueError('landmark points all coincide')
    if small < 1e-6 * large:  # one axis is 1000 times shorter than the other
        raise ValueError('landmark points are collinear')
    return landmark

def estimate_similarity(src, dst):
    """Least-squares similarity transform mapping src onto dst: (2, 3).

    Defined in :numref:`sec_facerecognition_dataset`"""
    xs, ys = onp.asarray(src).T.tolist()
    us, vs = onp.asarray(dst).T.tolist()
    n = len(xs)
    px, py, qx, qy = sum(xs) / n, sum(ys) / n, sum(us) / n, sum(vs) / n
    norm = dot = cross = 0.0  # the sums in the formulas for a and b
    for x, y, u, v in zip(xs, ys, us, vs):
        x, y, u, v = x - px, y - py, u - qx, v - qy
        norm += x * x + y * y
        dot += x * u + y * v
        cross += x * v - y * u
    a, b = (dot / norm, cross / norm) if norm else (onp.nan, onp.nan)
    return onp.array([[a, -b, qx - a * px + b * py],
                      [b, a, qy - b * px - a * py]])

def face_align(image, landmark, image_size=112):
    """Warp a face so its 5 landmarks match the ArcFace template.

    Defined in :numref:`sec_facerecognition_dataset`"""
    if not isinstance(image, onp.ndarray) or image.ndim not in (2, 3) \
            or image.size == 0:
        raise ValueError('image must be a non-empty (h, w) or (h, w, c) '
                         'numpy array')
    M = estimate_similarity(check_landmarks(landmark),
                            ARCFACE_TEMPLATE * (image_size / 112))
    return cv2.warpAffine(image, M, (image_size, image_size),
                          borderValue=0.0)

class ChannelPReLU(nn.HybridBlock):
    """PReLU with one learned slope per channel, for (N, C, H, W) inputs.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        # The weight of shape (C, 1, 1, 1) holds the negative slopes.
        self.slope = nn.Conv2D(channels, 1, groups=channels, use_bias=False,
                               in_channels=channels,
                               weight_initializer=init.Constant(0.25))

    def hybrid_forward(self, F, x):
        return F.npx.relu(x) + self.slope(F.np.minimum(x, 0))

class FaceResidual(nn.HybridBlock):
    """Residual unit of Face-ResNet: BN-conv-BN-PReLU-conv-BN + shortcut.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, in_channels, channels, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.body = nn.HybridSequential()
        self.body.add(
            nn.BatchNorm(in_channels=in_channels),
            nn.Conv2D(channels, 3, padding=1, use_bias=False,
                      in_channels=in_channels),
            nn.BatchNorm(in_channels=channels),
            ChannelPReLU(channels),
            # Striding the second convolution lets the first one still see
            # the input at full resolution.
            nn.Conv2D(channels, 3, strides=strides, padding=1, use_bias=False,
                      in_channels=channels),
            nn.BatchNorm(in_channels=channels))
        self.shortcut = None
        if strides != 1 or in_channels != channels:
            self.shortcut = nn.HybridSequential()
            self.shortcut.add(
                nn.Conv2D(channels, 1, strides=strides, use_bias=False,
                          in_channels=in_channels),
                nn.BatchNorm(in_channels=channels))

    def hybrid_forward(self, F, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + shortcut

FACE_RESNET_UNITS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3],
                     100: [3, 13, 30, 3]}

class FaceResNet(nn.HybridBlock):
    """ResNet for 112x112 faces, mapping images to embedding vectors.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, units, width=1.0, embedding_size=512, dropout=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        channels = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.HybridSequential()
        self.stem.add(nn.Conv2D(channels[0], 3, padding=1, use_bias=False,
                                in_channels=3),
                      nn.BatchNorm(in_channels=channels[0]),
                      ChannelPReLU(channels[0]))
        self.stages = nn.HybridSequential()
        in_channels = channels[0]
        for num_units, out_channels in zip(units, channels):
            stage = nn.HybridSequential()
            for i in range(num_units):
                stage.add(FaceResidual(in_channels, out_channels,
                                       strides=2 if i == 0 else 1))
                in_channels = out_channels
            self.stages.add(stage)
        self.head = nn.HybridSequential()
        self.head.add(
            nn.BatchNorm(in_channels=in_channels), nn.Dropout(dropout),
            nn.Flatten(),
            nn.Dense(embedding_size, in_units=in_channels * 7 * 7),
            # A fixed scale keeps every embedding dimension on the same
            # footing; the batch norm only centres and standardises them.
            nn.BatchNorm(scale=False, in_channels=embedding_size))

    def hybrid_forward(self, F, x):
        x = (x - 0.5) / 0.5  # [0, 1] pixels, as ToTensor makes them
        return self.head(self.stages(self.stem(x)))

def face_resnet(depth=18, width=1.0, embedding_size=512, dropout=0.0):
    """Return a Face-ResNet of the given depth (18, 34, 50 or 100).

    Defined in :numref:`sec_facerecognition_arcface`"""
    if depth not in FACE_RESNET_UNITS:
        raise ValueError(f'depth must be one of '
                         f'{sorted(FACE_RESNET_UNITS)}, not {depth!r}')
    if not width > 0:
        raise ValueError(f'width must be positive, not {width!r}')
    return FaceResNet(FACE_RESNET_UNITS[depth], width, embedding_size,
                      dropout)

def count_parameters(net, trainable_only=True):
    """Count the parameter values of a block (skip BN statistics if asked).

    Defined in :numref:`sec_facerecognition_arcface`"""
    return sum(math.prod(p.shape) for p in net.collect_params().values()
               if p.grad_req != 'null' or not trainable_only)

def margin_target_logit(theta, s=1.0, m1=1.0, m2=0.0, m3=0.0):
    """Target-class logit s * (cos(m1 * theta + m2) - m3), for angles theta.

    Defined in :numref:`sec_facerecognition_arcface`"""
    theta_max = (math.pi - m2) / m1
    # Clamping keeps the unused branch of np.where finite, so it adds
    # nothing (not NaN) to the gradient.
    margin = np.cos(m1 * np.minimum(theta, theta_max) + m2)
    beyond = np.cos(theta) - (1 + math.cos(theta_max))
    return s * (np.where(theta <= theta_max, margin, beyond) - m3)

MARGIN_SETTINGS = {  # (m1, m2, m3)
    'softmax': (1.0, 0.0, 0.0), 'sphereface': (1.35, 0.0, 0.0),
    'cosface': (1.0, 0.0, 0.35), 'arcface': (1.0, 0.5, 0.0),
    'combined': (1.0, 0.3, 0.2)}

class MarginLogits(nn.Block):
    """Scaled cosine logits with an angular margin on the target class.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, num_classes, embedding_size, s=64.0, m1=1.0, m2=0.0,
                 m3=0.0, eps=1e-7, **kwargs):
        super().__init__(**kwargs)
        if not s > 0 or not m1 > 0 or not 0 <= m2 < math.pi:
            raise ValueError(f'need s > 0, m1 > 0 and 0 <= m2 < pi, not '
                             f's={s}, m1={m1}, m2={m2}')
        self.num_classes, self.eps = num_classes, eps
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.weight = self.params.get(
            'weight', shape=(num_classes, embedding_size),
            init=init.Normal(0.01))

    def forward(self, embeddings, labels):
        def unit_rows(x):
            return x / np.sqrt((x * x).sum(axis=1, keepdims=True) + 1e-12)
        weight = self.weight.data(embeddings.ctx)
        cos = np.dot(unit_rows(embeddings), unit_rows(weight).T)
        cos = np.clip(cos, -1 + self.eps, 1 - self.eps)
        cos_target = npx.pick(cos, labels, axis=1)
        target = margin_target_logit(np.arccos(cos_target), self.s,
                                     self.m1, self.m2, self.m3)
        # Replace the target column of s * cos by the margin logit.
        one_hot = npx.one_hot(labels, self.num_classes)
        return self.s * cos + one_hot * (target - self.s * cos_target)[:, None]

def all_devices():
    """Every GPU there is, or the CPU when there is none.

    Defined in :numref:`sec_facerecognition_training`"""
    return [npx.gpu(i) for i in range(npx.num_gpus())] or [npx.cpu()]

def embed_pairs(net, images, batch_size=256, devices=None):
    """Unit-length sums of the embeddings of images[0] and images[1].

    Defined in :numref:`sec_facerecognition_training`"""
    devices = devices or all_devices()
    if images.ndim != 5 or images.shape[0] != 2 or images.shape[1] == 0:
        raise ValueError(f'expected images of shape (2, n, 3, h, w) with '
                         f'n > 0, not {images.shape}')
    chunks = []
    for i in range(0, images.shape[1], batch_size):
        total = 0
        for copy in images[:, i:i + batch_size]:  # as it is, then flipped
            X = np.array(copy).astype('float32') / 255
            # a part for each device; fewer parts than devices at the end
            parts = gluon.utils.split_and_load(
                X, devices[:len(X)], even_split=False)
            total = total + onp.concatenate(
                [net(part).asnumpy() for part in parts])
        chunks.append(total)
    embeddings = onp.concatenate(chunks).astype(onp.float64)
    return embeddings / onp.linalg.norm(embeddings, axis=1, keepdims=True)

def pair_scores(embeddings):
    """Cosine similarity of the two unit embeddings of each pair.

    Defined in :numref:`sec_facerecognition_training`"""
    embeddings = onp.asarray(embeddings)
    if embeddings.ndim != 2 or len(embeddings) % 2:
        raise ValueError(f'expected two embeddings per pair, in rows, not '
                         f'an array of shape {embeddings.shape}')
    return (embeddings[0::2] * embeddings[1::2]).sum(axis=1)

def check_pairs(scores, issame, num_folds=1):
    """Scores (float64) and labels (bool) of pairs, checked to fit.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = onp.asarray(scores, onp.float64), onp.asarray(issame)
    if scores.ndim != 1 or issame.shape != scores.shape:
        raise ValueError(f'expected one score and one label per pair, not '
                         f'shapes {scores.shape} and {issame.shape}')
    if len(scores) < max(num_folds, 1):
        raise ValueError(f'{len(scores)} pairs are too few for '
                         f'{max(num_folds, 1)} fold(s)')
    if not onp.isfinite(scores).all():
        bad = onp.flatnonzero(~onp.isfinite(scores))
        raise ValueError(f'{len(bad)} scores are NaN or infinite, the first '
                         f'of pair {bad[0]}: is an embedding all zeros?')
    if not onp.isin(issame, (0, 1)).all():
        raise ValueError('labels must be True/False or 1/0')
    return scores, issame.astype(bool)

def count_accepts_sorted(descending, same, thresholds):
    """True and false accepts (score > threshold) of sorted scores.

    Defined in :numref:`sec_facerecognition_training`"""
    same_in_top = onp.concatenate([[0], onp.cumsum(same)])
    # k[i]: how many scores lie strictly above thresholds[i]
    k = onp.searchsorted(-descending, -onp.asarray(thresholds), side='left')
    return same_in_top[k], k - same_in_top[k]

def count_accepts(scores, issame, thresholds):
    """True and false accepts (score > threshold) for each threshold.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    order = onp.argsort(-scores, kind='stable')
    return count_accepts_sorted(scores[order], issame[order], thresholds)

def candidate_thresholds(scores, is_sorted=False):
    """One threshold per distinct decision, from accept none to accept all.

    Defined in :numref:`sec_facerecognition_training`"""
    scores = onp.asarray(scores, onp.float64)
    if scores.size == 0 or not onp.isfinite(scores).all():
        raise ValueError('need at least one score, and no NaN or infinity')
    descending = scores if is_sorted else onp.sort(scores)[::-1]
    values = descending[onp.concatenate([[True],
                                         descending[1:] != descending[:-1]])]
    return onp.concatenate([values[:1], (values[:-1] + values[1:]) / 2,
                            [onp.nextafter(values[-1], -onp.inf)]])

def best_threshold_sorted(descending, same, thresholds=None):
    """The most accurate threshold (the first on ties) for sorted scores.

    Defined in :numref:`sec_facerecognition_training`"""
    if thresholds is None:
        thresholds = candidate_thresholds(descending, is_sorted=True)
    true_accepts, false_accepts = count_accepts_sorted(descending, same,
                                                       thresholds)
    correct = true_accepts + (len(same) - same.sum()) - false_accepts
    best = onp.argmax(correct)
    return thresholds[best], correct[best] / len(descending)

def best_threshold(scores, issame, thresholds=None):
    """The most accurate threshold (the first on ties) and its accuracy.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    order = onp.argsort(-scores, kind='stable')
    return best_threshold_sorted(scores[order], issame[order], thresholds)

def kfold_splits(num_pairs, num_folds=10):
    """Indices of the test pairs of each fold: contiguous, sizes within 1.

    Defined in :numref:`sec_facerecognition_training`"""
    if num_folds < 2 or num_pairs < num_folds:
        raise ValueError(f'need 2 or more folds, and at least one pair per '
                         f'fold: {num_pairs} pairs, {num_folds} folds')
    return onp.array_split(onp.arange(num_pairs), num_folds)

def kfold_train_test(num_pairs, num_folds=10):
    """Yield (train mask, test indices) for each fold.

    Defined in :numref:`sec_facerecognition_training`"""
    for test in kfold_splits(num_pairs, num_folds):
        train = onp.ones(num_pairs, bool)
        train[test] = False
        yield train, test

def verification_accuracy(scores, issame, num_folds=10, thresholds=None):
    """k-fold verification accuracy: mean, std and each fold's threshold.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame, num_folds)
    # Sort once for all folds: dropping a fold from a sorted list keeps the
    # rest sorted, so each fold only needs a mask, not a sort of its own.
    order = onp.argsort(-scores, kind='stable')
    descending, same = scores[order], issame[order]
    accuracies, fold_thresholds = [], []
    for train, test in kfold_train_test(len(scores), num_folds):
        keep = train[order]
        t, _ = best_threshold_sorted(descending[keep], same[keep], thresholds)
        accuracies.append(((scores[test] > t) == issame[test]).mean())
        fold_thresholds.append(t)
    return (onp.mean(accuracies), onp.std(accuracies),
            onp.array(fold_thresholds))

def standard_error(std, num_folds=10):
    """LFW's standard error of the mean, from the std over folds (np.std).

    Defined in :numref:`sec_facerecognition_training`"""
    return std / onp.sqrt(num_folds - 1)

def far_threshold(scores, issame, far=1e-3):
    """Lowest threshold that accepts at most a fraction `far` of impostors.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    if not 0 <= far <= 1:
        raise ValueError(f'far must lie between 0 and 1, not {far}')
    different = onp.sort(scores[~issame])[::-1]
    allowed = int(onp.floor(far * len(different) + 1e-9))
    if allowed >= len(different):
        return onp.nextafter(scores.min(), -onp.inf)  # accept everything
    return different[allowed]

def val_at_far(scores, issame, far=1e-3, num_folds=10):
    """k-fold VAL at a target FAR: mean and std of VAL, mean of FAR.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame, num_folds)
    if issame.all() or not issame.any():
        raise ValueError('VAL and FAR need both same and different pairs')
    vals, fars = [], []
    for train, test in kfold_train_test(len(scores), num_folds):
        t = far_threshold(scores[train], issame[train], far)
        accepted, same = scores[test] > t, issame[test]
        if same.any():  # tiny sets may have folds without same pairs
            vals.append(accepted[same].mean())
        if not same.all():
            fars.append(accepted[~same].mean())
    return onp.mean(vals), onp.std(vals), onp.mean(fars)

def roc_curve(scores, issame):
    """False and true accept rates at every distinct threshold.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    if issame.all() or not issame.any():
        raise ValueError('a ROC curve needs both same and different pairs')
    true_accepts, false_accepts = count_accepts(
        scores, issame, candidate_thresholds(scores))
    return (false_accepts / (~issame).sum(), true_accepts / issame.sum())

def plot_roc(curves, figsize=(4.5, 3.5)):
    """Plot ROC curves, given as a dict name -> (fpr, tpr), log-scaled FPR.

    Defined in :numref:`sec_facerecognition_training`"""
    d2l.use_svg_display()
    _, ax = d2l.plt.subplots(figsize=figsize)
    for name, (fpr, tpr) in curves.items():
        ax.step(fpr, tpr, where='post', label=name)
    ax.set_xscale('log')
    ax.set_xlim(min(fpr[fpr > 0].min() for fpr, _ in curves.values()), 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel('false accept rate')
    ax.set_ylabel('true accept rate')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()

def plot_score_histogram(scores, issame, threshold=None, figsize=(4.5, 3)):
    """Histograms of the scores of same and of different pairs.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    d2l.use_svg_display()
    _, ax = d2l.plt.subplots(figsize=figsize)
    bins = onp.linspace(scores.min(), scores.max(), 40)
    ax.hist(scores[issame], bins, alpha=0.6, label='same')
    ax.hist(scores[~issame], bins, alpha=0.6, label='different')
    if threshold is not None:
        ax.axvline(threshold, color='k', linestyle='--', label='threshold')
    ax.set_xlabel('cosine similarity')
    ax.set_ylabel('pairs')
    ax.legend()

def evaluate_verification(net, verification_set, batch_size=256,
                          devices=None, far=1e-3, num_folds=10):
    """Verification accuracy and VAL at FAR of `net` on one .bin set.

    Defined in :numref:`sec_facerecognition_training`"""
    images, issame = verification_set
    scores = pair_scores(embed_pairs(net, images, batch_size, devices))
    acc, acc_std, thresholds = verification_accuracy(scores, issame,
                                                     num_folds)
    val, val_std, far_measured = val_at_far(scores, issame, far, num_folds)
    return {'acc': acc, 'acc_std': acc_std,
            'acc_se': standard_error(acc_std, num_folds),
            'threshold': thresholds.mean(), 'val': val, 'val_std': val_std,
            'far': far_measured}

class TrainingBoard:
    """Live plot: training loss on the left, accuracies on the right."""
    def __init__(self, xlim, figsize=(7, 2.8)):
        """Defined in :numref:`sec_facerecognition_training`"""
        d2l.use_svg_display()
        self.fig, self.axes = d2l.plt.subplots(1, 2, figsize=figsize)
        self.xlim, self.curves = xlim, {}

    def add(self, x, values, status=''):
        """Add a point at x to each named curve, redraw, print a status."""
        for name, value in values.items():
            xs, ys = self.curves.setdefault(name, ([], []))
            xs.append(x)
            ys.append(value)
        for ax in self.axes:
            ax.cla()
        for name, (xs, ys) in self.curves.items():
            on_left = name == 'train loss'
            (self.axes[0] if on_left else self.axes[1]).plot(
                xs, ys, '-' if name.startswith('train') else 'o-',
                label=name)
        d2l.set_axes(self.axes[0], 'epoch', 'loss', self.xlim, None,
                     'linear', 'linear', None)
        d2l.set_axes(self.axes[1], 'epoch', 'accuracy', self.xlim, [0, 1],
                     'linear', 'linear', None)
        for ax in self.axes:
            ax.legend()
        self.fig.tight_layout()
        display.display(self.fig)
        if status:
            print(status)
        display.clear_output(wait=True)

    def finish(self):
        """Show the final plot for good and close its figure."""
        display.display(self.fig)
        d2l.plt.close(self.fig)

def train_face_step(net, margin, loss, trainer, X, y, devices,
                    batch_size=None):
    """One SGD step on a batch split among devices: (loss sum, # correct).

    Defined in :numref:`sec_facerecognition_training`"""
    Xs = gluon.utils.split_and_load(X, devices, even_split=False)
    ys = gluon.utils.split_and_load(y, devices, even_split=False)
    with autograd.record():
        logits = [margin(net(X_i), y_i) for X_i, y_i in zip(Xs, ys)]
        losses = [loss(l, y_i) for l, y_i in zip(logits, ys)]
    for l in losses:
        l.backward()
    trainer.step(batch_size or X.shape[0])
    correct = sum(float((l.argmax(axis=1).astype('int64') ==
                         y_i.astype('int64')).sum())
                  for l, y_i in zip(logits, ys))
    return sum(float(l.sum()) for l in losses), correct

def facerec_trainer(net, margin, num_steps, lr, wd=5e-4, momentum=0.9,
                    warmup_steps=0, kvstore='device'):
    """SGD with momentum and weight decay, its learning rate on a cosine.

    Defined in :numref:`sec_facerecognition_training`"""
    schedule = mx.lr_scheduler.CosineScheduler(
        int(num_steps), lr, final_lr=0, warmup_steps=warmup_steps)
    params = (list(net.collect_params().values()) +
              list(margin.collect_params().values()))
    return gluon.Trainer(params, 'sgd', {
        'learning_rate': lr, 'momentum': momentum, 'wd': wd,
        'lr_scheduler': schedule}, kvstore=kvstore)

def describe_batches(train_iter):
    """How many images in batches of what size, where the iterator says.

    Defined in :numref:`sec_facerecognition_training`"""
    labels = getattr(train_iter, 'labels', None)  # as FaceRecordIter has
    batch_size = getattr(train_iter, 'batch_size', None)
    if labels is None or batch_size is None:
        size = len(train_iter) if hasattr(train_iter, '__len__') else '?'
        return f'{type(train_iter).__name__} of length {size}'
    return (f'{len(labels)} images in batches of {batch_size}, the last '
            f'incomplete batch dropped')

def check_train_input(train_iter, num_steps, eval_every=1, log_every=1):
    """Refuse counts below 1, and training data without a single batch.

    Defined in :numref:`sec_facerecognition_training`"""
    for name, value in [('num_steps', num_steps), ('eval_every', eval_every),
                        ('log_every', log_every)]:
        if not value >= 1 or int(value) != value:
            raise ValueError(f'{name} must be a whole number of at least 1, '
                             f'not {value!r}')
    if len(train_iter) == 0:
        raise ValueError(f'the training data yields no batch: '
                         f'{describe_batches(train_iter)}')

def facerec_batches(train_iter, num_steps):
    """Yield num_steps batches, going through train_iter as often as needed.

    Defined in :numref:`sec_facerecognition_training`"""
    step = 0
    while True:
        empty = True
        for X, y in train_iter:
            empty, step = False, step + 1
            yield X, y
            if step == num_steps:
                return
        if empty:
            raise ValueError(f'a pass over the training data yielded no '
                             f'batch, after step {step}: '
                             f'{describe_batches(train_iter)}')

def training_status(step, num_steps, history, images_per_sec):
    """One line: the step, the latest value of each curve, the speed.

    Defined in :numref:`sec_facerecognition_training`"""
    latest = ', '.join(f'{name} {points[-1][1]:.3f}'
                       for name, points in history.items())
    return (f'step {step}/{num_steps}: {latest}, '
            f'{images_per_sec:.1f} images/sec')

def train_facerec(net, margin, train_iter, verification_sets, num_steps, lr,
                  wd=5e-4, momentum=0.9, warmup_steps=0, eval_every=100,
                  log_every=10, devices=None, plot=True):
    """Train a face embedding network with margin logits, on all devices.

    Defined in :numref:`sec_facerecognition_training`"""
    check_train_input(train_iter, num_steps, eval_every, log_every)
    devices, steps_per_epoch = devices or all_devices(), len(train_iter)
    for block in (net, margin):
        block.collect_params().reset_ctx(devices)
    trainer = facerec_trainer(net, margin, num_steps, lr, wd, momentum,
                              warmup_steps)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    board = TrainingBoard([0, num_steps / steps_per_epoch]) if plot else None
    history, metric = collections.defaultdict(list), d2l.Accumulator(3)
    timer, seen = d2l.Timer(), 0  # seen: images trained on, for the speed
    for step, (X, y) in enumerate(facerec_batches(train_iter, num_steps), 1):
        timer.start()
        metric.add(*train_face_step(net, margin, loss, trainer, X, y,
                                    devices), X.shape[0])
        timer.stop()
        seen, values = seen + X.shape[0], {}
        if step % log_every == 0 or step == num_steps:
            values['train loss'] = metric[0] / metric[2]
            values['train acc'] = metric[1] / metric[2]
            metric.reset()
        if step % eval_every == 0 or step == num_steps:
            for name, verification_set in verification_sets.items():
                values[name] = evaluate_verification(
                    net, verification_set, devices=devices)['acc']
        for name, value in values.items():
            history[name].append((step / steps_per_epoch, value))
        status = training_status(step, num_steps, history,
                                 seen / timer.sum())
        if board and values:
            board.add(step / steps_per_epoch, values, status)
    if board:
        board.finish()
    print(f'{status}\non {devices}: {timer.sum():.1f} sec of training steps')
    return dict(history)

CPU_CONFIG = dict(  # a narrow network and a short training
    depth=18, width=0.125, embedding_size=128, batch_per_device=64,
    num_steps=450, eval_every=90, lr=0.1, warmup_steps=30, wd=5e-4,
    momentum=0.9, s=16.0, margin='arcface')

GPU_CONFIG = dict(  # a full-width Face-ResNet-50, on all GPUs
    CPU_CONFIG, depth=50, width=1.0, embedding_size=512,
    batch_per_device=128, num_steps=2000, eval_every=200)

def set_seeds(seed=0):
    """Seed Python's, NumPy's and MXNet's random number generators.

    Defined in :numref:`sec_facerecognition_training`"""
    random.seed(seed)
    onp.random.seed(seed)
    npx.random.seed(seed)

def embed_face(net, image, devices=None):
    """Unit embedding of one aligned RGB uint8 face of shape (h, w, 3).

    Defined in :numref:`sec_facerecognition_training`"""
    image = onp.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'expected an RGB image of shape (h, w, 3), not '
                         f'{image.shape}')
    chw = image.astype(onp.uint8).transpose(2, 0, 1)
    both = onp.stack([chw, chw[:, :, ::-1]])[:, None]  # (2, 1, 3, h, w)
    return embed_pairs(net, both, 1, devices)[0]

def identify(probes, gallery, threshold=None):
    """Most similar gallery row of each unit probe, its cosine; -1: nobody.

    Defined in :numref:`sec_facerecognition_training`"""
    probes = onp.asarray(probes, onp.float64)
    gallery = onp.asarray(gallery, onp.float64)
    if probes.ndim != 2 or gallery.ndim != 2 or len(gallery) == 0 or \
            probes.shape[1] != gallery.shape[1]:
        raise ValueError(f'expected probes (n, d) and a non-empty gallery '
                         f'(m, d), not {probes.shape} and {gallery.shape}')
    similarity = probes @ gallery.T
    # A NaN embedding (of a failed enrollment, say) is similar to nothing:
    # argmax would pick it, so it gets -inf and never wins.
    similarity[onp.isnan(similarity)] = -onp.inf
    best = similarity.argmax(axis=1)
    cosine = similarity[onp.arange(len(best)), best]
    nobody = ~(cosine > (-onp.inf if threshold is None else threshold))
    return onp.where(nobody, -1, best), cosine

def split_classes(num_classes, num_shards):
    """Split range(num_classes) into `num_shards` contiguous (start, stop).

    Defined in :numref:`sec_facerecognition_parallel`"""
    if not 1 <= num_shards <= num_classes:
        raise ValueError(f'cannot split {num_classes} classes into '
                         f'{num_shards} non-empty shards')
    base, extra = divmod(num_classes, num_shards)
    stops = [(i + 1) * base + min(i + 1, extra) for i in range(num_shards)]
    return list(zip([0] + stops[:-1], stops))

class ShardedMarginLoss(nn.Block):
    """Margin softmax loss with the class weight split over devices.

    Defined in :numref:`sec_facerecognition_parallel`"""
    def __init__(self, num_classes, embedding_size, devices, s=64.0, m1=1.0,
                 m2=0.0, m3=0.0, **kwargs):
        super().__init__(**kwargs)
        self.devices = list(devices)
        self.ranges = split_classes(num_classes, len(self.devices))
        self.shards = []
        for i, ((start, stop), device) in enumerate(zip(self.ranges,
                                                        self.devices)):
            shard = MarginLogits(stop - start, embedding_size, s, m1, m2, m3)
            shard.initialize(ctx=device)
            self.register_child(shard, f'shard{i}')
            self.shards.append(shard)

    def shard_logits(self, embeddings, labels):
        """Return each shard's margin logits, (batch, its classes), on its
        own device."""
        return [shard(embeddings.as_in_ctx(device),
                      labels.as_in_ctx(device) - start)
                for shard, device, (start, _) in zip(
                    self.shards, self.devices, self.ranges)]

    def forward(self, embeddings, labels):
        home = embeddings.ctx
        logits = self.shard_logits(embeddings, labels)
        # 1. k maxima per example come home; the largest is the shift M.
        top = np.stack([z.max(axis=1).as_in_ctx(home) for z in logits])
        top = top.max(axis=0).detach()
        sum_exp, target = 0, 0
        for z, device, (start, stop) in zip(logits, self.devices,
                                            self.ranges):
            # 2. Each shard sums exp(z - M) over its classes.
            shift = top.as_in_ctx(device).reshape(-1, 1)
            sum_exp = sum_exp + np.exp(z - shift).sum(axis=1).as_in_ctx(home)
            # 3. The shard that owns the label sends the target logit.
            local = labels.as_in_ctx(device) - start
            owned = (local >= 0) * (local < stop - start)
            picked = npx.pick(z, local, axis=1, mode='clip') * owned
            target = target + picked.as_in_ctx(home)
        return np.log(sum_exp) + top - target

def free_port():
    """Return a TCP port on 127.0.0.1 that nobody listens on right now.

    Defined in :numref:`sec_facerecognition_parallel`"""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def launch_local_cluster(worker_args, num_workers=2, num_servers=1,
                         timeout=300, env=None):
    """Run a dist kvstore job on 127.0.0.1; return each worker's output.

    Defined in :numref:`sec_facerecognition_parallel`"""
    if num_workers < 1 or num_servers < 1:
        raise ValueError('need at least one worker and one server')
    cluster = {**os.environ, 'DMLC_PS_ROOT_URI': '127.0.0.1',
               'DMLC_PS_ROOT_PORT': str(free_port()),
               'DMLC_NUM_SERVER': str(num_servers),
               'DMLC_NUM_WORKER': str(num_workers),
               'DMLC_NODE_HOST': '127.0.0.1', **(env or {})}
    procs, roles, logs, finished = [], [], [], False

    def start(role, args):
        roles.append(role)
        logs.append(tempfile.TemporaryFile())
        procs.append(subprocess.Popen(
            [sys.executable] + args, env=dict(cluster, DMLC_ROLE=role),
            stdout=logs[-1], stderr=subprocess.STDOUT))

    def output(i):
        logs[i].seek(0)
        return logs[i].read().decode(errors='replace')

    try:
        start('scheduler', ['-c', 'import mxnet'])
        for _ in range(num_servers):
            start('server', ['-c', 'import mxnet'])
        for _ in range(num_workers):
            start('worker', list(worker_args))
        workers = [i for i, role in enumerate(roles) if role == 'worker']
        deadline = time.time() + timeout
        while not all(procs[i].poll() == 0 for i in workers):
            failed = [i for i, p in enumerate(procs)
                      if p.poll() not in (None, 0)]
            if failed:
                i = failed[0]
                raise RuntimeError(f'{roles[i]} failed with exit code '
                                   f'{procs[i].returncode}:\n'
                                   f'{output(i)[-3000:]}')
            if time.time() > deadline:
                raise TimeoutError(f'workers still running after {timeout} s')
            time.sleep(0.1)
        finished = True
        return [output(i) for i in workers]
    finally:
        grace = time.time() + (10 if finished else 0)
        for p in procs:
            try:
                p.wait(timeout=max(0.1, grace - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()

def train_face_worker(data_dir, out_dir, kvstore='dist_sync', num_classes=20,
                      batch_size=16, num_steps=40, lr=0.05, width=0.0625,
                      seed=0):
    """Train a small face net on this worker's part of the data.

    Defined in :numref:`sec_facerecognition_parallel`"""
    store = kv.create(kvstore)
    rank, num_workers = store.rank, store.num_workers
    dataset = FaceDataset(data_dir)
    items = [item for item in dataset.items if item[1] < num_classes]
    dataset.items = items[rank::num_workers]
    onp.random.seed(seed + rank)  # the order of the images
    npx.random.seed(seed + rank)  # the random flips
    loader = gluon.data.DataLoader(dataset, batch_size, shuffle=True,
                                   last_batch='discard')
    devices = all_devices()
    net = face_resnet(18, width=width, embedding_size=64)
    head = MarginLogits(num_classes, 64, s=16.0, m3=0.1)
    npx.random.seed(seed)  # the same initial weights on every worker
    net.initialize(init.Xavier(), ctx=devices)
    head.initialize(ctx=devices)
    params = net.collect_params()
    params.update(head.collect_params())
    trainer = gluon.Trainer(params, 'sgd', {'learning_rate': lr,
                                            'momentum': 0.9, 'wd': 5e-4},
                            kvstore=store)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    losses, start = [], None
    while len(losses) < num_steps:
        for X, y in loader:
            Xs = gluon.utils.split_and_load(X, devices)
            ys = gluon.utils.split_and_load(y, devices)
            with autograd.record():
                ls = [loss_fn(head(net(X_), y_), y_) for X_, y_ in zip(Xs, ys)]
            autograd.backward(ls)
            trainer.step(batch_size * num_workers)
            losses.append(sum(float(l.mean()) for l in ls) / len(ls))
            if start is None:  # the first step also sets up the store
                start = time.time()
            if len(losses) == num_steps:
                break
    speed = batch_size * (num_steps - 1) / (time.time() - start)
    os.makedirs(out_dir, exist_ok=True)
    net.save_parameters(os.path.join(out_dir, f'net{rank}.params'))
    head.save_parameters(os.path.join(out_dir, f'head{rank}.params'))
    with open(os.path.join(out_dir, f'worker{rank}.json'), 'w') as f:
        json.dump({'rank': rank, 'num_workers': num_workers,
                   'losses': losses, 'img_per_sec': speed}, f)
    print(f'worker {rank}/{num_workers}: {len(dataset)} images, '
          f'loss {losses[0]:.2f} -> {losses[-1]:.2f}, {speed:.1f} img/s')