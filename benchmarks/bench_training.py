"""Figure 4: training speed of the chapter's CPU configuration, both tabs.

One step is `train_face_step`, the training step of the training section: forward,
backward and update of `face_resnet(...)` with `MarginLogits(...)` under
softmax cross-entropy and SGD (`facerec_trainer`), on a batch of stand-in
faces from the project's loader that is already in memory; MXNet's runs
are waited for with npx.waitall(). The configuration is CPU_CONFIG, the one
the training section trains with on a CPU, shared by both tabs. The two tabs' steps
are reported side by side. For PyTorch we also time the whole training
loop, `train_facerec` over the same number of steps (the loader decoding
and flipping batches, the step, the loss and accuracy records and status
lines, no plot and no verification set), and report its speed over that
of the step alone on the batch in memory: the share of the step's speed
that the loop keeps. Target: at least 0.9.
"""
import argparse
import contextlib
import io
import os

import _common
from _common import emit, median, paired_ratio, rates, round_robin, spread

from mxnet import gluon, init, npx
import torch
from torch import nn

from d2l_face import mxnet as d2lf_mx
from d2l_face import torch as d2lf

npx.set_np()
# Importing MXNet leaves PyTorch one OpenMP thread; give it every core.
torch.set_num_threads(len(os.sched_getaffinity(0)))
TARGET = 0.9


def describe(cfg):
    """The configuration in one line."""
    return (f'CPU_CONFIG: depth {cfg["depth"]}, width {cfg["width"]}, '
            f'embedding {cfg["embedding_size"]}, batch '
            f'{cfg["batch_per_device"]}, s {cfg["s"]}, {cfg["margin"]} '
            f'margin {d2lf.MARGIN_SETTINGS[cfg["margin"]]}')


def mxnet_steps(cfg, num_classes, data_dir, num_steps):
    """A case: num_steps MXNet training steps on one batch in memory."""
    devices = [npx.cpu()]
    train_iter, _ = d2lf_mx.load_data_facerec(data_dir, (),
                                              cfg['batch_per_device'])
    X, y = next(iter(train_iter))
    X = X.copy()  # keep the batch; the loader may reuse its memory
    net = d2lf_mx.face_resnet(cfg['depth'], cfg['width'],
                              cfg['embedding_size'])
    margin = d2lf_mx.MarginLogits(num_classes, cfg['embedding_size'],
                                  cfg['s'], *d2lf.MARGIN_SETTINGS[
                                      cfg['margin']])
    net.initialize(init.Xavier(), ctx=devices)
    margin.initialize(ctx=devices)
    net.hybridize()  # as the training section does
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = d2lf_mx.facerec_trainer(net, margin, 10 ** 6, cfg['lr'],
                                      cfg['wd'], cfg['momentum'])

    def run():
        for _ in range(num_steps):
            d2lf_mx.train_face_step(net, margin, loss, trainer, X, y,
                                    devices)
        npx.waitall()
        return num_steps * X.shape[0]
    return run


def pytorch_cases(cfg, num_classes, data_dir, num_steps):
    """Two cases: PyTorch's step on a batch in memory, and its whole loop."""
    devices = [torch.device('cpu')]
    train_iter, _ = d2lf.load_data_facerec(data_dir, (),
                                           cfg['batch_per_device'])
    X, y = next(iter(train_iter))
    X, y = X.clone(), y.clone()  # the loader may reuse its memory
    torch.manual_seed(0)
    net = d2lf.face_resnet(cfg['depth'], cfg['width'], cfg['embedding_size'])
    margin = d2lf.MarginLogits(num_classes, cfg['embedding_size'], cfg['s'],
                               *d2lf.MARGIN_SETTINGS[cfg['margin']])
    loss = nn.CrossEntropyLoss(reduction='none')
    optimizer = d2lf.facerec_trainer(net, margin, 10 ** 6, cfg['lr'],
                                     cfg['wd'], cfg['momentum'])

    def step():
        for _ in range(num_steps):
            d2lf.train_face_step(net, margin, loss, optimizer, X, y, devices)
        return num_steps * X.shape[0]

    def loop():
        with contextlib.redirect_stdout(io.StringIO()):  # its status line
            d2lf.train_facerec(net, margin, train_iter, {}, num_steps,
                               cfg['lr'], cfg['wd'], cfg['momentum'],
                               warmup_steps=0, devices=devices, plot=False)
        return num_steps * cfg['batch_per_device']
    return step, loop


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--steps', type=int, default=10,
                        help='training steps per timed run')
    args = parser.parse_args()
    cfg = d2lf.CPU_CONFIG
    data_dir = _common.dataset_dir()
    _, num_classes = d2lf.read_facerec_meta(data_dir)
    torch_step, torch_loop = pytorch_cases(cfg, num_classes, data_dir,
                                           args.steps)
    cases = {'MXNet step': mxnet_steps(cfg, num_classes, data_dir,
                                       args.steps),
             'PyTorch step': torch_step, 'PyTorch loop': torch_loop}
    print(f'configuration {describe(cfg)}; {num_classes} classes; '
          f'{args.steps} steps per run, {args.repeats} rounds; PyTorch '
          f'{torch.__version__} on {torch.get_num_threads()} threads; '
          f'load {_common.load()}')
    runs = round_robin(cases, repeats=args.repeats)
    for name, label in [
            ('MXNet step', 'MXNet   train_face_step, batch in memory'),
            ('PyTorch step', 'PyTorch train_face_step, batch in memory'),
            ('PyTorch loop', 'PyTorch train_facerec (loader, step, records)')]:
        print(f'  {label:<46} {spread(rates(runs[name]))} images/s')
    ratio = paired_ratio(rates(runs['PyTorch loop']),
                         rates(runs['PyTorch step']))
    versus = paired_ratio(rates(runs['PyTorch step']),
                          rates(runs['MXNet step']))
    print(f'  PyTorch step / MXNet step: {versus:.2f}')
    print(f'  PyTorch loop / step: {ratio:.2f} (target at least {TARGET})')
    print(f'  load after: {_common.load()}')
    emit(figure='4. training (PyTorch step, images/s)',
         value=median(rates(runs['PyTorch step'])), unit='img/s',
         baselines={'MXNet step': median(rates(runs['MXNet step'])),
                    'PyTorch loop': median(rates(runs['PyTorch loop']))},
         ratio=f'loop/step {ratio:.2f}', target=f'>= {TARGET}',
         met=bool(ratio >= TARGET), config=describe(cfg))


if __name__ == '__main__':
    main()
