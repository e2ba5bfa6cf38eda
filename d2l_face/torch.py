"""Code saved from the Face Recognition chapter (PyTorch).

Everything below the WARNING line is written by ``make lib`` (``d2lbook build
lib``) from the cells marked ``#@save`` in ``chapter_face_recognition/*.md``
that belong to the PyTorch tab or to all tabs; only this header, which holds
the imports that code needs, is edited by hand. ``onp`` is NumPy, spelled as
in the MXNet tab, whose ``np`` is MXNet's own, so that the framework-free
cells read the same in both tabs.
"""
import collections
import concurrent.futures
import datetime
import io
import json
import math
import os
import random
import time
import weakref

import cv2
import numpy as onp
import torch
from d2l import torch as d2l
from IPython import display
from torch import distributed as dist
from torch import nn
from torch.distributed import nn as dist_nn
from torch.nn import functional as F
from torchvision import transforms

import d2l_face
from d2l_face import (binsets, checks, downloads, formats, onnxrun, packs,
                      publish, recordio, standin)

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

def standin_facerec_dir(name='faces-casia-ultrasmall'):
    """Generate (once) and return the stand-in for the ultrasmall set.

    Defined in :numref:`sec_facerecognition_dataset`"""
    checks.check_standin_name(name)  # there is no stand-in for the others
    return standin.generate(os.path.join(d2l_face.data_root(), 'standin'))

def get_facerec_dir(name='faces-casia-ultrasmall'):
    """Return the folder of a face dataset, downloading or generating it.

    Defined in :numref:`sec_facerecognition_dataset`"""
    source = os.environ.get('D2L_FACE_SOURCE', 'auto').lower()
    checks.check_face_source(source)
    if source == 'standin':
        return standin_facerec_dir(name)
    url, sha1_hash = d2l.DATA_HUB[name]
    try:
        return downloads.download_extract(url, sha1_hash,
                                          d2l_face.data_root(), subdir=name)
    except downloads.DownloadError as e:
        if source == 'real':
            raise
        print(f'NOTICE: the real {name} dataset is out of reach ({e}).\n'
              f'Using the generated stand-in data instead.')
        return standin_facerec_dir(name)

def read_facerec_meta(data_dir):
    """Read `property`: return the crop size (h, w) and the class count.

    Defined in :numref:`sec_facerecognition_dataset`"""
    file_name = os.path.join(data_dir, formats.PROPERTY_FILE)
    try:
        data = formats.read_regular_file(file_name, max_bytes=1 << 16)
    except FileNotFoundError:
        raise FileNotFoundError(f'{file_name}: no property file, is '
                                f'{data_dir} a face dataset folder?') from None
    text = data.decode('utf-8', errors='replace')
    first_line = text.replace('\r\n', '\n').replace('\r', '\n').split('\n')[0]
    return formats.parse_property(first_line, where=file_name)

def read_face_jpeg(path, image_size=None):
    """Return the bytes of a JPEG file after checking its header and end.

    Defined in :numref:`sec_facerecognition_dataset`"""
    data = formats.read_regular_file(path)
    formats.check_jpeg_header(data, path, image_size)
    checks.check_complete_jpeg(data, path)  # ends with the JPEG end marker
    return data

def read_face_image(path, image_size=None):
    """Read a JPEG face crop as an RGB uint8 array of shape (h, w, 3).

    Defined in :numref:`sec_facerecognition_dataset`"""
    data = read_face_jpeg(path, image_size)
    image = cv2.imdecode(onp.frombuffer(data, onp.uint8), cv2.IMREAD_COLOR)
    checks.check_decoded(image, path, image_size)
    return image[:, :, ::-1]

def list_face_jpegs(folder):
    """Return the paths of the .jpg files in `folder`, sorted by name.

    Defined in :numref:`sec_facerecognition_dataset`"""
    # os.listdir, not glob: a folder name may hold characters such as '['
    # that a glob pattern would read as wildcards.
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.endswith(formats.IMAGE_SUFFIX)]

def read_identity_images(data_dir, person_id, max_num=None):
    """Read the face crops of one identity, in file-name order.

    Defined in :numref:`sec_facerecognition_dataset`"""
    folder = os.path.join(data_dir, formats.identity_folder(person_id))
    paths = list_face_jpegs(folder)[:max_num] if os.path.isdir(folder) else []
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

def list_facerec_images(data_dir, num_classes=None):
    """Return [(path, label)] for every crop of every identity folder.

    Defined in :numref:`sec_facerecognition_dataset`"""
    if num_classes is None:
        num_classes = read_facerec_meta(data_dir)[1]
    items = []
    for label in range(num_classes):
        folder = os.path.join(data_dir, formats.identity_folder(label))
        paths = list_face_jpegs(folder) if os.path.isdir(folder) else []
        checks.check_identity_folder(folder, paths, num_classes)
        items += [(path, label) for path in paths]
    return items

class FaceDataset(torch.utils.data.Dataset):
    """Face crops with identity labels, randomly flipped left-right.

    Defined in :numref:`sec_facerecognition_dataset`"""
    def __init__(self, data_dir):
        self.image_size, self.num_classes = read_facerec_meta(data_dir)
        self.items = list_facerec_images(data_dir, self.num_classes)
        self.transform = transforms.Compose([
            transforms.ToTensor(), transforms.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        path, label = self.items[idx]
        # One contiguous array: ToTensor refuses the reversed-channel view.
        image = onp.ascontiguousarray(read_face_image(path, self.image_size))
        return self.transform(image), label

def load_bin(path, image_size=(112, 112), max_images=100_000):
    """Read a .bin set: uint8 images (2, 2n, 3, h, w) and issame (n,).

    Defined in :numref:`sec_facerecognition_dataset`"""
    # images[1] holds the images of images[0] flipped left-right.
    bins, issame = binsets.load_bin_pairs(path)
    checks.check_bin_count(path, len(bins), max_images)
    data = onp.empty((2, len(bins), 3) + tuple(image_size), dtype=onp.uint8)
    for i, jpeg in enumerate(bins):
        where = f'{path}: image {i}'
        formats.check_jpeg_header(jpeg, where,
                                  max_pixels=formats.MAX_CROP_PIXELS)
        image = cv2.imdecode(onp.frombuffer(jpeg, onp.uint8), cv2.IMREAD_COLOR)
        checks.check_decoded(image, where)
        if image.shape[:2] != tuple(image_size):
            image = cv2.resize(image, tuple(image_size)[::-1])
        image = image[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
        data[0, i] = image
        data[1, i] = image[:, :, ::-1]
    return data, onp.array(issame, dtype=bool)

def show_verification_pairs(images, issame, num_pairs=6, scale=1.5):
    """Plot the first pairs of a verification set with their labels.

    Defined in :numref:`sec_facerecognition_dataset`"""
    first = [images[0, 2 * i].transpose(1, 2, 0) for i in range(num_pairs)]
    second = [images[0, 2 * i + 1].transpose(1, 2, 0)
              for i in range(num_pairs)]
    titles = ['same' if issame[i] else 'different' for i in range(num_pairs)]
    return d2l.show_images(first + second, 2, num_pairs,
                           titles + [''] * num_pairs, scale=scale)

ARCFACE_TEMPLATE = formats.ARCFACE_TEMPLATE  # (5, 2): x, y in a 112x112 crop

LANDMARK_NAMES = ('left eye', 'right eye', 'nose tip', 'left mouth',
                  'right mouth')

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
    landmark = checks.check_alignment(image, landmark, image_size)
    template = ARCFACE_TEMPLATE * (image_size / formats.TEMPLATE_SIZE)
    M = estimate_similarity(landmark, template)
    return cv2.warpAffine(image, M, (int(image_size),) * 2, borderValue=0.0)

ASTRONAUT_LANDMARKS = onp.array([[204.4, 101.9], [247.1, 103.1],
                                 [225.6, 126.9], [202.5, 140.0],
                                 [245.0, 139.0]])  # placed by hand

def show_alignment(image, landmark, aligned, title):
    """Draw the photo with its landmarks and the crop with the template.

    Defined in :numref:`sec_facerecognition_dataset`"""
    _, (ax1, ax2) = d2l.plt.subplots(1, 2, figsize=(7, 3.5))
    ax1.imshow(image)
    ax1.scatter(landmark[:, 0], landmark[:, 1], c='lime', s=12)
    ax1.set_title(title)
    ax2.imshow(aligned)
    ax2.scatter(ARCFACE_TEMPLATE[:, 0], ARCFACE_TEMPLATE[:, 1], c='red', s=12)
    ax2.set_title('aligned 112x112')
    for ax in (ax1, ax2):
        ax.axis('off')

# The opening of torch.save's older format (the pickled magic number
# 0x1950a86a20f9469cfc6c), and the records of its zip archives
TORCH_LEGACY_MAGIC = b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.'
TORCH_SAVE_RECORDS = (r'data\.pkl|byteorder|version|\.format_version|'
                      r'\.storage_alignment|\.data/(serialization_id|version)|'
                      r'data/[0-9]+')

def check_tensor_file(data, path):
    """Refuse all but a `torch.save` file, so that torch.load runs no code.

    Defined in :numref:`sec_facerecognition_detection`"""
    import io
    import re
    import torch
    if data.startswith(TORCH_LEGACY_MAGIC):  # read by the restricted unpickler
        return
    if not data.startswith(b'PK\x03\x04'):  # what torch.load takes for a zip
        raise ValueError(f'{path}: not a file written by torch.save')
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = reader.get_all_records()
    except Exception as e:
        raise ValueError(f'{path}: not a readable zip archive ({e})') from e
    others = [r for r in records if not re.fullmatch(TORCH_SAVE_RECORDS, r)]
    if others:  # e.g. constants.pkl and code/: a TorchScript archive
        raise ValueError(f'{path}: a zip archive with records {others[:3]} '
                         f'that torch.save never writes (TorchScript?); '
                         f'refused, since torch.load would run its code')

def load_tensors(path, max_bytes=1 << 30):
    """Tensors, in dicts and lists, from a torch.save file: runs no code.

    Defined in :numref:`sec_facerecognition_detection`"""
    import io
    import torch  # imported on use: the MXNet library need not load PyTorch
    data = formats.read_regular_file(path, max_bytes)  # refuses FIFOs too
    check_tensor_file(data, path)  # before torch.load, which may run code
    try:
        # The restricted unpickler builds tensors, dicts and numbers only;
        # any other global that the pickle names is refused, never called.
        return torch.load(io.BytesIO(data), map_location='cpu',
                          weights_only=True)
    except Exception as e:  # nothing from the file has run: it is malformed
        # PyTorch's message opens with advice to load unsafely; keep the cause.
        cause = [line for line in str(e).splitlines()
                 if line.strip() and 'weights_only' not in line]
        raise ValueError(f'{path}: not a PyTorch file of plain tensors '
                         f'({cause[0] if cause else type(e).__name__})') from e

def read_state_dict(path, max_bytes=1 << 30):
    """Tensors by name from a PyTorch file, without running code from it.

    Defined in :numref:`sec_facerecognition_detection`"""
    import torch
    state = load_tensors(path, max_bytes)
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor)
            for k, v in state.items()):
        raise ValueError(f'{path}: holds a {type(state).__name__}, not a '
                         f'state dict of named tensors')
    return state

def save_tensors(tensors, path):
    """`torch.save` to `path`, which ends up whole or as it was before.

    Defined in :numref:`sec_facerecognition_detection`"""
    import torch
    with publish.writing(path) as f:  # a link at path is replaced, not followed
        torch.save(tensors, f)
    return path

def load_mtcnn(folder=None):
    """MTCNN's P-Net, R-Net and O-Net, weights read by `read_state_dict`.

    Defined in :numref:`sec_facerecognition_detection`"""
    import facenet_pytorch  # PyTorch modules, in the MXNet tab too
    if folder is None:  # the weights ship inside the package
        folder = os.path.join(os.path.dirname(facenet_pytorch.__file__),
                              'data')
    nets = []
    for name, net_class in [('pnet', facenet_pytorch.PNet),
                            ('rnet', facenet_pytorch.RNet),
                            ('onet', facenet_pytorch.ONet)]:
        path = os.path.join(folder, name + '.pt')
        net = net_class(pretrained=False)  # True would unpickle freely
        try:
            net.load_state_dict(read_state_dict(path))
        except RuntimeError as e:  # names or shapes that do not fit the net
            raise ValueError(f'{path}: not the weights of {name}: {e}') from e
        nets.append(net.eval())
    return nets

def detect_faces(image, nets=None, min_face_size=20):
    """Faces in an RGB photo: [(box, score, landmarks)], best score first.

    Defined in :numref:`sec_facerecognition_detection`"""
    import torch
    from facenet_pytorch.models.utils.detect_face import detect_face
    checks.check_photo(image)
    checks.check_detector(nets, min_face_size)  # nets: three, or None
    if min(image.shape[:2]) < min_face_size:
        return []  # and MTCNN's image pyramid would be empty
    nets = load_mtcnn() if nets is None else nets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            boxes, points = detect_face(image, min_face_size, *nets,
                                        [0.6, 0.7, 0.7], 0.709, 'cpu')
    finally:
        torch.set_num_threads(threads)
    faces = [(onp.array(box[:4], dtype=onp.float64), float(box[4]),
              onp.array(landmarks, dtype=onp.float64))
             for box, landmarks in zip(boxes[0], points[0])]
    return sorted(faces, key=lambda face: -face[1])

def checked_face_records(items, image_size):
    """Yield (label, JPEG bytes) of `items`, each checked, read in threads.

    Defined in :numref:`sec_facerecognition_packing`"""
    def read(item):
        jpeg = read_face_jpeg(item[0], image_size)
        image = cv2.imdecode(onp.frombuffer(jpeg, onp.uint8), 1)
        checks.check_decoded(image, item[0], image_size)
        return item[1], jpeg
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        for first in range(0, len(items), 1024):
            yield from pool.map(read, items[first:first + 1024])

def pack_face_records(data_dir, name='train', meta=None):
    """Pack a folder dataset's crops into name.rec/.idx, unless fresh.

    Defined in :numref:`sec_facerecognition_packing`"""
    prefix = os.path.join(data_dir, name)
    packs.check_ours(prefix)  # a pack we did not make is never replaced
    packs.remove_stale(prefix)  # what killed packers left behind
    image_size, num_classes = meta or read_facerec_meta(data_dir)
    items = list_facerec_images(data_dir, num_classes)
    sources = packs.fingerprint(data_dir, items)
    if packs.is_fresh(prefix, len(items), sources):
        return prefix
    with packs.staging(prefix) as tmp:
        recordio.write_pack(tmp, checked_face_records(items, image_size))
        if packs.fingerprint(data_dir, list_facerec_images(
                data_dir, num_classes)) != sources:
            raise RuntimeError(f'{data_dir}: images changed while they were '
                               f'packed; run again to pack the new ones')
        packs.publish(tmp, prefix, len(items), sources)
    return prefix

class FaceRecordIter:
    """Shuffled, randomly flipped float32 batches from a RecordIO pack."""
    def __init__(self, prefix, batch_size, image_size=None, num_classes=None,
                 shuffle=True, flip=True, num_threads=None):
        """Defined in :numref:`sec_facerecognition_packing`"""
        checks.check_batch_size(batch_size)
        self.prefix, self.batch_size = prefix, batch_size
        self.shuffle, self.flip = shuffle, flip
        self.pack = recordio.PackReader(prefix, image_size)
        self.labels = self.pack.labels  # one identity label per image
        if image_size is None and len(self.pack):
            image_size = formats.jpeg_size(self.pack.jpeg(0))
        self.image_size = tuple(image_size or (0, 0))
        self.num_classes = recordio.check_num_classes(self.pack, num_classes)
        self.num_threads = num_threads or os.cpu_count() or 1
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
        self._buffers = []  # [batch array, its user]

    def __len__(self):
        return len(self.pack) // self.batch_size

    def _fill(self, batch, first, records, flips):
        """Decode, flip and convert images into batch[first:] (a thread).
    
        Defined in :numref:`sec_facerecognition_packing`"""
        h, w = self.image_size
        rgb = onp.empty((3, h, w), onp.uint8)
        planes = [rgb[2], rgb[1], rgb[0]]  # cv2.split writes B, G, R
        for j, (i, flip) in enumerate(zip(records.tolist(), flips.tolist()),
                                      first):
            image = cv2.imdecode(self.pack.jpeg(i), cv2.IMREAD_COLOR)
            checks.check_decoded(image, f'{self.prefix}.rec: image {i}', (h, w))
            if flip:
                image = cv2.flip(image, 1)
            cv2.split(image, planes)  # BGR (h, w, 3) -> RGB (3, h, w)
            x = batch[j]
            x[...] = rgb  # uint8 -> float32
            x /= 255

    def _submit(self, records, flips):
        """Start filling a free batch array with `records` in the threads.
    
        Defined in :numref:`sec_facerecognition_packing`"""
        for slot, (batch, user) in enumerate(self._buffers):
            if user is None or isinstance(user, weakref.ref) and user() is None:
                break
        else:
            slot, batch = len(self._buffers), onp.empty(
                (self.batch_size, 3) + self.image_size, onp.float32)
            self._buffers.append([batch, None])
        self._buffers[slot][1] = 'filling'
        chunk = -(-len(records) // (2 * self.num_threads))
        jobs = [self._pool.submit(self._fill, batch, lo, records[lo:lo + chunk],
                                  flips[lo:lo + chunk])
                for lo in range(0, len(records), chunk)]
        return slot, records, jobs

    def _finish(self, slot, records, jobs):
        """Wait for a batch and hand it to the framework (without copying).
    
        Defined in :numref:`sec_facerecognition_packing`"""
        try:
            for job in jobs:
                job.result()
        finally:
            concurrent.futures.wait(jobs)
            self._buffers[slot][1] = None
        view = self._buffers[slot][0].view()
        X, y = self._wrap(view, self.pack.labels[records])
        self._buffers[slot][1] = weakref.ref(view)  # dead once X is unused
        return X, y

    def _wrap(self, X, y):
        """Hand a NumPy batch and its labels to PyTorch.
    
        Defined in :numref:`sec_facerecognition_packing`"""
        return torch.from_numpy(X), torch.from_numpy(y)

    def __iter__(self):
        """Defined in :numref:`sec_facerecognition_packing`"""
        n, bs = len(self.pack), self.batch_size
        order = onp.random.permutation(n) if self.shuffle else onp.arange(n)
        flips = (onp.random.uniform(size=n) < 0.5 if self.flip
                 else onp.zeros(n, bool))
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

def load_data_facerec(data_dir, verification_sets=(), batch_size=512):
    """Return a training data iterator and a dict of verification sets.

    Defined in :numref:`sec_facerecognition_packing`"""
    prefix = os.path.join(data_dir, 'train')
    foreign = packs.foreign_reason(prefix)  # None: ours, or no pack yet
    image_size = num_classes = None  # a pack alone tells them itself
    if not foreign or os.path.exists(os.path.join(data_dir,
                                                  formats.PROPERTY_FILE)):
        image_size, num_classes = read_facerec_meta(data_dir)
    if foreign and os.path.isdir(os.path.join(
            data_dir, formats.identity_folder(0))):
        print(f'NOTICE: reading {prefix}.rec as it is ({foreign}); the '
              f'identity folders next to it are not used.')
    if not foreign:
        prefix = pack_face_records(data_dir, meta=(image_size, num_classes))
    train_iter = FaceRecordIter(prefix, batch_size, image_size, num_classes)
    sets = {}
    for name in verification_sets:
        path = os.path.join(data_dir, name + '.bin')
        if not os.path.lexists(path):  # a FIFO, say, is refused by load_bin
            raise FileNotFoundError(f'{path}: no verification set {name!r}')
        sets[name] = load_bin(path, train_iter.image_size)
    return train_iter, sets

def write_insightface_pack(data_dir, out_dir, num_classes=None,
                           label_vector=False):
    """Write identities of a folder dataset as InsightFace packs them.

    Defined in :numref:`sec_facerecognition_packing`"""
    image_size, all_classes = read_facerec_meta(data_dir)
    num_classes = num_classes or all_classes
    items = list_facerec_images(data_dir, all_classes)
    items = [(path, label) for path, label in items if label < num_classes]
    os.makedirs(out_dir, exist_ok=True)
    names = ('train.rec', 'train.idx', formats.PROPERTY_FILE)
    if any(os.path.lexists(os.path.join(out_dir, n)) for n in names):
        raise FileExistsError(f'{out_dir}: already holds a pack')
    with packs.staging(os.path.join(out_dir, 'train')) as tmp:
        recordio.write_pack(tmp, checked_face_records(items, image_size),
                            layout='insightface', label_vector=label_vector)
        with open(tmp + '.property', 'w') as f:
            f.write(formats.format_property(num_classes, *image_size) + '\n')
        # All three files appear, or none: a failed rename undoes the rest.
        publish.move_all((tmp + ext, os.path.join(out_dir, n)) for ext, n in
                         zip(('.rec', '.idx', '.property'), names))
    return out_dir

class FaceResidual(nn.Module):
    """Residual unit of Face-ResNet: BN-conv-BN-PReLU-conv-BN + shortcut.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, in_channels, channels, strides=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels, init=0.25),
            # Striding the second convolution lets the first one still see
            # the input at full resolution.
            nn.Conv2d(channels, channels, 3, stride=strides, padding=1,
                      bias=False),
            nn.BatchNorm2d(channels))
        self.shortcut = None
        if strides != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=strides,
                          bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + shortcut

FACE_RESNET_UNITS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3],
                     100: [3, 13, 30, 3]}

class FaceResNet(nn.Module):
    """ResNet for 112x112 faces, mapping images to embedding vectors.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, units, width=1.0, embedding_size=512, dropout=0.0):
        super().__init__()
        channels = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0], init=0.25))
        stages, in_channels = [], channels[0]
        for num_units, out_channels in zip(units, channels):
            stage = []
            for i in range(num_units):
                stage.append(FaceResidual(in_channels, out_channels,
                                          strides=2 if i == 0 else 1))
                in_channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        embedding_norm = nn.BatchNorm1d(embedding_size)
        # A fixed scale keeps every embedding dimension on the same
        # footing; the batch norm only centers and standardizes them.
        embedding_norm.weight.requires_grad_(False)
        self.head = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Dropout(dropout), nn.Flatten(),
            nn.Linear(in_channels * 7 * 7, embedding_size), embedding_norm)
        for m in self.modules():  # as MXNet's init.Xavier() does
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = (x - 0.5) / 0.5  # [0, 1] pixels, as ToTensor makes them
        x = self.head[:3](self.stages(self.stem(x)))
        # Under autocast (mixed precision), the fully connected layer and
        # the last batch normalization compute in the parameters' float32.
        with torch.autocast(x.device.type, enabled=False):
            return self.head[3:](x.to(self.head[3].weight.dtype))

def face_resnet(depth=18, width=1.0, embedding_size=512, dropout=0.0):
    """Return a Face-ResNet of the given depth (18, 34, 50 or 100).

    Defined in :numref:`sec_facerecognition_arcface`"""
    checks.check_face_resnet(depth, FACE_RESNET_UNITS, width)
    return FaceResNet(FACE_RESNET_UNITS[depth], width, embedding_size,
                      dropout)

def count_parameters(net, trainable_only=True):
    """Count the parameter values of a module (skip BN statistics if asked).

    Defined in :numref:`sec_facerecognition_arcface`"""
    if trainable_only:
        return sum(p.numel() for p in net.parameters() if p.requires_grad)
    # The state holds the BN statistics too, and a step counter per BN
    # layer, an integer that is no value of the model.
    return sum(t.numel() for t in net.state_dict().values()
               if t.is_floating_point())

def margin_target_logit(theta, s=1.0, m1=1.0, m2=0.0, m3=0.0):
    """Target-class logit s * (cos(m1 * theta + m2) - m3), for angles theta.

    Defined in :numref:`sec_facerecognition_arcface`"""
    theta_max = (math.pi - m2) / m1
    # Clamping keeps the unused branch of torch.where finite, so it adds
    # nothing (not NaN) to the gradient.
    margin = torch.cos(m1 * torch.clamp(theta, max=theta_max) + m2)
    beyond = torch.cos(theta) - (1 + math.cos(theta_max))
    return s * (torch.where(theta <= theta_max, margin, beyond) - m3)

MARGIN_SETTINGS = {  # (m1, m2, m3)
    'softmax': (1.0, 0.0, 0.0), 'sphereface': (1.35, 0.0, 0.0),
    'cosface': (1.0, 0.0, 0.35), 'arcface': (1.0, 0.5, 0.0),
    'combined': (1.0, 0.3, 0.2)}

class MarginLogits(nn.Module):
    """Scaled cosine logits with an angular margin on the target class.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, num_classes, embedding_size, s=64.0, m1=1.0, m2=0.0,
                 m3=0.0, eps=1e-7):
        super().__init__()
        checks.check_margin(s, m1, m2, m3)
        self.num_classes, self.eps = num_classes, eps
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.weight = nn.Parameter(
            torch.normal(0, 0.01, size=(num_classes, embedding_size)))

    def forward(self, embeddings, labels):
        def unit_rows(x):
            return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + 1e-12)
        cos = unit_rows(embeddings) @ unit_rows(self.weight).T
        cos = torch.clamp(cos, -1 + self.eps, 1 - self.eps)
        cos_target = cos.gather(1, labels[:, None])[:, 0]
        target = margin_target_logit(torch.arccos(cos_target), self.s,
                                     self.m1, self.m2, self.m3)
        # Replace the target column of s * cos by the margin logit.
        one_hot = F.one_hot(labels, self.num_classes).to(cos.dtype)
        return self.s * cos + one_hot * (target - self.s * cos_target)[:, None]

def all_devices():
    """Every GPU there is, or the CPU when there is none.

    Defined in :numref:`sec_facerecognition_verification`"""
    return [torch.device(f'cuda:{i}')
            for i in range(torch.cuda.device_count())] or [torch.device('cpu')]

def embed_pairs(net, images, batch_size=256, devices=None):
    """Unit-length sums of the embeddings of images[0] and images[1].

    Defined in :numref:`sec_facerecognition_verification`"""
    devices = devices or all_devices()
    checks.check_pair_images(images)
    # on several GPUs, each gets a part of every batch
    model = nn.DataParallel(net, devices) if len(devices) > 1 else net
    was_training, chunks = net.training, []
    net.eval()  # batch normalization with its running statistics
    try:
        with torch.no_grad():
            for i in range(0, images.shape[1], batch_size):
                total = 0
                for copy in images[:, i:i + batch_size]:  # then flipped
                    X = torch.from_numpy(onp.ascontiguousarray(copy))
                    X = X.to(devices[0], torch.float32) / 255
                    total = total + model(X).cpu().numpy()
                chunks.append(total)
    finally:
        net.train(was_training)
    embeddings = onp.concatenate(chunks).astype(onp.float64)
    return embeddings / onp.linalg.norm(embeddings, axis=1, keepdims=True)

def pair_scores(embeddings):
    """Cosine similarity of the two unit embeddings of each pair.

    Defined in :numref:`sec_facerecognition_verification`"""
    embeddings = onp.asarray(embeddings)
    checks.check_pair_embeddings(embeddings)
    return (embeddings[0::2] * embeddings[1::2]).sum(axis=1)

def pixel_embeddings(images):
    """Centered raw pixels of each image plus its mirror, unit length.

    Defined in :numref:`sec_facerecognition_verification`"""
    pixels = images.reshape(2, images.shape[1], -1).astype(onp.float64)
    pixels = (pixels - pixels.mean(axis=2, keepdims=True)).sum(axis=0)
    return pixels / onp.linalg.norm(pixels, axis=1, keepdims=True)

def check_pairs(scores, issame, num_folds=1):
    """Scores (float64) and labels (bool) of pairs, checked to fit.

    Defined in :numref:`sec_facerecognition_verification`"""
    scores, issame = onp.asarray(scores), onp.asarray(issame)
    checks.check_pairs(scores, issame, num_folds)
    return scores.astype(onp.float64), issame.astype(bool)

def count_accepts_sorted(descending, same, thresholds):
    """True and false accepts (score > threshold) of sorted scores.

    Defined in :numref:`sec_facerecognition_verification`"""
    same_in_top = onp.concatenate([[0], onp.cumsum(same)])
    # k[i]: how many scores lie strictly above thresholds[i]
    k = onp.searchsorted(-descending, -onp.asarray(thresholds), side='left')
    return same_in_top[k], k - same_in_top[k]

def count_accepts(scores, issame, thresholds):
    """True and false accepts (score > threshold) for each threshold.

    Defined in :numref:`sec_facerecognition_verification`"""
    scores, issame = check_pairs(scores, issame)
    order = onp.argsort(-scores, kind='stable')
    return count_accepts_sorted(scores[order], issame[order], thresholds)

def candidate_thresholds(scores, is_sorted=False):
    """One threshold per distinct decision, from accept none to accept all.

    Defined in :numref:`sec_facerecognition_verification`"""
    scores = onp.asarray(scores, onp.float64)
    checks.check_finite_scores(scores)
    descending = scores if is_sorted else onp.sort(scores)[::-1]
    values = descending[onp.concatenate([[True],
                                         descending[1:] != descending[:-1]])]
    return onp.concatenate([values[:1], (values[:-1] + values[1:]) / 2,
                            [onp.nextafter(values[-1], -onp.inf)]])

def best_threshold_sorted(descending, same, thresholds=None):
    """The most accurate threshold (the first on ties) for sorted scores.

    Defined in :numref:`sec_facerecognition_verification`"""
    if thresholds is None:
        thresholds = candidate_thresholds(descending, is_sorted=True)
    thresholds = onp.asarray(thresholds, onp.float64)
    checks.check_thresholds(thresholds)
    true_accepts, false_accepts = count_accepts_sorted(descending, same,
                                                       thresholds)
    correct = true_accepts + (len(same) - same.sum()) - false_accepts
    best = onp.argmax(correct)
    return thresholds[best], correct[best] / len(descending)

def best_threshold(scores, issame, thresholds=None):
    """The most accurate threshold (the first on ties) and its accuracy.

    Defined in :numref:`sec_facerecognition_verification`"""
    scores, issame = check_pairs(scores, issame)
    order = onp.argsort(-scores, kind='stable')
    return best_threshold_sorted(scores[order], issame[order], thresholds)

def kfold_splits(num_pairs, num_folds=10):
    """Indices of the test pairs of each fold: contiguous, sizes within 1.

    Defined in :numref:`sec_facerecognition_verification`"""
    checks.check_folds(num_pairs, num_folds)
    return onp.array_split(onp.arange(num_pairs), num_folds)

def kfold_train_test(num_pairs, num_folds=10):
    """Yield (train mask, test indices) for each fold.

    Defined in :numref:`sec_facerecognition_verification`"""
    for test in kfold_splits(num_pairs, num_folds):
        train = onp.ones(num_pairs, bool)
        train[test] = False
        yield train, test

def verification_accuracy(scores, issame, num_folds=10, thresholds=None):
    """k-fold verification accuracy: mean, std and each fold's threshold.

    Defined in :numref:`sec_facerecognition_verification`"""
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

    Defined in :numref:`sec_facerecognition_verification`"""
    return std / onp.sqrt(num_folds - 1)

def far_threshold(scores, issame, far=1e-3):
    """Lowest threshold that accepts at most a fraction `far` of impostors.

    Defined in :numref:`sec_facerecognition_verification`"""
    scores, issame = check_pairs(scores, issame)
    checks.check_far(far)
    different = onp.sort(scores[~issame])[::-1]
    allowed = int(onp.floor(far * len(different) + 1e-9))
    if allowed >= len(different):
        return onp.nextafter(scores.min(), -onp.inf)  # accept everything
    return different[allowed]

def val_at_far(scores, issame, far=1e-3, num_folds=10):
    """k-fold VAL at a target FAR: mean and std of VAL, mean of FAR.

    Defined in :numref:`sec_facerecognition_verification`"""
    scores, issame = check_pairs(scores, issame, num_folds)
    checks.check_both_kinds(issame, 'VAL and FAR')
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

    Defined in :numref:`sec_facerecognition_verification`"""
    scores, issame = check_pairs(scores, issame)
    checks.check_both_kinds(issame, 'a ROC curve')
    true_accepts, false_accepts = count_accepts(
        scores, issame, candidate_thresholds(scores))
    return (false_accepts / (~issame).sum(), true_accepts / issame.sum())

def plot_roc(curves, figsize=(4.5, 3.5)):
    """Plot ROC curves, given as a dict name -> (fpr, tpr), log-scaled FPR.

    Defined in :numref:`sec_facerecognition_verification`"""
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

    Defined in :numref:`sec_facerecognition_verification`"""
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

    Defined in :numref:`sec_facerecognition_verification`"""
    images, issame = verification_set
    scores = pair_scores(embed_pairs(net, images, batch_size, devices))
    acc, acc_std, thresholds = verification_accuracy(scores, issame,
                                                     num_folds)
    val, val_std, far_measured = val_at_far(scores, issame, far, num_folds)
    return {'acc': acc, 'acc_std': acc_std,
            'acc_se': standard_error(acc_std, num_folds),
            'threshold': thresholds.mean(), 'val': val, 'val_std': val_std,
            'far': far_measured}

def find_bin_sets(folders):
    """The .bin verification sets in a folder or list of folders, by name.

    Defined in :numref:`sec_facerecognition_verification`"""
    known = ['lfw', 'cfp_fp', 'agedb_30', 'calfw', 'cplfw']
    paths = {}
    for folder in [folders] if isinstance(folders, str) else folders:
        # os.listdir, not glob: a folder name may hold characters such as
        # '[' that a glob pattern would read as wildcards.
        for file_name in sorted(os.listdir(folder)):
            name, ext = os.path.splitext(file_name)
            path = os.path.join(folder, file_name)
            if ext != '.bin' or os.path.isdir(path):
                continue
            if name in paths:
                raise ValueError(f'two verification sets named {name!r}: '
                                 f'{paths[name]} and {path}')
            paths[name] = path
    order = sorted(paths, key=lambda name: (
        known.index(name) if name in known else len(known), name))
    return {name: paths[name] for name in order}

def evaluate_bin_sets(embed, folders, far=1e-3, num_folds=10):
    """Verification accuracy and VAL at FAR on every .bin set in folders.

    Defined in :numref:`sec_facerecognition_verification`"""
    sets = find_bin_sets(folders)
    if not sets:
        raise FileNotFoundError(f'no .bin verification set in {folders}')
    print(f'{"set":<14}{"pairs":>6}  {"accuracy ± std":<15}  VAL ± std at '
          f'FAR {far:g} (FAR reached)')
    results = {}
    for name, path in sets.items():
        images, issame = load_bin(path)
        embeddings = onp.asarray(embed(images), onp.float64)
        checks.check_unit_embeddings(embeddings, images.shape[1], path)
        scores = pair_scores(embeddings)
        acc, acc_std, _ = verification_accuracy(scores, issame, num_folds)
        val, val_std, far_reached = val_at_far(scores, issame, far,
                                               num_folds)
        results[name] = dict(pairs=len(issame), acc=acc, acc_std=acc_std,
                             val=val, val_std=val_std, far=far_reached)
        print(f'{name:<14}{len(issame):>6}  {acc:.4f} ± {acc_std:.4f}  '
              f'{val:.4f} ± {val_std:.4f} ({far_reached:.4f})')
    return results

def more_verification_sets():
    """A folder holding a second stand-in .bin set, written on first use.

    Defined in :numref:`sec_facerecognition_verification`"""
    folder = os.path.join(d2l_face.data_root(), 'more-verification-sets')
    path = os.path.join(folder, 'standin_seed1.bin')
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        binsets.save_bin_pairs(path, *standin.make_verification_pairs(
            seed=1, num_pairs=200))
    return folder

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

def train_face_step(net, margin, loss, optimizer, X, y, devices,
                    batch_size=None, scaler=None):
    """One SGD step on a batch, on all devices: (loss sum, # correct).

    Defined in :numref:`sec_facerecognition_training`"""
    checks.check_batch_per_device(X.shape[0], len(devices))
    X, y = X.to(devices[0]), y.to(devices[0])
    # With a GradScaler the network runs in float16 where that is safe; the
    # margin layer and the loss always run in float32.
    with torch.autocast(devices[0].type, torch.float16,
                        enabled=scaler is not None):
        embeddings = net(X)
    logits = margin(embeddings.float(), y)
    losses = loss(logits, y)
    optimizer.zero_grad(set_to_none=True)
    mean = losses.sum() / (batch_size or X.shape[0])
    if scaler is None:
        mean.backward()
        optimizer.step()
    else:  # scaled, so that small float16 gradients do not round to zero
        scaler.scale(mean).backward()
        scaler.step(optimizer)  # unscales; skips the step on inf or NaN
        scaler.update()
    correct = (logits.argmax(dim=1) == y).sum()
    return float(losses.sum()), float(correct)

def warmup_cosine(update, num_steps, warmup_steps=0):
    """Learning-rate factor of update 1, 2, ...: linear warm-up, cosine.

    Defined in :numref:`sec_facerecognition_training`"""
    if update < warmup_steps:
        return update / warmup_steps
    done = min(update, num_steps) - warmup_steps
    return (1 + math.cos(math.pi * done /
                         max(num_steps - warmup_steps, 1))) / 2

def facerec_trainer(net, margin, num_steps, lr, wd=5e-4, momentum=0.9,
                    warmup_steps=0):
    """SGD with momentum and weight decay, its learning rate on a cosine.

    Defined in :numref:`sec_facerecognition_training`"""
    checks.check_sgd_settings(lr, wd, momentum)
    params = [p for block in (net, margin) for p in block.parameters()
              if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr, momentum=momentum,
                                weight_decay=wd)
    # LambdaLR's count starts at 0, MXNet's at 1
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: warmup_cosine(i + 1, num_steps, warmup_steps))
    optimizer.register_step_post_hook(lambda *args: schedule.step())
    return optimizer

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
                             f'{checks.describe_batches(train_iter)}')

class TrainingDiverged(FloatingPointError):
    """The training loss became infinite or NaN.

    Defined in :numref:`sec_facerecognition_training`"""

def record_step(metric, step, loss_sum, correct, batch_size):
    """Add a step's loss and accuracy to `metric`; stop if it diverged.

    Defined in :numref:`sec_facerecognition_training`"""
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(
            f'training diverged at step {step}: the mean loss of its batch '
            f'is {loss_sum / batch_size}; try a smaller learning rate, a '
            f'longer warm-up or a smaller scale s')
    metric.add(loss_sum, correct, batch_size)

def training_status(step, num_steps, history, images_per_sec):
    """One line: the step, the latest value of each curve, the speed.

    Defined in :numref:`sec_facerecognition_training`"""
    latest = ', '.join(f'{name} {points[-1][1]:.3f}'
                       for name, points in history.items())
    return (f'step {step}/{num_steps}: {latest}, '
            f'{images_per_sec:.1f} images/sec')

def facerec_model(net, margin, devices, fp16=False):
    """Net and margin on devices[0]; the net to call, and a GradScaler.

    Defined in :numref:`sec_facerecognition_training`"""
    if fp16 and devices[0].type != 'cuda':
        raise ValueError(f'fp16=True needs CUDA GPUs, not {devices}')
    net.to(devices[0]), margin.to(devices[0])
    # on several GPUs, each runs a copy of the network on part of a batch
    model = nn.DataParallel(net, devices) if len(devices) > 1 else net
    scaler = (torch.amp.GradScaler('cuda', growth_interval=100) if fp16
              else None)
    return model, scaler

def train_facerec(net, margin, train_iter, verification_sets, num_steps, lr,
                  wd=5e-4, momentum=0.9, warmup_steps=0, eval_every=100,
                  log_every=10, devices=None, plot=True, fp16=False):
    """Train a face embedding network with margin logits, on all devices.

    Defined in :numref:`sec_facerecognition_training`"""
    checks.check_train_input(train_iter, num_steps, eval_every, log_every)
    devices, steps_per_epoch = devices or all_devices(), len(train_iter)
    model, scaler = facerec_model(net, margin, devices, fp16)
    optimizer = facerec_trainer(net, margin, num_steps, lr, wd, momentum,
                                warmup_steps)
    loss = nn.CrossEntropyLoss(reduction='none')
    board = TrainingBoard([0, num_steps / steps_per_epoch]) if plot else None
    history, metric = collections.defaultdict(list), d2l.Accumulator(3)
    timer, seen = d2l.Timer(), 0  # seen: images trained on, for the speed
    for step, (X, y) in enumerate(facerec_batches(train_iter, num_steps), 1):
        timer.start()
        loss_sum, correct = train_face_step(model, margin, loss, optimizer, X,
                                            y, devices, scaler=scaler)
        timer.stop()
        record_step(metric, step, loss_sum, correct, X.shape[0])
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
    num_steps=240, eval_every=60, lr=0.1, warmup_steps=30, wd=5e-4,
    momentum=0.9, s=16.0, margin='arcface')

GPU_CONFIG = dict(  # a full-width Face-ResNet-50, on all GPUs
    CPU_CONFIG, depth=50, width=1.0, embedding_size=512,
    batch_per_device=128, num_steps=2000, eval_every=200)

def set_seeds(seed=0):
    """Seed Python's, NumPy's and PyTorch's random number generators.

    Defined in :numref:`sec_facerecognition_training`"""
    random.seed(seed)
    onp.random.seed(seed)
    torch.manual_seed(seed)  # the CPU's and every GPU's

def facerec_net_and_margin(config, num_classes, devices):
    """A fresh Face-ResNet and margin layer as config says, on devices.

    Defined in :numref:`sec_facerecognition_training`"""
    net = face_resnet(config['depth'], config['width'],
                      config['embedding_size']).to(devices[0])
    margin = MarginLogits(num_classes, config['embedding_size'], config['s'],
                          *MARGIN_SETTINGS[config['margin']])
    return net, margin.to(devices[0])

def facerec_train_args(config):
    """The keyword arguments of train_facerec that a configuration sets.

    Defined in :numref:`sec_facerecognition_training`"""
    return {key: config[key] for key in ('lr', 'wd', 'momentum',
                                         'warmup_steps', 'eval_every')}

def face_net_path(config):
    """Where the chapter keeps the trained network of a configuration.

    Defined in :numref:`sec_facerecognition_training`"""
    name = 'face_resnet{depth}_w{width}_e{embedding_size}'.format(**config)
    return os.path.join(d2l_face.data_root(), 'models', name + '.pt')

def save_face_net(net, path):
    """Write the state_dict of net to path, whole or not at all.

    Defined in :numref:`sec_facerecognition_training`"""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_tensors(net.state_dict(), path)

def load_face_net(config, path, devices):
    """A Face-ResNet of a configuration with the parameters saved at path.

    Defined in :numref:`sec_facerecognition_training`"""
    net = face_resnet(config['depth'], config['width'],
                      config['embedding_size'])
    net.load_state_dict(read_state_dict(path))
    return net.to(devices[0])

def embed_face(net, image, devices=None):
    """Unit embedding of one aligned RGB uint8 face of shape (h, w, 3).

    Defined in :numref:`sec_facerecognition_deployment`"""
    image = onp.asarray(image)
    checks.check_face_image(image)
    chw = image.transpose(2, 0, 1)
    both = onp.stack([chw, chw[:, :, ::-1]])[:, None]  # (2, 1, 3, h, w)
    return embed_pairs(net, both, 1, devices)[0]

class InsightFaceInput(nn.Module):
    """A network for [0, 1] RGB input, fed InsightFace's scaling instead.

    Defined in :numref:`sec_facerecognition_deployment`"""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, y):
        # y = (x - 127.5) / 127.5 for pixel values x, so y / 2 + 0.5 is
        # x / 255, the input the network expects
        return self.net(y / 2 + 0.5)

def export_onnx(net, path, image_size=(112, 112), opset=17):
    """Write net as an ONNX file that takes InsightFace's input.

    Defined in :numref:`sec_facerecognition_deployment`"""
    model, was_training = InsightFaceInput(net), net.training
    example = torch.zeros((1, 3) + tuple(image_size),
                          device=next(net.parameters()).device)
    buffer = io.BytesIO()
    try:
        model.eval()  # batch normalization with its running statistics
        torch.onnx.export(
            model, example, buffer, opset_version=opset,
            input_names=['input'], output_names=['embedding'],
            dynamic_axes={'input': {0: 'batch'}, 'embedding': {0: 'batch'}})
    finally:
        net.train(was_training)
    return onnxrun.write_model(buffer.getvalue(), path,
                               onnxrun.insightface_metadata(image_size))

def identify(probes, gallery, threshold=None):
    """Most similar gallery row of each unit probe, its cosine; -1: nobody.

    Defined in :numref:`sec_facerecognition_deployment`"""
    probes, gallery = onp.asarray(probes), onp.asarray(gallery)
    checks.check_gallery(probes, gallery, threshold)
    threshold = -onp.inf if threshold is None else float(threshold)
    rows = [x.astype(onp.float64) for x in (probes, gallery)]
    bad = [~onp.isfinite(x).all(axis=1) for x in rows]
    for x, unusable, name in zip(rows, bad, ('probe', 'gallery')):
        x[unusable] = 0  # similar to nothing, below
        checks.check_unit_rows(x[~unusable], name)
    similarity = rows[0] @ rows[1].T
    similarity[bad[0]], similarity[:, bad[1]] = -onp.inf, -onp.inf
    best = similarity.argmax(axis=1)
    cosine = similarity[onp.arange(len(best)), best]
    return onp.where(cosine > threshold, best, -1), cosine

def split_classes(num_classes, num_shards):
    """Split range(num_classes) into `num_shards` contiguous (start, stop).

    Defined in :numref:`sec_facerecognition_model_parallel`"""
    checks.check_shards(num_classes, num_shards)
    base, extra = divmod(num_classes, num_shards)
    stops = [(i + 1) * base + min(i + 1, extra) for i in range(num_shards)]
    return list(zip([0] + stops[:-1], stops))

def sharded_softmax_loss(logits, labels, ranges, home):
    """Softmax cross-entropy from per-shard logits, never gathered.

    Defined in :numref:`sec_facerecognition_model_parallel`"""
    # logits[i] holds the logits of classes ranges[i] for the whole batch on
    # its shard's device; the per-example loss is returned on `home`.
    # 1. k maxima per example come home; the largest is the shift M.
    top = torch.stack([z.max(dim=1).values.to(home) for z in logits])
    top = top.max(dim=0).values.detach()
    sum_exp, target = 0, 0
    for z, (start, stop) in zip(logits, ranges):
        # 2. Each shard sums exp(z - M) over its classes.
        shift = top.to(z.device)[:, None]
        sum_exp = sum_exp + torch.exp(z - shift).sum(dim=1).to(home)
        # 3. The shard that owns the label sends the target logit.
        local = labels.to(z.device) - start
        owned = (local >= 0) & (local < stop - start)
        picked = z.gather(1, torch.where(owned, local, 0)[:, None])[:, 0]
        target = target + (picked * owned).to(home)
    return torch.log(sum_exp) + top - target

class MarginShard(MarginLogits):
    """MarginLogits of a range of classes; other labels get no margin.

    Defined in :numref:`sec_facerecognition_model_parallel`"""
    # A label outside the range is negative or past its end.
    def forward(self, embeddings, labels):
        def unit_rows(x):
            return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + 1e-12)
        cos = unit_rows(embeddings) @ unit_rows(self.weight).T
        cos = torch.clamp(cos, -1 + self.eps, 1 - self.eps)
        owned = (labels >= 0) & (labels < self.num_classes)
        local = torch.where(owned, labels, 0)
        cos_target = cos.gather(1, local[:, None])[:, 0]
        target = margin_target_logit(torch.arccos(cos_target), self.s,
                                     self.m1, self.m2, self.m3)
        one_hot = F.one_hot(local, self.num_classes).to(cos.dtype)
        one_hot = one_hot * owned[:, None]  # no margin for other shards
        return self.s * cos + one_hot * (target - self.s * cos_target)[:, None]

class ShardedMarginLoss(nn.Module):
    """Margin softmax loss with the class weight split over devices.

    Defined in :numref:`sec_facerecognition_model_parallel`"""
    def __init__(self, num_classes, embedding_size, devices, s=64.0, m1=1.0,
                 m2=0.0, m3=0.0):
        super().__init__()
        self.devices = list(devices)
        self.ranges = split_classes(num_classes, len(self.devices))
        self.shards = nn.ModuleList(
            MarginShard(stop - start, embedding_size, s, m1, m2, m3).to(device)
            for (start, stop), device in zip(self.ranges, self.devices))

    def shard_logits(self, embeddings, labels):
        """Return each shard's margin logits, (batch, its classes), on its
        own device."""
        return [shard(embeddings.to(device), labels.to(device) - start)
                for shard, device, (start, _) in zip(
                    self.shards, self.devices, self.ranges)]

    def forward(self, embeddings, labels):
        return sharded_softmax_loss(self.shard_logits(embeddings, labels),
                                    labels, self.ranges, embeddings.device)

def loss_and_grads(loss_fn, weights, X, y):
    """Per-example loss; gradients of its sum w.r.t. X and the weights.

    Defined in :numref:`sec_facerecognition_model_parallel`"""
    X = X.clone().requires_grad_()
    loss = loss_fn(X, y)
    grads = torch.autograd.grad(loss.sum(), [X] + weights)
    return loss.detach(), grads[0], torch.cat([g.cpu() for g in grads[1:]])

def sample_facerec_batches(data_dir, num_classes, batch_size, num_steps,
                           seed=0):
    """`num_steps` batches, the same in every process with the same seed.

    Defined in :numref:`sec_facerecognition_data_parallel`"""
    # Images of the first `num_classes` identities, shuffled and flipped.
    items = list_facerec_images(data_dir, num_classes)
    checks.check_one_batch(len(items), batch_size, num_classes, data_dir)
    images = torch.stack([torch.from_numpy(onp.ascontiguousarray(
        read_face_image(path))) for path, _ in items]).permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in items])
    generator = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < num_steps:
        order = torch.randperm(len(items), generator=generator)
        for i in range(0, len(items) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            flip = torch.rand(batch_size, generator=generator) < 0.5
            X = images[idx].float() / 255  # [0, 1], as ToTensor makes them
            X = torch.where(flip[:, None, None, None], X.flip(3), X)
            batches.append((X, labels[idx]))
            if len(batches) == num_steps:
                break
    return batches

def init_face_model(num_classes, width, seed):
    """A small face net and CosFace-style margin layer, alike for a seed.

    Defined in :numref:`sec_facerecognition_data_parallel`"""
    torch.manual_seed(seed)
    net = face_resnet(18, width=width, embedding_size=64)
    head = MarginLogits(num_classes, 64, s=16.0, m3=0.1)
    return net, head

def train_on_parts(net, head, batches, parts, num_parts, lr=0.05):
    """SGD on some parts of each batch; the mean loss of each step.

    Defined in :numref:`sec_facerecognition_data_parallel`"""
    # Each batch is cut into `num_parts` equal parts, of which the step
    # trains on those listed in `parts`.
    checks.check_equal_parts(len(batches[0][1]), num_parts)
    params = list(net.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9,
                                weight_decay=5e-4)
    device, dtype, losses = params[0].device, params[0].dtype, []
    net.train()
    for X, y in batches:
        Xs, ys = X.chunk(num_parts), y.chunk(num_parts)
        optimizer.zero_grad()
        loss = 0
        for i in parts:  # only these parts go to the device
            X_i, y_i = Xs[i].to(device, dtype), ys[i].to(device)
            # Each part through the network on its own: its own statistics.
            loss = loss + F.cross_entropy(head(net(X_i), y_i), y_i,
                                          reduction='sum')
        loss = loss / sum(len(ys[i]) for i in parts)
        loss.backward()  # in DDP, the gradients of all ranks are averaged
        optimizer.step()
        losses.append(float(loss))
    return losses

DIST_TIMEOUT = datetime.timedelta(minutes=5)  # for joining and collectives

def train_face_worker(data_dir, out_dir, backend='gloo', num_classes=20,
                      batch_size=8, num_steps=10, lr=0.05, width=0.125,
                      seed=0, dtype='float32'):
    """Train a small face net data parallel in a job torchrun started.

    Defined in :numref:`sec_facerecognition_data_parallel`"""
    # `batch_size` images per rank; each rank saves its losses and model.
    # Reads MASTER_ADDR, RANK, ...
    dist.init_process_group(backend, timeout=DIST_TIMEOUT)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = (torch.device('cuda', int(os.environ['LOCAL_RANK']))
              if backend == 'nccl' else torch.device('cpu'))
    if device.type == 'cuda':
        torch.cuda.set_device(device)  # this rank's GPU, not GPU 0
    batches = sample_facerec_batches(data_dir, num_classes,
                                     batch_size * world_size, num_steps, seed)
    net, head = (nn.parallel.DistributedDataParallel(
        m.to(device, getattr(torch, dtype)),
        device_ids=[device] if device.type == 'cuda' else None)
        for m in init_face_model(num_classes, width, seed))
    tic = time.time()
    losses = train_on_parts(net, head, batches, [rank], world_size, lr)
    seconds = time.time() - tic
    os.makedirs(out_dir, exist_ok=True)
    save_tensors({'net': net.module.state_dict(),
                  'head': head.module.state_dict()},
                 os.path.join(out_dir, f'rank{rank}.pt'))
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump({'rank': rank, 'world_size': world_size,
                   'losses': losses, 'seconds': seconds}, f)
    print(f'rank {rank}/{world_size}: loss {losses[0]:.2f} -> '
          f'{losses[-1]:.2f} in {seconds:.1f} s')
    # The ranks end together. The group ends with the process: with Gloo,
    # dist.destroy_process_group() hangs now and then (PyTorch issue 75097).
    dist.barrier()

def dist_sharded_softmax_loss(logits, labels, start):
    """Softmax cross-entropy of the global batch from the ranks' shards.

    Defined in :numref:`sec_facerecognition_multi_machine`"""
    # `logits` are this rank's, of the classes start, start + 1, ...
    top = logits.detach().max(dim=1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX)  # 1. the shift M
    # 2. and 3., recorded by autograd: their gradients are all-reduced too.
    sum_exp = dist_nn.all_reduce(torch.exp(logits - top[:, None]).sum(dim=1))
    local = labels - start
    owned = (local >= 0) & (local < logits.shape[1])
    picked = logits.gather(1, torch.where(owned, local, 0)[:, None])[:, 0]
    target = dist_nn.all_reduce(picked * owned)
    return torch.log(sum_exp) + top - target

class DistShardedMarginLoss(nn.Module):
    """Margin softmax loss with the class weight split over the ranks.

    Defined in :numref:`sec_facerecognition_multi_machine`"""
    def __init__(self, num_classes, embedding_size, s=64.0, m1=1.0, m2=0.0,
                 m3=0.0):
        super().__init__()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.start, stop = split_classes(num_classes, self.world_size)[
            self.rank]
        self.shard = MarginShard(stop - self.start, embedding_size, s, m1,
                                 m2, m3)

    def forward(self, embeddings, labels):
        """The loss of this rank's examples (every rank has as many)."""
        X = torch.cat(dist_nn.all_gather(embeddings))
        ys = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(ys, labels)
        y = torch.cat(ys)
        loss = dist_sharded_softmax_loss(self.shard(X, y - self.start), y,
                                         self.start)
        n = len(labels)
        return loss[self.rank * n:(self.rank + 1) * n]

def random_margin_problem(num_classes, embedding_size, batch_size, seed=0):
    """Random embeddings, labels and class weight, alike for a seed.

    Defined in :numref:`sec_facerecognition_multi_machine`"""
    generator = torch.Generator().manual_seed(seed)  # X, y, W in this order
    return (torch.randn(batch_size, embedding_size, generator=generator),
            torch.randint(0, num_classes, (batch_size,), generator=generator),
            torch.randn(num_classes, embedding_size, generator=generator))

def sharded_loss_worker(out_dir, num_classes=1000, embedding_size=64,
                        batch_size=8, margin=(64.0, 1.0, 0.5, 0.0), seed=0):
    """The sharded loss of a random problem and its gradients, per rank.

    Defined in :numref:`sec_facerecognition_multi_machine`"""
    # In a job that torchrun started; each rank saves its own part.
    dist.init_process_group('gloo', timeout=DIST_TIMEOUT)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    X, y, W = random_margin_problem(num_classes, embedding_size,
                                    batch_size * world_size, seed)
    loss_fn = DistShardedMarginLoss(num_classes, embedding_size, *margin)
    weight, start = loss_fn.shard.weight, loss_fn.start
    with torch.no_grad():
        weight.copy_(W[start:start + len(weight)])
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    os.makedirs(out_dir, exist_ok=True)
    X = X[mine].clone().requires_grad_()
    loss = loss_fn(X, y[mine])
    loss.sum().backward()
    save_tensors({'loss': loss.detach(), 'grad_x': X.grad,
                  'grad_w': weight.grad, 'start': start},
                 os.path.join(out_dir, f'rank{rank}.pt'))
    dist.barrier()  # the ranks end together, as in train_face_worker