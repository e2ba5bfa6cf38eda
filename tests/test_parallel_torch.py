"""Section 4 in PyTorch: the sharded margin loss on one process and across
processes, and data parallel training with torch.distributed (Gloo)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as onp
import psutil
import pytest
import torch
from torch.nn import functional as F

from synthetic import REPO
from d2l_face import cluster
from d2l_face import standin
from d2l_face import torch as d2lf

# (s, m1, m2, m3): ArcFace, and the combined margin of the ArcFace paper.
MARGINS = {'arcface': (64.0, 1.0, 0.5, 0.0), 'combined': (64.0, 1.0, 0.3, 0.2)}


def assert_close(actual, expected, what, tol=1e-5):
    """Equal to `tol`, relative to the largest magnitude of `expected`."""
    actual, expected = onp.asarray(actual), onp.asarray(expected)
    scale = max(1.0, float(onp.abs(expected).max()))
    onp.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale,
                                err_msg=what)


def single_device_reference(X, y, W, margin):
    """Logits, per-example loss and gradients (of the loss's sum) of
    MarginLogits + cross-entropy in one process."""
    full = d2lf.MarginLogits(W.shape[0], W.shape[1], *margin)
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


# ------------------------------------------------------ one process, k shards

@pytest.mark.parametrize('margin_name', sorted(MARGINS))
@pytest.mark.parametrize('num_shards', [1, 2, 3])
def test_sharded_loss_equals_single_device(num_shards, margin_name):
    num_classes, dim, batch = 10, 8, 9  # 10 classes do not split evenly in 3
    margin = MARGINS[margin_name]
    X, y, W = problem_beyond_pi(num_classes, dim, batch, margin, num_shards)
    logits1, loss1, grad_x1, grad_w1 = single_device_reference(X, y, W,
                                                               margin)
    devices = [torch.device('cpu')] * num_shards
    sharded = d2lf.ShardedMarginLoss(num_classes, dim, devices, *margin)
    assert sharded.ranges == d2lf.split_classes(num_classes, num_shards)
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


def test_a_shard_applies_the_margin_to_its_own_labels_only():
    shard = d2lf.MarginShard(3, 4, s=8.0, m2=0.5)
    plain = d2lf.MarginLogits(3, 4, s=8.0)
    with torch.no_grad():
        plain.weight.copy_(shard.weight)
    X = torch.randn(5, 4)
    labels = torch.tensor([0, 2, -1, 3, 7])  # two owned, three not
    out = shard(X, labels)
    margined = d2lf.MarginLogits(3, 4, s=8.0, m2=0.5)
    with torch.no_grad():
        margined.weight.copy_(shard.weight)
    owned = labels[:2]
    torch.testing.assert_close(out[:2], margined(X[:2], owned))
    no_margin = plain(X[2:], torch.zeros(3, dtype=torch.long))  # m = 0
    torch.testing.assert_close(out[2:], no_margin)


def test_sharded_loss_parameters_are_its_shards():
    sharded = d2lf.ShardedMarginLoss(5, 4, [torch.device('cpu')] * 2, s=8.0)
    assert [p.shape for p in sharded.parameters()] == [(3, 4), (2, 4)]


def test_sharded_loss_needs_a_class_per_device():
    with pytest.raises(ValueError, match='non-empty shards'):
        d2lf.ShardedMarginLoss(2, 4, [torch.device('cpu')] * 3)


# ------------------------------------------------------------- the data

@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('standin')
    return standin.generate(str(root), num_classes=4, images_per_class=6,
                            num_val_pairs=2, num_wild=0)


def test_face_batches_are_alike_for_a_seed(tiny_data_dir):
    a = d2lf.face_batches(tiny_data_dir, 3, 4, num_steps=7, seed=1)
    b = d2lf.face_batches(tiny_data_dir, 3, 4, num_steps=7, seed=1)
    c = d2lf.face_batches(tiny_data_dir, 3, 4, num_steps=7, seed=2)
    assert len(a) == 7  # 18 images: 4 batches a pass, so a second pass
    for (Xa, ya), (Xb, yb) in zip(a, b):
        assert Xa.shape == (4, 3, 112, 112) and Xa.dtype == torch.float32
        assert 0 <= float(Xa.min()) and float(Xa.max()) <= 1
        assert torch.equal(Xa, Xb) and torch.equal(ya, yb)
        assert set(ya.tolist()) <= {0, 1, 2}
    assert any(not torch.equal(Xa, Xc) for (Xa, _), (Xc, _) in zip(a, c))


def test_face_batches_flip_some_images(tiny_data_dir):
    items = d2lf.list_facerec_images(tiny_data_dir, 1)
    originals = torch.stack([torch.from_numpy(onp.ascontiguousarray(
        d2lf.read_face_image(p))).permute(2, 0, 1).float() / 255
        for p, _ in items])
    (X, y), = d2lf.face_batches(tiny_data_dir, 1, len(items), 1, seed=0)
    flipped = 0
    for image in X:  # each image is an original, flipped or not
        same = (originals == image).flatten(1).all(dim=1)
        mirrored = (originals.flip(3) == image).flatten(1).all(dim=1)
        assert same.any() or mirrored.any()
        flipped += int(mirrored.any() and not same.any())
    assert 0 < flipped < len(X)


def test_face_batches_refuse_fewer_images_than_a_batch(tiny_data_dir):
    with pytest.raises(ValueError, match=r'has 12 images .* batch size 13'):
        d2lf.face_batches(tiny_data_dir, 2, 13, num_steps=1)


def test_train_on_parts_needs_equal_parts(tiny_data_dir):
    batches = d2lf.face_batches(tiny_data_dir, 4, 6, num_steps=1)
    net, head = d2lf.init_face_model(4, 0.125, seed=0)
    with pytest.raises(ValueError, match='does not cut into 4 equal parts'):
        d2lf.train_on_parts(net, head, batches, [0], num_parts=4)


# -------------------------------------------------------- across processes

def launched(code, nproc):
    """Run `code` in `nproc` torchrun-style ranks; check nothing is left."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    outputs = cluster.launch_local_torchrun(['-c', code], nproc, timeout=300)
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before]
    assert not left, f'processes left running: {left}'
    return outputs


@pytest.mark.parametrize('world_size,margin_name', [(2, 'arcface'),
                                                    (3, 'combined')])
def test_sharded_loss_across_processes_equals_one_process(
        tmp_path, world_size, margin_name):
    num_classes, dim, batch = 10, 8, 3
    margin = MARGINS[margin_name]
    code = (f'from d2l_face import torch as d2lf; d2lf.sharded_loss_worker('
            f'{str(tmp_path)!r}, {num_classes}, {dim}, {batch}, {margin!r}, '
            f'seed=5)')
    launched(code, world_size)
    ranks = [d2lf.load_tensors(tmp_path / f'rank{r}.pt')
             for r in range(world_size)]
    ranges = d2lf.split_classes(num_classes, world_size)
    assert [r['start'] for r in ranks] == [start for start, _ in ranges]
    X, y, W = d2lf.random_margin_problem(num_classes, dim,
                                         batch * world_size, seed=5)
    _, loss1, grad_x1, grad_w1 = single_device_reference(X, y, W, margin)
    assert_close(torch.cat([r['loss'] for r in ranks]), loss1, 'loss')
    assert_close(torch.cat([r['grad_x'] for r in ranks]), grad_x1,
                 'gradient of the embeddings')
    for r, (start, stop) in zip(ranks, ranges):
        assert_close(r['grad_w'], grad_w1[start:stop],
                     f'gradient of the weight rows {start}:{stop}')


def test_two_ranks_train_like_one_process(tiny_data_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    steps, part = 4, 4
    code = (f'from d2l_face import torch as d2lf; d2lf.train_face_worker('
            f'{tiny_data_dir!r}, {out_dir!r}, num_classes=4, '
            f'batch_size={part}, num_steps={steps}, dtype="float64")')
    outputs = launched(code, 2)
    assert [o.strip().splitlines()[-1][:9] for o in outputs] == [
        'rank 0/2:', 'rank 1/2:']
    records = [json.load(open(os.path.join(out_dir, f'rank{r}.json')))
               for r in range(2)]
    assert [(r['rank'], r['world_size']) for r in records] == [(0, 2), (1, 2)]
    states = [d2lf.load_tensors(os.path.join(out_dir, f'rank{r}.pt'))
              for r in range(2)]

    # The same training in this process (one thread: as fast as a rank).
    net, head = (m.double() for m in d2lf.init_face_model(4, 0.125, seed=0))
    batches = d2lf.face_batches(tiny_data_dir, 4, 2 * part, steps, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = d2lf.train_on_parts(net, head, batches, [0, 1], 2)
    finally:
        torch.set_num_threads(threads)
    dist_loss = onp.mean([r['losses'] for r in records], axis=0)
    assert len(single) == len(dist_loss) == steps
    assert all(map(math.isfinite, single))
    assert_close(dist_loss, single, 'loss curves')

    for name, module in [('net', net), ('head', head)]:
        params = dict(module.named_parameters())
        assert params and set(params) <= set(states[0][name])
        for key, value in params.items():
            assert torch.equal(states[0][name][key], states[1][name][key]), key
            assert states[0][name][key].dtype == torch.float64
            assert_close(states[0][name][key], value.detach(), key)
    # The ranks trained: their parameters moved away from the start.
    start, _ = d2lf.init_face_model(4, 0.125, seed=0)
    assert any(not torch.equal(value, states[0]['net'][key])
               for key, value in start.state_dict().items())


# A parent that starts two ranks which join a process group, then is killed.
PARENT = ('''import sys; from d2l_face import cluster
cluster.launch_local_torchrun(['-c', sys.argv[1]], 2, timeout=600)''')
RANK = ('''import time; from torch import distributed as dist
dist.init_process_group('gloo'); dist.barrier()
print('joined', flush=True); time.sleep(600)''')


def connected(proc):
    """Whether `proc` holds a TCP connection (the watchdog holds none)."""
    try:
        return any(c.status == psutil.CONN_ESTABLISHED
                   for c in proc.net_connections('inet'))
    except psutil.Error:
        return False


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM],
                         ids=lambda sig: sig.name)
def test_ranks_end_when_their_parent_is_killed(tmp_path, sig):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + os.environ.get('PYTHONPATH', '').split(os.pathsep)))
    parent = subprocess.Popen([sys.executable, '-c', PARENT, RANK], env=env)
    procs = []
    try:
        deadline = time.monotonic() + 120
        while len(procs) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)  # the watchdog, two ranks and their reapers
            procs = psutil.Process(parent.pid).children(recursive=True)
        assert len(procs) == 5, procs
        # Let the ranks join their group: then both hold connections.
        while (time.monotonic() < deadline and
               sum(map(connected, procs)) < 2):
            time.sleep(0.2)
        assert sum(map(connected, procs)) == 2, procs
        parent.send_signal(sig)
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs(procs, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        parent.kill()
        parent.wait()
        for p in procs:
            if p.is_running():
                p.kill()


def test_every_rank_sets_a_timeout_shorter_than_gloos_default():
    import datetime
    import inspect
    import re
    assert datetime.timedelta(0) < d2lf.DIST_TIMEOUT \
        < datetime.timedelta(minutes=30)
    source = inspect.getsource(d2lf)
    calls = re.findall(r'dist\.init_process_group\(([^)]*)\)', source)
    assert calls and all('timeout=DIST_TIMEOUT' in c for c in calls), calls
