"""Tuning table of the training section: margin settings for the CPU network, accuracy.

Each setting trains the network of d2lf.CPU_CONFIG with d2lf.train_facerec
for --steps steps (300 by default, a few more than the training section trains) from each
seed in --seeds (0 by default), with CPU_CONFIG's learning rate, warm-up and
other settings unless the row changes them, on the stand-in data. For each
setting it prints the 10-fold verification accuracy on the stand-in's
lfw_small after the last step, and the training accuracy (on the margin
logits) over the last tenth of the steps; with several seeds, their mean
and standard deviation. The training section's "A Network and a Margin for
the CPU" draws its three lessons from this table. Every row is a training run, so
the whole table takes a while on a CPU; --rows picks some of them.

    python benchmarks/bench_tuning.py
    python benchmarks/bench_tuning.py --rows arcface-s16 softmax-s16 \\
        --seeds 0 1 2
"""
import argparse
import contextlib
import io
import time

import _common
from _common import emit

import numpy as onp
from mxnet import init, npx

from d2l_face import mxnet as d2lf

npx.set_np()

SETTINGS = {  # row name: what it changes in d2lf.CPU_CONFIG
    'arcface-s32-no-warmup': dict(s=32.0, warmup_steps=0),
    'arcface-s32-lr0.2': dict(s=32.0, lr=0.2),
    'arcface-s64': dict(s=64.0),
    'arcface-s32': dict(s=32.0),
    'arcface-s24': dict(s=24.0),
    'arcface-s16': dict(s=16.0),
    'cosface-s32': dict(margin='cosface', s=32.0),
    'combined-s32': dict(margin='combined', s=32.0),
    'softmax-s16': dict(margin='softmax', s=16.0),
}


def train(cfg, num_steps, seed, data_dir):
    """Train one setting from one seed: (lfw_small accuracy, train acc)."""
    d2lf.set_seeds(seed)  # in the order the training section draws its random numbers
    train_iter, verification_sets = d2lf.load_data_facerec(
        data_dir, ['lfw_small'], cfg['batch_per_device'])
    net = d2lf.face_resnet(cfg['depth'], cfg['width'], cfg['embedding_size'])
    net.initialize(init.Xavier())
    net.hybridize()
    margin = d2lf.MarginLogits(d2lf.read_facerec_meta(data_dir)[1],
                               cfg['embedding_size'], cfg['s'],
                               *d2lf.MARGIN_SETTINGS[cfg['margin']])
    margin.initialize()
    with contextlib.redirect_stdout(io.StringIO()):  # its status lines
        history = d2lf.train_facerec(
            net, margin, train_iter, verification_sets, num_steps, cfg['lr'],
            wd=cfg['wd'], momentum=cfg['momentum'],
            warmup_steps=min(cfg['warmup_steps'], num_steps - 1),
            eval_every=num_steps, log_every=max(1, num_steps // 10),
            devices=[npx.cpu()], plot=False)
    return history['lfw_small'][-1][1], history['train acc'][-1][1]


def summary(values):
    """'mean' for one value, 'mean +- std' for several."""
    if len(values) == 1:
        return f'{values[0]:.3f}'
    return f'{onp.mean(values):.3f} +- {onp.std(values):.3f}'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--rows', nargs='+', default=list(SETTINGS),
                        choices=list(SETTINGS))
    parser.add_argument('--repeats', type=int, default=None,
                        help='ignored (run_all.py passes it to every script)')
    args = parser.parse_args()
    data_dir = _common.dataset_dir()
    print(f'{len(args.rows)} settings x {len(args.seeds)} seed(s), '
          f'{args.steps} steps each, on {data_dir}; load {_common.load()}')
    header = (f'{"setting":24s} {"(m1, m2, m3)":16s} {"s":>5s} {"lr":>5s} '
              f'{"warm-up":>7s}  {"lfw_small acc":>15s}  {"train acc":>15s}')
    print(header)
    results = {}
    for row in args.rows:
        cfg = dict(d2lf.CPU_CONFIG, **SETTINGS[row])
        start = time.time()
        runs = [train(cfg, args.steps, seed, data_dir) for seed in args.seeds]
        accuracies, train_accs = zip(*runs)
        results[row] = float(onp.mean(accuracies))
        margins = str(d2lf.MARGIN_SETTINGS[cfg['margin']])
        print(f'{row:24s} {margins:16s} {cfg["s"]:5.0f} {cfg["lr"]:5.2f} '
              f'{min(cfg["warmup_steps"], args.steps - 1):7d}  '
              f'{summary(accuracies):>15s}  {summary(train_accs):>15s}  '
              f'({time.time() - start:.0f} s)', flush=True)
    chosen = next((row for row in args.rows
                   if SETTINGS[row] == dict(s=d2lf.CPU_CONFIG['s'])), None)
    emit(figure='5. tuning (lfw_small accuracy)',
         value=results.get(chosen), unit='',
         baselines={row: acc for row, acc in results.items()
                    if row != chosen},
         ratio='-', target='(reported)', met=None,
         config=f'{args.steps} steps, seeds {args.seeds}')


if __name__ == '__main__':
    main()
