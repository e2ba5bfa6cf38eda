"""Figure 4: training throughput of the chapter's CPU configuration, images/s.

One step is d2lf.train_face_step, the training step of section 3: forward,
backward and update of d2lf.face_resnet(...) with d2lf.MarginLogits(...)
under softmax cross-entropy and SGD (d2lf.facerec_trainer), on a fixed batch
of stand-in faces from the project's loader, waited for with npx.waitall().
The configuration is d2lf.CPU_CONFIG, the one section 3 trains with on a
CPU; there is no baseline or target, the figure is reported for reference.
"""
import argparse

import _common
from _common import emit, median, rates, round_robin, spread

from mxnet import gluon, init, npx

from d2l_face import mxnet as d2lf

npx.set_np()


def describe(cfg):
    """The configuration in one line."""
    return (f'd2lf.CPU_CONFIG: depth {cfg["depth"]}, width {cfg["width"]}, '
            f'embedding {cfg["embedding_size"]}, batch '
            f'{cfg["batch_per_device"]}, s {cfg["s"]}, {cfg["margin"]} '
            f'margin {d2lf.MARGIN_SETTINGS[cfg["margin"]]}, hybridized')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--steps', type=int, default=8,
                        help='training steps per timed run')
    args = parser.parse_args()
    cfg, devices = d2lf.CPU_CONFIG, [npx.cpu()]
    data_dir = _common.dataset_dir()
    _, num_classes = d2lf.read_facerec_meta(data_dir)
    train_iter, _ = d2lf.load_data_facerec(data_dir, (),
                                           cfg['batch_per_device'])
    X, y = next(iter(train_iter))
    X = X.copy()  # keep the batch; the loader may reuse its memory

    net = d2lf.face_resnet(cfg['depth'], cfg['width'], cfg['embedding_size'])
    margin = d2lf.MarginLogits(num_classes, cfg['embedding_size'], cfg['s'],
                               *d2lf.MARGIN_SETTINGS[cfg['margin']])
    net.initialize(init.Xavier(), ctx=devices)
    margin.initialize(ctx=devices)
    net.hybridize()  # as section 3 does
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    # the schedule spans every step we time, and the warm-up round before
    num_steps = (args.repeats + 1) * args.steps
    trainer = d2lf.facerec_trainer(net, margin, num_steps, cfg['lr'],
                                   cfg['wd'], cfg['momentum'],
                                   min(cfg['warmup_steps'], num_steps - 1))
    print(f'configuration {describe(cfg)}; {num_classes} classes; '
          f'{args.steps} steps per run, {args.repeats} rounds; '
          f'load {_common.load()}')

    def train_steps():
        for _ in range(args.steps):
            d2lf.train_face_step(net, margin, loss, trainer, X, y, devices)
        npx.waitall()
        return args.steps * X.shape[0]

    runs = round_robin({'train': train_steps}, repeats=args.repeats)
    speed = median(rates(runs['train']))
    print(f'  d2lf.train_face_step              '
          f'{spread(rates(runs["train"]))} images/s')
    print(f'  load after: {_common.load()}')
    emit(figure='4. training (images/s)', value=speed, unit='img/s',
         baselines={}, ratio='-', target='(reported)', met=None,
         config=describe(cfg))


if __name__ == '__main__':
    main()
