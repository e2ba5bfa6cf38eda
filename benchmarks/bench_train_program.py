"""Figure 5: the training program's speed, against the notebook's loop.

`python -m d2l_face.train --preset cpu` trains on the stand-in with the
chapter's CPU_CONFIG. Its speed line gives the images per second of its
training steps over the last `log_every` steps (waiting for the loader
included, checkpoints and evaluation not). We run it for 2 * steps steps
and take the second line, the first holding the warm-up: in one process,
and under `torchrun` in two processes of `batch_per_device` images each
(so twice the global batch). The baseline is `train_facerec`, the
notebook's loop, on the same configuration in this process, timed over
`steps` steps after a warm-up run. Every process computes with one thread,
as torchrun sets it for each rank (on a shared machine, more threads than
free cores slow PyTorch down many times over). The three cases take turns,
round by round. Target: the program in one process at least 0.9 of the
notebook's loop. Two processes against one is reported as measured; on two
cores shared with other work it shows less than the speed-up of two
devices.
"""
import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import _common
from _common import REPO, emit, median, spread

import torch

from d2l_face import torch as d2lf

TARGET = 0.9
SPEED = re.compile(r'step (\d+)/\d+: .*?, ([0-9.]+) images/s')


def notebook_loop(cfg, data_dir, num_steps):
    """A case: images/s of train_facerec over num_steps (after a warm-up)."""
    train_iter, _ = d2lf.load_data_facerec(data_dir, (),
                                           cfg['batch_per_device'])
    torch.manual_seed(0)
    net = d2lf.face_resnet(cfg['depth'], cfg['width'], cfg['embedding_size'])
    margin = d2lf.MarginLogits(train_iter.num_classes, cfg['embedding_size'],
                               cfg['s'], *d2lf.MARGIN_SETTINGS[cfg['margin']])

    def run():
        tic = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its status line
            d2lf.train_facerec(net, margin, train_iter, {}, num_steps,
                               cfg['lr'], cfg['wd'], cfg['momentum'],
                               devices=[torch.device('cpu')], plot=False)
        return num_steps * cfg['batch_per_device'] / (
            time.perf_counter() - tic)
    run()  # warm-up
    return run


def program(data_dir, num_steps, nproc):
    """A case: the program's second speed line, in nproc processes."""
    bin_dir = os.path.dirname(sys.executable)
    launcher = ([os.path.join(bin_dir, 'torchrun'), '--standalone',
                 f'--nproc_per_node={nproc}'] if nproc > 1
                else [sys.executable])

    def run():
        out = tempfile.mkdtemp(prefix='bench-train-')
        try:
            output = subprocess.run(
                launcher + ['-m', 'd2l_face.train', '--preset', 'cpu',
                            '--data', data_dir, '--out', out, '--num-steps',
                            str(2 * num_steps), '--log-every', str(num_steps),
                            '--eval-every', str(10 ** 6),
                            '--checkpoint-every', str(10 ** 6)],
                cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO,
                                   OMP_NUM_THREADS='1'),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                check=True).stdout
        finally:
            shutil.rmtree(out, ignore_errors=True)
        speeds = {int(step): float(speed)
                  for step, speed in SPEED.findall(output)}
        return speeds[2 * num_steps]
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--steps', type=int, default=10,
                        help='training steps per timed run')
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each process of the program computes
    cfg, data_dir = d2lf.CPU_CONFIG, _common.dataset_dir()
    cases = {'notebook loop': notebook_loop(cfg, data_dir, args.steps),
             'program, 1 process': program(data_dir, args.steps, 1),
             'program, 2 processes': program(data_dir, args.steps, 2)}
    print(f'CPU_CONFIG, batch {cfg["batch_per_device"]} per process; '
          f'{args.steps} timed steps per run, {args.repeats} rounds; '
          f'PyTorch {torch.__version__} on {torch.get_num_threads()} '
          f'threads; load {_common.load()}')
    speeds, names = {name: [] for name in cases}, list(cases)
    for r in range(args.repeats):  # each round starts with another case
        for name in names[r % len(names):] + names[:r % len(names)]:
            speeds[name].append(cases[name]())
    for name in names:
        print(f'  {name:<22} {spread(speeds[name])} images/s')
    ratio = median([p / n for p, n in zip(speeds['program, 1 process'],
                                          speeds['notebook loop'])])
    two = median([t / o for t, o in zip(speeds['program, 2 processes'],
                                        speeds['program, 1 process'])])
    print(f'  program / notebook loop: {ratio:.2f} (target at least '
          f'{TARGET})')
    print(f'  2 processes / 1 process: {two:.2f}')
    print(f'  load after: {_common.load()}')
    emit(figure='5. training program (1 process, images/s)',
         value=median(speeds['program, 1 process']), unit='img/s',
         baselines={'notebook loop': median(speeds['notebook loop']),
                    '2 processes': median(speeds['program, 2 processes'])},
         ratio=f'program/loop {ratio:.2f}; 2p/1p {two:.2f}',
         target=f'>= {TARGET}', met=bool(ratio >= TARGET))


if __name__ == '__main__':
    main()
