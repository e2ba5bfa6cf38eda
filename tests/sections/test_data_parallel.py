"""Section `data_parallel`: data parallel jobs of several processes, on
MXNet's dist_sync key-value store and on torch.distributed (Gloo).

A test that takes `d2lf` holds for both tabs; the others test one tab."""
import datetime
import inspect
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as onp
import psutil
import pytest
import torch
from mxnet import npx
from mxnet import np as mxnp

from d2l_face import cluster
from d2l_face import mxnet as d2lf_mx
from d2l_face import standin
from d2l_face import torch as d2lf_torch
from synthetic import HANG, REPO, alive, assert_close, deadline, end_all

npx.set_np()


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('standin')
    return standin.generate(str(root), num_classes=4, images_per_class=6,
                            num_val_pairs=2, num_wild=0)


# ------------------------------------------------------- the MXNet tab alone

class ChildWatcher(threading.Thread):
    """Record the descendants this process starts while the watcher runs,
    and their listening sockets."""
    def __init__(self):
        super().__init__(daemon=True)
        self.procs, self.listening = {}, set()
        self.done = threading.Event()
        # Started before, by an earlier test in this worker (multiprocessing's
        # resource tracker, say): not the job's.
        self.before = set(psutil.Process().children(recursive=True))

    def run(self):
        me = psutil.Process()
        while not self.done.is_set():
            for p in set(me.children(recursive=True)) - self.before:
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
    running = [p for p in watcher.procs.values() if p.is_running()
               and p.status() != psutil.STATUS_ZOMBIE]
    assert not running, f'still running: {running}'
    left = set(psutil.Process().children(recursive=True)) - watcher.before
    assert not left, f'still running: {left}'


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
MX_PARENT = ('''import sys; from d2l_face import cluster
cluster.launch_local_cluster(['-c', sys.argv[1]], timeout=600)''')


WORKER = ('''import time; from mxnet import kv
kv.create('dist_sync'); print('joined', flush=True); time.sleep(600)''')


def test_a_real_job_ends_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, '-c', MX_PARENT, WORKER],
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
        psutil.wait_procs(procs, timeout=5)
        assert not alive(procs)
    finally:
        parent.kill()
        parent.wait()
        end_all(procs)


def tiny_worker_flips(data_dir, rank, seed=0, num_flips=32):
    """Set a worker up as train_face_worker does; return its initial
    parameters and the left-right flips its images would get next."""
    dataset = d2lf_mx.worker_dataset(data_dir, 4, 2, rank, num_workers=2)
    net, head = d2lf_mx.init_face_worker(4, 0.0625, [npx.cpu()], seed, rank)
    params = [p.data().asnumpy() for block in (net, head)
              for p in block.collect_params().values()]
    probe = onp.zeros((1, 2, 3), dtype='uint8')
    probe[0, 1] = 255  # a flip moves the bright pixel to the left
    flips = [bool(dataset.transform(mxnp.array(probe))[0, 0, 0] > 0)
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
    parts = [d2lf_mx.worker_dataset(tiny_data_dir, 3, 2, rank, 2).items
             for rank in range(2)]
    everything = [item for item in d2lf_mx.FaceDataset(tiny_data_dir).items
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
            d2lf_mx.worker_dataset(tiny_data_dir, 4, 64, rank=0, num_workers=1)
        else:
            d2lf_mx.train_face_worker(tiny_data_dir, str(tmp_path), kvstore,
                                   num_classes=4, batch_size=64)
    assert not os.listdir(tmp_path)


def test_a_worker_needs_two_steps_to_measure_its_speed(tiny_data_dir,
                                                       tmp_path):
    with pytest.raises(ValueError, match='num_steps must be at least 2'):
        d2lf_mx.train_face_worker(tiny_data_dir, str(tmp_path), 'local',
                               num_classes=4, batch_size=4, num_steps=1)


# ----------------------------------------------------- the PyTorch tab alone

def test_sample_facerec_batches_are_alike_for_a_seed(tiny_data_dir):
    a, b, c = (d2lf_torch.sample_facerec_batches(tiny_data_dir, 3, 4,
                                                 num_steps=7, seed=seed)
               for seed in (1, 1, 2))
    assert len(a) == 7  # 18 images: 4 batches a pass, so a second pass
    for (Xa, ya), (Xb, yb) in zip(a, b):
        assert Xa.shape == (4, 3, 112, 112) and Xa.dtype == torch.float32
        assert 0 <= float(Xa.min()) and float(Xa.max()) <= 1
        assert torch.equal(Xa, Xb) and torch.equal(ya, yb)
        assert set(ya.tolist()) <= {0, 1, 2}
    assert any(not torch.equal(Xa, Xc) for (Xa, _), (Xc, _) in zip(a, c))


def test_sample_facerec_batches_flip_some_images(tiny_data_dir):
    items = d2lf_torch.list_facerec_images(tiny_data_dir, 1)
    originals = torch.stack([torch.from_numpy(onp.ascontiguousarray(
        d2lf_torch.read_face_image(p))).permute(2, 0, 1).float() / 255
        for p, _ in items])
    (X, y), = d2lf_torch.sample_facerec_batches(tiny_data_dir, 1, len(items),
                                                1, seed=0)
    flipped = 0
    for image in X:  # each image is an original, flipped or not
        same = (originals == image).flatten(1).all(dim=1)
        mirrored = (originals.flip(3) == image).flatten(1).all(dim=1)
        assert same.any() or mirrored.any()
        flipped += int(mirrored.any() and not same.any())
    assert 0 < flipped < len(X)


def test_sample_facerec_batches_refuse_fewer_images_than_a_batch(
        tiny_data_dir):
    with pytest.raises(ValueError, match=r'has 12 images .* batch size 13'):
        d2lf_torch.sample_facerec_batches(tiny_data_dir, 2, 13, num_steps=1)


def test_train_on_parts_needs_equal_parts(tiny_data_dir):
    batches = d2lf_torch.sample_facerec_batches(tiny_data_dir, 4, 6,
                                                num_steps=1)
    net, head = d2lf_torch.init_face_model(4, 0.125, seed=0)
    with pytest.raises(ValueError, match='does not cut into 4 equal parts'):
        d2lf_torch.train_on_parts(net, head, batches, [0], num_parts=4)


def launched(code, nproc):
    """Run `code` in `nproc` torchrun-style ranks; check nothing is left."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    outputs = cluster.launch_local_torchrun(['-c', code], nproc, timeout=300)
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before]
    assert not left, f'processes left running: {left}'
    return outputs


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
    states = [d2lf_torch.load_tensors(os.path.join(out_dir, f'rank{r}.pt'))
              for r in range(2)]

    # The same training in this process (one thread: as fast as a rank).
    net, head = (m.double()
                 for m in d2lf_torch.init_face_model(4, 0.125, seed=0))
    batches = d2lf_torch.sample_facerec_batches(tiny_data_dir, 4, 2 * part,
                                                steps, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = d2lf_torch.train_on_parts(net, head, batches, [0, 1], 2)
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
    start, _ = d2lf_torch.init_face_model(4, 0.125, seed=0)
    assert any(not torch.equal(value, states[0]['net'][key])
               for key, value in start.state_dict().items())


# A parent that starts two ranks which join a process group, then is killed.
TORCH_PARENT = ('''import sys; from d2l_face import cluster
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
    parent = subprocess.Popen([sys.executable, '-c', TORCH_PARENT, RANK],
                              env=env)
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
        psutil.wait_procs(procs, timeout=10)
        assert not alive(procs)
    finally:
        parent.kill()
        parent.wait()
        end_all(procs)


def test_every_rank_sets_a_timeout_shorter_than_gloos_default():
    assert datetime.timedelta(0) < d2lf_torch.DIST_TIMEOUT \
        < datetime.timedelta(minutes=30)
    source = inspect.getsource(d2lf_torch)
    calls = re.findall(r'dist\.init_process_group\(([^)]*)\)', source)
    assert calls and all('timeout=DIST_TIMEOUT' in c for c in calls), calls
