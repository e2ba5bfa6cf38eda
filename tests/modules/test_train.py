"""The training program `python -m d2l_face.train`, run as a reader would.

Every run is a real process (`torchrun` or `python -m`) on the small
stand-in, in float64 with a narrow network, six steps of a global batch of
8 images and a checkpoint every 2 steps. Runs are stopped at a chosen point
with the program's test hook (D2L_FACE_TRAIN_STALL) and then killed with a
real SIGKILL, so what is killed when is fixed, not left to timing.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as onp
import psutil
import pytest
import torch

from synthetic import REPO, packless_copy
from d2l_face import onnxrun, publish
from d2l_face import torch as d2lf
from d2l_face import train

NUM_STEPS, EVERY = 6, 2
ARGS = ['--num-steps', str(NUM_STEPS), '--checkpoint-every', str(EVERY),
        '--batch-per-device', '4', '--embedding-size', '32', '--log-every',
        '2', '--eval-every', '100', '--dtype', 'float64']
TORCHRUN = os.path.join(os.path.dirname(sys.executable), 'torchrun')
TIMEOUT = 240  # seconds any one run may take on a busy 2-core machine
SEED = 20  # of the random steps the runs are killed at


@pytest.fixture(scope='module')
def data_dir(standin_root, tmp_path_factory):
    return packless_copy(standin_root, tmp_path_factory.mktemp('train_data'))


def command(data_dir, out, extra=(), ranks=1, launcher_args=()):
    """The program's command line: one process, or `ranks` under torchrun."""
    program = ['-m', 'd2l_face.train', '--data', data_dir, '--out', str(out),
               *ARGS, *extra]
    if ranks == 1:
        return [sys.executable, *program]
    return [TORCHRUN, '--standalone', f'--nproc_per_node={ranks}',
            '--monitor-interval=0.1', *launcher_args, *program]


STARTED = []  # the runs of the test under way


@pytest.fixture(autouse=True)
def end_runs():
    """Kill what a failed test left running (ranks die with torchrun)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start(cmd, out, stall=''):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1',
               D2L_FACE_TRAIN_STALL=stall, D2L_FACE_TRAIN_STALL_DIR=str(out))
    os.makedirs(out, exist_ok=True)
    STARTED.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
    return STARTED[-1]


def finish(proc):
    """Wait for a run; its output, after checking that it succeeded."""
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-3000:]
    return output


def run(cmd, out):
    return finish(start(cmd, out))


def wait_for_stall(out, rank=0):
    """The pid of the rank stopped by the test hook, once it is there."""
    marker = os.path.join(out, f'stalled-rank{rank}')
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(marker) or not open(marker).read():
        assert time.monotonic() < deadline, f'{marker} never appeared'
        time.sleep(0.2)
    return int(open(marker).read())


def kill_stalled(out, stall, cmd):
    """Start a run that stops at `stall`; SIGKILL it there (all of it)."""
    proc = start(cmd, out, stall)
    wait_for_stall(out)
    proc.kill()
    proc.communicate(timeout=TIMEOUT)


def final_params(out, world_size):
    """The backbone's parameters (not BN statistics) and the class weight."""
    folder = os.path.join(out, train.CHECKPOINTS)
    step, _ = train.read_manifest(folder)[-1]
    assert step == NUM_STEPS
    states = [torch.load(os.path.join(folder, train.checkpoint_name(
        step, rank, world_size)), weights_only=False)['trainer']
        for rank in range(world_size)]
    names = [name for name, _ in d2lf.face_resnet(18, 0.125, 32)
             .named_parameters()]
    params = {name: states[0]['net'][name] for name in names}
    params['class weight'] = torch.cat([s['shard']['weight'] for s in states])
    return params


def assert_same(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=tol), name


SAMPLED = ['--sample-rate', '0.5']  # partial FC: half of each shard


@pytest.fixture(scope='module')
def references(data_dir, tmp_path_factory):
    """Uninterrupted runs: 2 ranks (all classes, or half of them sampled),
    and 1 process of 2 micro-batches."""
    root = tmp_path_factory.mktemp('train_ref')
    outs = {name: root / name for name in ('two', 'two sampled', 'one')}
    run(command(data_dir, outs['two'], ranks=2), outs['two'])
    run(command(data_dir, outs['two sampled'], SAMPLED, ranks=2),
        outs['two sampled'])
    run(command(data_dir, outs['one'], ['--micro-batches', '2']), outs['one'])
    return outs


def test_two_ranks_equal_one_process(references):
    assert_same(final_params(references['two'], 2),
                final_params(references['one'], 1))


def test_partial_fc_trains_otherwise(references):
    sampled = final_params(references['two sampled'], 2)['class weight']
    full = final_params(references['two'], 2)['class weight']
    assert torch.isfinite(sampled).all()
    assert not torch.allclose(sampled, full, rtol=0, atol=1e-5)


def test_model_files_embed_alike(references):
    net = d2lf.face_resnet(18, 0.125, 32)
    net.load_state_dict(torch.load(references['two'] / 'model.pt',
                                   weights_only=True))
    onnx_model = onnxrun.EmbeddingModel(str(references['two'] / 'model.onnx'))
    faces = onp.random.default_rng(0).integers(0, 256, (2, 3, 112, 112),
                                              dtype=onp.uint8)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(faces).float() / 255).numpy()
    assert onp.allclose(onnx_model.embed(faces), expected, atol=1e-4)


def test_sigkill_at_random_step_then_resume(data_dir, references, tmp_path):
    step = random.Random(SEED).randint(EVERY + 1, NUM_STEPS)
    cmd = command(data_dir, tmp_path, ['--micro-batches', '2'])
    kill_stalled(tmp_path, f'step:{step}', cmd)
    assert not (tmp_path / 'model.pt').exists()
    output = run(cmd, tmp_path)
    resumed = (step - 1) // EVERY * EVERY
    assert f'resuming after step {resumed}' in output
    assert_same(final_params(tmp_path, 1), final_params(references['one'], 1))


def test_kill_during_checkpoint_write(data_dir, references, tmp_path):
    cmd = command(data_dir, tmp_path, ['--micro-batches', '2'])
    kill_stalled(tmp_path, f'checkpoint:{2 * EVERY}', cmd)
    folder = tmp_path / train.CHECKPOINTS
    assert [s for s, _ in train.read_manifest(folder)] == [EVERY]
    assert any(publish.parse(name) for name in os.listdir(folder))  # cut short
    output = run(cmd, tmp_path)
    assert f'resuming after step {EVERY}' in output
    assert not any(publish.parse(name) for name in os.listdir(folder))
    assert_same(final_params(tmp_path, 1), final_params(references['one'], 1))


def test_damaged_checkpoint_is_skipped(data_dir, references, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(references['one'], out)
    newest = out / train.CHECKPOINTS / train.checkpoint_name(NUM_STEPS, 0, 1)
    with open(newest, 'r+b') as f:  # as a disk that lost the end of it
        f.truncate(os.path.getsize(newest) // 2)
    output = run(command(data_dir, out, ['--micro-batches', '2']), out)
    assert f'checkpoint of step {NUM_STEPS} is damaged' in output
    assert f'resuming after step {NUM_STEPS - EVERY}' in output
    assert_same(final_params(out, 1), final_params(references['one'], 1))


def test_max_restarts_replaces_a_killed_rank(data_dir, references, tmp_path):
    # With partial FC, whose samples must come out the same after a restart.
    step = random.Random(SEED + 1).randint(EVERY + 1, NUM_STEPS)
    proc = start(command(data_dir, tmp_path, SAMPLED, ranks=2,
                         launcher_args=['--max-restarts=1']), tmp_path,
                 stall=f'rank1@step:{step}')
    os.kill(wait_for_stall(tmp_path, rank=1), signal.SIGKILL)
    output = finish(proc)  # the same command goes on to the end
    assert 'resuming after step' in output
    assert_same(final_params(tmp_path, 2),
                final_params(references['two sampled'], 2))


def test_nothing_outlives_a_killed_torchrun(data_dir, tmp_path):
    proc = start(command(data_dir, tmp_path, ranks=2), tmp_path,
                 stall='rank0@step:2')
    wait_for_stall(tmp_path)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len(ranks) >= 2
    proc.kill()  # torchrun itself, with no chance to stop its ranks
    proc.communicate(timeout=TIMEOUT)
    _, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive


def test_bad_value_under_torchrun_stops_before_training(data_dir, tmp_path):
    out = tmp_path / 'out'
    proc = start(command(data_dir, out, ['--wd', '-0.1'], ranks=2), tmp_path)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    assert 'wd must not be negative' in output
    assert not out.exists()


def test_divergence_stops_the_run_and_names_the_step(data_dir, tmp_path):
    out = tmp_path / 'out'
    proc = start(command(data_dir, out, ['--lr', '1e300']), tmp_path)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    assert 'TrainingDiverged' in output and 'diverged at step' in output
    assert not (out / 'model.pt').exists()


def test_sample_classes_keeps_the_batch_classes():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, -2, 17, 3, 40, 9])  # -2, 40: other shards
    rows, local = train.sample_classes(labels, 20, 0.25, generator)
    assert len(rows) == 5 and rows.tolist() == sorted(rows.tolist())
    assert {3, 9, 17} <= set(rows.tolist())
    assert local.tolist()[1] == local.tolist()[4] == -1
    for label, row in zip(labels.tolist(), local.tolist()):
        if row >= 0:
            assert rows[row] == label
    # More classes in the batch than the rate allows: all of them, no more.
    rows, _ = train.sample_classes(torch.arange(8), 10, 0.1, generator)
    assert rows.tolist() == list(range(8))
    rows, local = train.sample_classes(labels, 20, 1.0, generator)
    assert rows is None and local.tolist() == [3, -1, 17, 3, -1, 9]
