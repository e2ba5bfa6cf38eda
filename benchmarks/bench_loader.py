"""Figure 1: training loader throughput, images/s over full epochs.

(a) the original chapter's loader: a per-file gluon Dataset reading each JPEG
    with npx.image.imread, RandomFlipLeftRight + ToTensor, and a DataLoader
    with d2l.get_dataloader_workers() worker processes (reimplemented here);
(b) the project's loader, d2lf.load_data_facerec (the packed RecordIO file
    read by FaceRecordIter through d2l_face.recordio.PackReader);
(c) the limit: only cv2.imdecode of the same JPEG bytes (already in memory)
    in one thread per core, nothing else.
Also shown, not targets: (c2) decode plus the uint8 -> float32 (3, h, w)
conversion in one thread per core, without flips, batching or MXNet, the
least work any loader producing float32 batches must do; (c3) decode and
the split into a uint8 (3, h, w) batch, the least work of a loader that
would leave the float conversion to the device; (d) MXNet's own
mx.io.ImageRecordIter over the same pack (preprocess_threads = cores,
rand_mirror, scale 1/255), the ready-made alternative to (b); (e) the
loader (b) reading the same images from a pack in InsightFace's layout
(header and identity records), as MS1M-V2/V3 come; (f) the PyTorch tab's
load_data_facerec on the same pack: the same threads fill the same NumPy
batches, handed over as tensors by torch.from_numpy (no copy).

Every epoch is the same 29 batches of 512 images of the stand-in (14,848
images), flipped at random and converted to float32 (N, 3, 112, 112); each
MXNet batch is waited for (wait_to_read), as a training step would (a
PyTorch tensor on the CPU is ready when the loader hands it over).
"""
import argparse
import concurrent.futures
import os
import shutil
import tempfile

import _common
from _common import emit, median, paired_ratio, rates, round_robin, spread

import cv2
import mxnet as mx
import numpy as onp
import torch
from d2l import mxnet as d2l
from mxnet import gluon, npx
from mxnet.gluon.data.vision import transforms

from d2l_face import formats
from d2l_face import mxnet as d2lf
from d2l_face import torch as d2lf_torch

npx.set_np()
BATCH_SIZE = 512


class SourceFaceDataset(gluon.data.Dataset):
    """Baseline (a): the per-file dataset of the original chapter."""
    def __init__(self, data_dir):
        _, num_classes = d2lf.read_facerec_meta(data_dir)
        self.transform = transforms.Compose([
            transforms.RandomFlipLeftRight(), transforms.ToTensor()])
        self.items = []
        for label in range(num_classes):
            folder = os.path.join(data_dir, formats.identity_folder(label))
            # listed, not globbed: a data folder may be named 'data[1]'
            self.items += [(path, label)
                           for path in d2lf.list_face_jpegs(folder)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        path, label = self.items[idx]
        return self.transform(npx.image.imread(path)), label


def consume(loader):
    """Run one epoch, waiting for every batch; return the image count."""
    count = 0
    for X, y in loader:
        X.wait_to_read()
        y.wait_to_read()
        assert X.shape[1:] == (3, 112, 112) and X.dtype == onp.float32
        count += X.shape[0]
    return count


def consume_torch(loader):
    """(f): one epoch of the PyTorch tab's loader; return the image count."""
    count = 0
    for X, y in loader:
        assert X.shape[1:] == (3, 112, 112) and X.dtype == torch.float32
        assert y.dtype == torch.int64
        count += X.shape[0]
    return count


def consume_record_iter(record_iter):
    """(d): one epoch of mx.io.ImageRecordIter; return the image count."""
    count = 0
    record_iter.reset()
    for batch in record_iter:
        batch.data[0].wait_to_read()
        count += batch.data[0].shape[0] - batch.pad
    return count


def decode_only(jpegs, pool, num_threads):
    """Limit (c): decode every JPEG, one contiguous share per thread."""
    def decode(share):
        for jpeg in share:
            cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    shares = [jpegs[t::num_threads] for t in range(num_threads)]
    list(pool.map(decode, shares))
    return len(jpegs)


def decode_and_convert(jpegs, pool, num_threads, outs):
    """(c2): decode and convert to float32 RGB (3, h, w), nothing else.

    Each thread writes into its own batch-sized array, as a loader must:
    writing 150 KB of floats per image to memory is a large part of the
    cost, which a small array that stays in the cache would hide."""
    def work(t):
        rgb, out = onp.empty((3, 112, 112), onp.uint8), outs[t]
        for i, jpeg in enumerate(jpegs[t::num_threads]):
            cv2.split(cv2.imdecode(jpeg, cv2.IMREAD_COLOR),
                      [rgb[2], rgb[1], rgb[0]])
            x = out[i % len(out)]
            x[...] = rgb
            x /= 255
    list(pool.map(work, range(num_threads)))
    return len(jpegs)


def decode_to_uint8(jpegs, pool, num_threads, outs):
    """(c3): decode and split into RGB planes of a uint8 batch, no floats."""
    def work(t):
        out = outs[t]
        for i, jpeg in enumerate(jpegs[t::num_threads]):
            x = out[i % len(out)]
            cv2.split(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), [x[2], x[1], x[0]])
    list(pool.map(work, range(num_threads)))
    return len(jpegs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    data_dir = _common.dataset_dir()
    print(f'data: {data_dir}; load {_common.load()}')

    num_threads = os.cpu_count()
    simple = gluon.data.DataLoader(
        SourceFaceDataset(data_dir), BATCH_SIZE, shuffle=True,
        last_batch='discard', num_workers=d2l.get_dataloader_workers())
    fast, _ = d2lf.load_data_facerec(data_dir, (), BATCH_SIZE)
    prefix = fast.prefix  # the pack the line above made (or found)
    fast_torch, _ = d2lf_torch.load_data_facerec(data_dir, (), BATCH_SIZE)
    # (e): the same images in a pack laid out as InsightFace writes them.
    insightface_dir = tempfile.mkdtemp(prefix='bench-insightface-')
    d2lf.write_insightface_pack(data_dir, insightface_dir)
    insightface, _ = d2lf.load_data_facerec(insightface_dir, (), BATCH_SIZE)
    record_iter = mx.io.ImageRecordIter(
        path_imgrec=prefix + '.rec', path_imgidx=prefix + '.idx',
        data_shape=(3, 112, 112), batch_size=BATCH_SIZE, shuffle=True,
        rand_mirror=True, scale=1 / 255, preprocess_threads=num_threads,
        round_batch=False, verbose=False)
    per_epoch = len(fast) * BATCH_SIZE
    items = d2lf.list_facerec_images(data_dir)
    jpegs = []
    for path, _ in items[:per_epoch]:
        with open(path, 'rb') as f:
            jpegs.append(onp.frombuffer(f.read(), onp.uint8))
    pool = concurrent.futures.ThreadPoolExecutor(num_threads)
    outs = [onp.zeros((BATCH_SIZE, 3, 112, 112), onp.float32)
            for _ in range(num_threads)]
    outs_uint8 = [onp.zeros((BATCH_SIZE, 3, 112, 112), onp.uint8)
                  for _ in range(num_threads)]
    print(f'{len(items)} images, {per_epoch} per epoch in batches of '
          f'{BATCH_SIZE}; {num_threads} threads; DataLoader workers: '
          f'{d2l.get_dataloader_workers()} processes; {args.repeats} rounds')

    runs = round_robin({
        'a': lambda: consume(simple),
        'b': lambda: consume(fast),
        'c': lambda: decode_only(jpegs, pool, num_threads),
        'c2': lambda: decode_and_convert(jpegs, pool, num_threads, outs),
        'c3': lambda: decode_to_uint8(jpegs, pool, num_threads, outs_uint8),
        'd': lambda: consume_record_iter(record_iter),
        'e': lambda: consume(insightface),
        'f': lambda: consume_torch(fast_torch),
    }, repeats=args.repeats)
    shutil.rmtree(insightface_dir)
    names = {'a': '(a) source DataLoader, per-file imread',
             'b': '(b) d2lf.load_data_facerec (packed)',
             'c': '(c) limit: cv2.imdecode only, all cores',
             'c2': '(c2) decode + float32 conversion only',
             'c3': '(c3) decode + uint8 planes only',
             'd': '(d) mx.io.ImageRecordIter on the pack',
             'e': '(e) (b) on an InsightFace-layout pack',
             'f': '(f) PyTorch tab: d2lf.load_data_facerec'}
    for key, name in names.items():
        print(f'  {name:42s} {spread(rates(runs[key]))} images/s')
    a, b, c, f = (median(rates(runs[k])) for k in ('a', 'b', 'c', 'f'))
    r = {k: paired_ratio(rates(runs['b']), rates(runs[k]))
         for k in ('a', 'c', 'c2', 'd', 'e')}
    floors = {k: paired_ratio(rates(runs[k]), rates(runs['c']))
              for k in ('c2', 'c3', 'f')}
    cpu = {k: median(_common.per_unit_us(runs[k], 'cpu'))
           for k in ('b', 'c', 'c2')}
    print(f'  per-round ratios (medians): (b)/(c) = {r["c"]:.3f}, '
          f'(b)/(a) = {r["a"]:.2f}x, (b)/(c2) = {r["c2"]:.3f}, '
          f'(b)/(d) = {r["d"]:.2f}x, (b)/(e) = {r["e"]:.2f}; ratio of the '
          f'medians (b)/(c) = '
          f'{b / c:.3f}')
    print(f'  CPU time per image (all threads): (b) {cpu["b"]:.1f} us, '
          f'(c) {cpu["c"]:.1f} us, (c2) {cpu["c2"]:.1f} us; by CPU time '
          f'(b)/(c) = {cpu["c"] / cpu["b"]:.3f}, '
          f'(c2)/(c) = {cpu["c"] / cpu["c2"]:.3f}')
    print(f'  floors: (c2)/(c) = {floors["c2"]:.3f} with float32 batches, '
          f'(c3)/(c) = {floors["c3"]:.3f} with uint8 batches')
    print(f'  PyTorch tab: (f)/(c) = {floors["f"]:.3f}, (f)/(b) = '
          f'{paired_ratio(rates(runs["f"]), rates(runs["b"])):.3f}')
    print(f'  load after: {_common.load()}')
    del simple  # stop its workers now, not at interpreter exit
    emit(figure='1. loader (images/s)', value=b, unit='img/s',
         baselines={'(a) source': a, '(c) decode limit': c,
                    '(f) PyTorch tab': f},
         ratio=f'{r["c"]:.2f} of (c); {r["a"]:.1f}x (a)',
         target='>= 0.85 of (c)', met=r['c'] >= 0.85)


if __name__ == '__main__':
    main()
