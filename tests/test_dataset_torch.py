"""The dataset section's PyTorch tab: the same data as the MXNet tab, as tensors.

The packed loader's threads fill NumPy batches in both tabs; only the final
wrap differs. So, drawn with the same random state, the PyTorch batches must
equal the MXNet ones exactly, and be the loader's own memory, not a copy.
"""
import os
import shutil

import numpy as onp
import pytest
import torch

from d2l_face import recordio
from d2l_face import mxnet as d2lf_mx
from d2l_face import torch as d2lf

from synthetic import NUM_CLASSES, PER_CLASS, packless_copy


@pytest.fixture
def data_dir(standin_root, tmp_path):
    return packless_copy(standin_root, tmp_path)


def epoch(train_iter, seed, to_numpy):
    onp.random.seed(seed)  # the order and the flips come from NumPy
    return [(to_numpy(X).copy(), to_numpy(y).copy()) for X, y in train_iter]


@pytest.mark.parametrize('shuffle, flip', [(False, False), (True, True)])
def test_the_same_batches_as_the_mxnet_tab(data_dir, shuffle, flip):
    prefix = d2lf.pack_face_records(data_dir)
    torch_iter = d2lf.FaceRecordIter(prefix, 4, shuffle=shuffle, flip=flip)
    mx_iter = d2lf_mx.FaceRecordIter(prefix, 4, shuffle=shuffle, flip=flip)
    ours = epoch(torch_iter, 3, lambda a: a.numpy())
    theirs = epoch(mx_iter, 3, lambda a: a.asnumpy())
    assert len(ours) == len(theirs) == NUM_CLASSES * PER_CLASS // 4
    for (X, y), (X_mx, y_mx) in zip(ours, theirs):
        assert X.dtype == X_mx.dtype == onp.float32
        assert y.dtype == y_mx.dtype == onp.int64
        onp.testing.assert_array_equal(X, X_mx)
        onp.testing.assert_array_equal(y, y_mx)
    if not shuffle:  # in order: the images of the folders, x / 255
        items = d2lf.list_facerec_images(data_dir)
        X, y = ours[0]
        for x, label, (path, expected) in zip(X, y, items):
            image = d2lf.read_face_image(path).transpose(2, 0, 1)
            onp.testing.assert_array_equal(x, image / onp.float32(255))
            assert label == expected


def test_batches_are_tensors_sharing_the_loaders_memory(data_dir):
    train_iter, _ = d2lf.load_data_facerec(data_dir, ['lfw_small'], 4)
    X, y = next(iter(train_iter))
    assert isinstance(X, torch.Tensor) and isinstance(y, torch.Tensor)
    assert X.shape == (4, 3, 112, 112) and X.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64
    batches = [batch for batch, _ in train_iter._buffers]
    assert X.data_ptr() in [batch.ctypes.data for batch in batches]
    batch = next(b for b in batches if b.ctypes.data == X.data_ptr())
    assert onp.shares_memory(X.numpy(), batch)
    X[0, 0, 0, 0] = 7.0  # a write to the tensor is a write to the batch
    assert batch[0, 0, 0, 0] == 7.0


def test_a_batch_in_use_is_never_refilled(data_dir):
    prefix = d2lf.pack_face_records(data_dir)
    train_iter = d2lf.FaceRecordIter(prefix, 2, shuffle=False, flip=False)
    batches = iter(train_iter)
    kept, _ = next(batches)
    first = kept.clone()
    count = sum(1 for _ in batches)  # the others are dropped as they come
    assert count == NUM_CLASSES * PER_CLASS // 2 - 1
    assert torch.equal(kept, first)
    # The tensors we dropped freed their arrays for reuse: a few suffice.
    assert len(train_iter._buffers) <= 4


def test_face_dataset_with_torchs_data_loader(data_dir):
    dataset = d2lf.FaceDataset(data_dir)
    assert isinstance(dataset, torch.utils.data.Dataset)
    assert len(dataset) == NUM_CLASSES * PER_CLASS
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True,
                                         drop_last=True, num_workers=2)
    images = {}
    for path, label in dataset.items:
        x = d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255)
        images[x.tobytes()] = label
    num_batches = 0
    for X, y in loader:
        num_batches += 1
        assert X.shape == (4, 3, 112, 112) and X.dtype == torch.float32
        assert y.shape == (4,) and y.dtype == torch.int64
        for x, label in zip(X.numpy(), y.tolist()):
            key = x.tobytes()
            if key not in images:  # then it must be the mirror image
                key = onp.ascontiguousarray(x[:, :, ::-1]).tobytes()
            assert images[key] == label
    assert num_batches == len(dataset) // 4


def test_face_dataset_flips_about_half(data_dir):
    dataset = d2lf.FaceDataset(data_dir)
    path, _ = dataset.items[0]
    plain = torch.from_numpy(
        d2lf.read_face_image(path).transpose(2, 0, 1) / onp.float32(255))
    torch.manual_seed(0)
    flips = [torch.equal(dataset[0][0], plain.flip(-1)) for _ in range(400)]
    assert 140 < sum(flips) < 260  # binomial(400, 1/2): 6 sigma either way


@pytest.mark.parametrize('layout, label_vector', [
    ('insightface', False), ('insightface', True), ('flat', False),
    ('flat', True)])
def test_insightface_packs_through_load_data_facerec(data_dir, tmp_path,
                                                      layout, label_vector):
    """Both of InsightFace's layouts, as its two pack builders write them."""
    folder = tmp_path / 'insightface'
    folder.mkdir()
    shutil.copy(os.path.join(data_dir, 'property'), folder)
    items = d2lf.list_facerec_images(data_dir)
    recordio.write_pack(str(folder / 'train'),
                        ((label, open(path, 'rb').read())
                         for path, label in items),
                        layout=layout, label_vector=label_vector)
    train_iter, _ = d2lf.load_data_facerec(str(folder), [], 5)
    assert train_iter.pack.layout == layout
    assert train_iter.num_classes == NUM_CLASSES
    assert len(train_iter) == len(items) // 5
    ordered = d2lf.FaceRecordIter(str(folder / 'train'), len(items),
                                  shuffle=False, flip=False)
    X, y = next(iter(ordered))
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [label for _, label in items]
    for x, (path, _) in zip(X.numpy(), items):
        expected = d2lf.read_face_image(path).transpose(2, 0, 1) / 255
        onp.testing.assert_array_equal(x, expected.astype(onp.float32))
    assert sorted(os.listdir(folder)) == ['property', 'train.idx',
                                          'train.rec']
