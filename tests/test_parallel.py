"""Section 4: the class-sharded margin loss and the dist_sync workers."""
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as onp
import psutil
import pytest
from mxnet import autograd, gluon, np, npx

from synthetic import REPO
from d2l_face import cluster
from d2l_face import mxnet as d2lf
from d2l_face import standin
from synthetic import HANG, deadline

npx.set_np()

# (s, m1, m2, m3): ArcFace, and the combined margin of the ArcFace paper.
MARGINS = {'arcface': (64.0, 1.0, 0.5, 0.0), 'combined': (64.0, 1.0, 0.3, 0.2)}


def assert_close(actual, expected, what):
    """Equal to 1e-5, relative to the largest magnitude of `expected`."""
    actual, expected = onp.asarray(actual), onp.asarray(expected)
    scale = max(1.0, float(onp.abs(expected).max()))
    onp.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale,
                                err_msg=what)


# ---------------------------------------------------------------- sharding

@pytest.mark.parametrize('num_classes,num_shards',
                         [(10, 3), (7, 7), (5, 1), (1000, 8), (11, 4)])
def test_split_classes_covers_all_classes_in_near_equal_ranges(num_classes,
                                                               num_shards):
    ranges = d2lf.split_classes(num_classes, num_shards)
    assert len(ranges) == num_shards
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert stop == start
    sizes = [stop - start for start, stop in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert all(isinstance(x, int) for r in ranges for x in r)


@pytest.mark.parametrize('num_classes,num_shards', [(3, 4), (3, 0), (0, 1)])
def test_split_classes_rejects_empty_shards(num_classes, num_shards):
    with pytest.raises(ValueError, match='non-empty shards'):
        d2lf.split_classes(num_classes, num_shards)


def single_device_reference(X, y, W, margin):
    """Logits, loss and gradients of MarginLogits + SoftmaxCrossEntropyLoss."""
    full = d2lf.MarginLogits(W.shape[0], W.shape[1], *margin)
    full.initialize()
    full.weight.set_data(np.array(W))
    X = np.array(X)
    X.attach_grad()
    with autograd.record():
        logits = full(X, y)
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(logits, y)
    loss.backward()
    return (logits.asnumpy(), loss.asnumpy(), X.grad.asnumpy(),
            full.weight.grad().asnumpy())


@pytest.mark.parametrize('margin_name', sorted(MARGINS))
@pytest.mark.parametrize('num_shards', [1, 2, 3])
def test_sharded_loss_equals_single_device(num_shards, margin_name):
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
    y = np.array(labels.astype('float32'))
    logits1, loss1, grad_x1, grad_w1 = single_device_reference(X, y, W, margin)

    devices = [npx.cpu(i) for i in range(num_shards)]
    sharded = d2lf.ShardedMarginLoss(num_classes, dim, devices, *margin)
    assert sharded.ranges == d2lf.split_classes(num_classes, num_shards)
    for shard, device, (start, stop) in zip(sharded.shards, devices,
                                            sharded.ranges):
        assert shard.weight.list_ctx() == [device]
        shard.weight.set_data(np.array(W[start:stop], ctx=device))
    X2 = np.array(X)
    X2.attach_grad()
    with autograd.record():
        loss2 = sharded(X2, y)
    loss2.backward()
    logits2 = onp.concatenate([z.asnumpy() for z in sharded.shard_logits(
        np.array(X), y)], axis=1)

    assert_close(logits2, logits1, 'logits')
    assert loss2.shape == (batch,) and loss2.ctx == npx.cpu(0)
    assert_close(loss2.asnumpy(), loss1, 'loss')
    assert_close(X2.grad.asnumpy(), grad_x1, 'gradient of the embeddings')
    for i, (shard, device, (start, stop)) in enumerate(zip(
            sharded.shards, devices, sharded.ranges)):
        assert_close(shard.weight.grad(device).asnumpy(),
                     grad_w1[start:stop], f'gradient of weight shard {i}')


def test_sharded_loss_parameters_are_its_shards():
    devices = [npx.cpu(0), npx.cpu(1)]
    sharded = d2lf.ShardedMarginLoss(5, 4, devices, s=8.0)
    params = list(sharded.collect_params().values())
    assert [p.shape for p in params] == [(3, 4), (2, 4)]
    assert [p.list_ctx() for p in params] == [[d] for d in devices]


def test_sharded_loss_needs_a_class_per_device():
    with pytest.raises(ValueError):
        d2lf.ShardedMarginLoss(2, 4, [npx.cpu(i) for i in range(3)])


# ----------------------------------------------------------------- launcher

class ChildWatcher(threading.Thread):
    """Record this process's descendants and their listening sockets."""
    def __init__(self):
        super().__init__(daemon=True)
        self.procs, self.listening = {}, set()
        self.done = threading.Event()

    def run(self):
        me = psutil.Process()
        while not self.done.is_set():
            for p in me.children(recursive=True):
                self.procs.setdefault(p.pid, p)
                try:
                    for c in p.net_connections(kind='inet'):
                        if c.status == psutil.CONN_LISTEN:
                            self.listening.add((p.pid, c.laddr.ip))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.05)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def assert_no_process_left(watcher):
    alive = [p for p in watcher.procs.values() if p.is_running()
             and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f'still running: {alive}'
    assert psutil.Process().children(recursive=True) == []


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('standin')
    return standin.generate(str(root), num_classes=4, images_per_class=6,
                            num_val_pairs=2, num_wild=0)


def test_two_workers_end_with_the_same_parameters(tiny_data_dir, tmp_path):
    out_dir = str(tmp_path / 'out')
    code = (f'from d2l_face import mxnet as d2lf; '
            f'd2lf.train_face_worker({tiny_data_dir!r}, {out_dir!r}, '
            f'num_classes=4, batch_size=4, num_steps=3)')
    with ChildWatcher() as watcher:
        outputs = cluster.launch_local_cluster(['-c', code], num_workers=2,
                                               timeout=240)
    assert len(outputs) == 2
    assert sorted(o.strip().splitlines()[-1][:12] for o in outputs) == [
        'worker 0/2: ', 'worker 1/2: ']
    # The scheduler, the server and the two workers ran, listened on the
    # loopback address only, and are gone.
    assert len(watcher.procs) >= 4
    assert watcher.listening, 'saw no listening socket'
    assert {ip for _, ip in watcher.listening} == {'127.0.0.1'}
    assert_no_process_left(watcher)

    records = [json.load(open(os.path.join(out_dir, f'worker{r}.json')))
               for r in range(2)]
    assert [(r['rank'], r['num_workers']) for r in records] == [(0, 2), (1, 2)]
    for r in records:
        assert len(r['losses']) == 3 and all(map(math.isfinite, r['losses']))
        assert r['img_per_sec'] > 0
    for name in ['net', 'head']:
        params = [npx.load(os.path.join(out_dir, f'{name}{r}.params'))
                  for r in range(2)]
        assert params[0].keys() == params[1].keys()
        trained = [k for k in params[0] if 'running_' not in k]
        assert trained
        for k in trained:  # batch-norm statistics stay per worker
            onp.testing.assert_array_equal(params[0][k].asnumpy(),
                                           params[1][k].asnumpy(), err_msg=k)


def test_launcher_reports_a_scheduler_that_cannot_bind():
    with socket.socket() as taken:  # someone else holds the port
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        with ChildWatcher() as watcher:
            with pytest.raises(RuntimeError, match='scheduler failed'):
                cluster.launch_local_cluster(
                    ['-c', 'import time; time.sleep(600)'], timeout=120,
                    env={'DMLC_PS_ROOT_PORT': port})
    assert_no_process_left(watcher)


# The job as the notebook runs it, started by a parent that then is killed:
# MXNet's scheduler and server, and workers that joined the store.
PARENT = ('''import sys; from d2l_face import cluster
cluster.launch_local_cluster(['-c', sys.argv[1]], timeout=600)''')
WORKER = ('''import time; from mxnet import kv
kv.create('dist_sync'); print('joined', flush=True); time.sleep(600)''')


def test_a_real_job_ends_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, '-c', PARENT, WORKER],
                              env=dict(os.environ, PYTHONPATH=REPO))
    procs = []
    try:
        deadline = time.monotonic() + 120
        # the watchdog; scheduler, server and two workers, each under its
        # reaper (d2l_face.orphans)
        while len(procs) < 9 and time.monotonic() < deadline:
            time.sleep(0.2)
            procs = psutil.Process(parent.pid).children(recursive=True)
        assert len(procs) == 9, procs
        time.sleep(3)  # let the store start and the workers join it
        parent.kill()
        parent.wait()
        gone, alive = psutil.wait_procs(procs, timeout=5)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        parent.kill()
        parent.wait()
        for p in procs:
            if p.is_running():
                p.kill()


# ------------------------------------------------------------------ workers

def tiny_worker_flips(data_dir, rank, seed=0, num_flips=32):
    """Set a worker up as train_face_worker does; return its initial
    parameters and the left-right flips its images would get next."""
    dataset = d2lf.worker_dataset(data_dir, 4, 2, rank, num_workers=2)
    net, head = d2lf.init_face_worker(4, 0.0625, [npx.cpu()], seed, rank)
    params = [p.data().asnumpy() for block in (net, head)
              for p in block.collect_params().values()]
    probe = onp.zeros((1, 2, 3), dtype='uint8')
    probe[0, 1] = 255  # a flip moves the bright pixel to the left
    flips = [bool(dataset.transform(np.array(probe))[0, 0, 0] > 0)
             for _ in range(num_flips)]
    order = list(onp.random.permutation(len(dataset)))
    return params, flips, order


def test_workers_start_alike_but_flip_and_shuffle_differently(tiny_data_dir):
    params0, flips0, order0 = tiny_worker_flips(tiny_data_dir, rank=0)
    params1, flips1, order1 = tiny_worker_flips(tiny_data_dir, rank=1)
    assert len(params0) == len(params1) > 2
    for p0, p1 in zip(params0, params1):
        onp.testing.assert_array_equal(p0, p1)
    assert flips0 != flips1 and order0 != order1
    assert 0 < sum(flips0) < len(flips0)  # the probe does see both cases
    # The same worker set up again draws the same: runs are reproducible.
    assert tiny_worker_flips(tiny_data_dir, rank=1)[1:] == (flips1, order1)


def test_worker_data_splits_the_first_classes_among_ranks(tiny_data_dir):
    parts = [d2lf.worker_dataset(tiny_data_dir, 3, 2, rank, 2).items
             for rank in range(2)]
    everything = [item for item in d2lf.FaceDataset(tiny_data_dir).items
                  if item[1] < 3]
    assert sorted(parts[0] + parts[1]) == sorted(everything)
    assert abs(len(parts[0]) - len(parts[1])) <= 1
    assert {label for _, label in parts[0]} == {0, 1, 2}


@pytest.mark.parametrize('kvstore', [None, 'local'])
def test_a_worker_without_one_batch_says_so_at_once(tiny_data_dir, tmp_path,
                                                    kvstore):
    with deadline(HANG), pytest.raises(
            ValueError, match=r'has 24 images .* batch size 64'):
        if kvstore is None:
            d2lf.worker_dataset(tiny_data_dir, 4, 64, rank=0, num_workers=1)
        else:
            d2lf.train_face_worker(tiny_data_dir, str(tmp_path), kvstore,
                                   num_classes=4, batch_size=64)
    assert not os.listdir(tmp_path)


def test_a_worker_needs_two_steps_to_measure_its_speed(tiny_data_dir,
                                                       tmp_path):
    with pytest.raises(ValueError, match='num_steps must be at least 2'):
        d2lf.train_face_worker(tiny_data_dir, str(tmp_path), 'local',
                               num_classes=4, batch_size=4, num_steps=1)
