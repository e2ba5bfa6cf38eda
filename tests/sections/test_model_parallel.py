"""Section `model_parallel`: the class-sharded margin loss in one process.

A test that takes `d2lf` holds for both tabs; the others test one tab."""
import math

import numpy as onp
import pytest
import torch
from mxnet import autograd, gluon, npx
from mxnet import np as mxnp
from torch.nn import functional as F

from d2l_face import mxnet as d2lf_mx
from d2l_face import torch as d2lf_torch
from synthetic import assert_close

npx.set_np()

# (s, m1, m2, m3): ArcFace, and the combined margin of the ArcFace paper.
MARGINS = {name: (64.0,) + d2lf_mx.MARGIN_SETTINGS[name]
           for name in ('arcface', 'combined')}


def cpus(d2lf, k):
    """`k` devices of the CPU: MXNet's are distinct, PyTorch's the same."""
    if d2lf is d2lf_torch:
        return [torch.device('cpu')] * k
    return [npx.cpu(i) for i in range(k)]


def shard_shapes(d2lf, sharded):
    """The shapes of the sharded loss's parameters, in order."""
    if d2lf is d2lf_torch:
        return [tuple(p.shape) for p in sharded.parameters()]
    return [p.shape for p in sharded.collect_params().values()]


# ---------------------------------------------------------------- both tabs

@pytest.mark.parametrize('num_classes,num_shards',
                         [(10, 3), (7, 7), (5, 1), (1000, 8), (11, 4)])
def test_split_classes_covers_all_classes_in_near_equal_ranges(
        d2lf, num_classes, num_shards):
    ranges = d2lf.split_classes(num_classes, num_shards)
    assert len(ranges) == num_shards
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert stop == start
    sizes = [stop - start for start, stop in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert all(isinstance(x, int) for r in ranges for x in r)


@pytest.mark.parametrize('num_classes,num_shards', [(3, 4), (3, 0), (0, 1)])
def test_split_classes_rejects_empty_shards(d2lf, num_classes, num_shards):
    with pytest.raises(ValueError, match='non-empty shards'):
        d2lf.split_classes(num_classes, num_shards)


def test_sharded_loss_parameters_are_its_shards(d2lf):
    devices = cpus(d2lf, 2)
    sharded = d2lf.ShardedMarginLoss(5, 4, devices, s=8.0)
    assert shard_shapes(d2lf, sharded) == [(3, 4), (2, 4)]
    if d2lf is d2lf_mx:  # each shard on its own device
        params = sharded.collect_params().values()
        assert [p.list_ctx() for p in params] == [[d] for d in devices]


def test_sharded_loss_needs_a_class_per_device(d2lf):
    with pytest.raises(ValueError, match='non-empty shards'):
        d2lf.ShardedMarginLoss(2, 4, cpus(d2lf, 3))


# ------------------------------------------------------- the MXNet tab alone

def mxnet_reference(X, y, W, margin):
    """Logits, loss and gradients of MarginLogits + SoftmaxCrossEntropyLoss."""
    full = d2lf_mx.MarginLogits(W.shape[0], W.shape[1], *margin)
    full.initialize()
    full.weight.set_data(mxnp.array(W))
    X = mxnp.array(X)
    X.attach_grad()
    with autograd.record():
        logits = full(X, y)
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(logits, y)
    loss.backward()
    return (logits.asnumpy(), loss.asnumpy(), X.grad.asnumpy(),
            full.weight.grad().asnumpy())


@pytest.mark.parametrize('margin_name', sorted(MARGINS))
@pytest.mark.parametrize('num_shards', [1, 2, 3])
def test_mxnet_sharded_loss_equals_single_device(num_shards, margin_name):
    num_classes, dim, batch = 10, 8, 9  # 10 classes do not split evenly in 3
    margin = MARGINS[margin_name]
    rng = onp.random.default_rng(num_shards)
    W = rng.normal(size=(num_classes, dim)).astype('float32')
    X = rng.normal(size=(batch, dim)).astype('float32')
    labels = onp.arange(batch) % num_classes
    # Example 0 points almost away from its class: m1*theta + m2 > pi there,
    # where the margin function has to take its fallback branch.
    X[0] = -W[labels[0]] + 0.05 * rng.normal(size=dim)
    cos0 = X[0] @ W[labels[0]] / onp.linalg.norm(X[0]) / onp.linalg.norm(
        W[labels[0]])
    _, m1, m2, _ = margin
    assert math.acos(cos0) > (math.pi - m2) / m1
    y = mxnp.array(labels.astype('float32'))
    logits1, loss1, grad_x1, grad_w1 = mxnet_reference(X, y, W, margin)

    devices = cpus(d2lf_mx, num_shards)
    sharded = d2lf_mx.ShardedMarginLoss(num_classes, dim, devices, *margin)
    assert sharded.ranges == d2lf_mx.split_classes(num_classes, num_shards)
    for shard, device, (start, stop) in zip(sharded.shards, devices,
                                            sharded.ranges):
        assert shard.weight.list_ctx() == [device]
        shard.weight.set_data(mxnp.array(W[start:stop], ctx=device))
    X2 = mxnp.array(X)
    X2.attach_grad()
    with autograd.record():
        loss2 = sharded(X2, y)
    loss2.backward()
    logits2 = onp.concatenate([z.asnumpy() for z in sharded.shard_logits(
        mxnp.array(X), y)], axis=1)

    assert_close(logits2, logits1, 'logits')
    assert loss2.shape == (batch,) and loss2.ctx == npx.cpu(0)
    assert_close(loss2.asnumpy(), loss1, 'loss')
    assert_close(X2.grad.asnumpy(), grad_x1, 'gradient of the embeddings')
    for i, (shard, device, (start, stop)) in enumerate(zip(
            sharded.shards, devices, sharded.ranges)):
        assert_close(shard.weight.grad(device).asnumpy(),
                     grad_w1[start:stop], f'gradient of weight shard {i}')


# ----------------------------------------------------- the PyTorch tab alone

def torch_reference(X, y, W, margin):
    """Logits, per-example loss and gradients (of the loss's sum) of
    MarginLogits + cross-entropy in one process."""
    full = d2lf_torch.MarginLogits(W.shape[0], W.shape[1], *margin)
    with torch.no_grad():
        full.weight.copy_(W)
    X = X.clone().requires_grad_()
    logits = full(X, y)
    loss = F.cross_entropy(logits, y, reduction='none')
    loss.sum().backward()
    return logits.detach(), loss.detach(), X.grad, full.weight.grad


def problem_beyond_pi(num_classes, dim, batch, margin, seed):
    """Random X, y, W whose example 0 points almost away from its class:
    m1*theta + m2 > pi there, where the margin takes its fallback branch."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(num_classes, dim, generator=gen)
    X = torch.randn(batch, dim, generator=gen)
    y = torch.arange(batch) % num_classes
    X[0] = -W[y[0]] + 0.05 * torch.randn(dim, generator=gen)
    _, m1, m2, _ = margin
    cos0 = float(F.cosine_similarity(X[:1], W[y[0]][None]))
    assert math.acos(cos0) > (math.pi - m2) / m1
    return X, y, W


@pytest.mark.parametrize('margin_name', sorted(MARGINS))
@pytest.mark.parametrize('num_shards', [1, 2, 3])
def test_sharded_loss_equals_single_device(num_shards, margin_name):
    num_classes, dim, batch = 10, 8, 9  # 10 classes do not split evenly in 3
    margin = MARGINS[margin_name]
    X, y, W = problem_beyond_pi(num_classes, dim, batch, margin, num_shards)
    logits1, loss1, grad_x1, grad_w1 = torch_reference(X, y, W, margin)
    devices = cpus(d2lf_torch, num_shards)
    sharded = d2lf_torch.ShardedMarginLoss(num_classes, dim, devices, *margin)
    assert sharded.ranges == d2lf_torch.split_classes(num_classes, num_shards)
    with torch.no_grad():
        for shard, (start, stop) in zip(sharded.shards, sharded.ranges):
            shard.weight.copy_(W[start:stop])
    X2 = X.clone().requires_grad_()
    loss2 = sharded(X2, y)
    loss2.sum().backward()
    logits2 = torch.cat(sharded.shard_logits(X, y), dim=1).detach()

    assert_close(logits2, logits1, 'logits')
    assert loss2.shape == (batch,)
    assert_close(loss2.detach(), loss1, 'loss')
    assert_close(X2.grad, grad_x1, 'gradient of the embeddings')
    for i, (shard, (start, stop)) in enumerate(zip(sharded.shards,
                                                   sharded.ranges)):
        assert_close(shard.weight.grad, grad_w1[start:stop],
                     f'gradient of weight shard {i}')


def test_loss_and_grads_gives_the_gradients_of_the_summed_loss():
    # The saved helper against autograd by hand, for two weights.
    X, W1, W2 = torch.randn(4, 3), torch.randn(2, 3), torch.randn(5, 3)

    def loss_fn(X, y):
        return (X @ W1.T).sum(dim=1) ** 2 + (X @ W2.T).sum(dim=1) * y
    W1.requires_grad_(), W2.requires_grad_()
    y = torch.arange(4.0)
    loss, grad_x, grad_w = d2lf_torch.loss_and_grads(loss_fn, [W1, W2], X, y)
    X2 = X.clone().requires_grad_()
    loss_fn(X2, y).sum().backward()
    torch.testing.assert_close(loss, loss_fn(X, y).detach())
    torch.testing.assert_close(grad_x, X2.grad)
    torch.testing.assert_close(grad_w, torch.cat([W1.grad, W2.grad]))


def test_a_shard_applies_the_margin_to_its_own_labels_only():
    shard = d2lf_torch.MarginShard(3, 4, s=8.0, m2=0.5)
    plain = d2lf_torch.MarginLogits(3, 4, s=8.0)
    with torch.no_grad():
        plain.weight.copy_(shard.weight)
    X = torch.randn(5, 4)
    labels = torch.tensor([0, 2, -1, 3, 7])  # two owned, three not
    out = shard(X, labels)
    margined = d2lf_torch.MarginLogits(3, 4, s=8.0, m2=0.5)
    with torch.no_grad():
        margined.weight.copy_(shard.weight)
    owned = labels[:2]
    torch.testing.assert_close(out[:2], margined(X[:2], owned))
    no_margin = plain(X[2:], torch.zeros(3, dtype=torch.long))  # m = 0
    torch.testing.assert_close(out[2:], no_margin)
