"""Figure 4: training throughput of the chapter's CPU configuration, images/s.

One step is forward, backward and update of d2lf.face_resnet(...) with
d2lf.MarginLogits(...) (ArcFace margin) under softmax cross-entropy and SGD,
on a fixed batch of stand-in faces from the project's loader, waited for
with npx.waitall(). The configuration is the one section 3 uses on a CPU,
read from its code (see chapter_config); there is no baseline or target,
the figure is reported for reference.
"""
import argparse
import inspect
import os
import re
import types

import _common
from _common import emit, median, rates, round_robin, spread

import mxnet as mx
from mxnet import autograd, gluon, init, npx

from d2l_face import mxnet as d2lf

npx.set_np()

# Used when the chapter's training section does not define a configuration.
FALLBACK = dict(depth=18, width=0.25, embedding_size=128, batch_size=64,
                hybridize=True, s=64.0, m1=1.0, m2=0.5, m3=0.0, lr=0.1,
                momentum=0.9, wd=5e-4)
TRAINING_MD = os.path.join(_common.REPO, 'chapter_face_recognition',
                           'training.md')


def chapter_config():
    """Return (config, where it came from), asking the chapter's code.

    Section 3 (training.md) chooses its configuration in a cell that tests
    d2l.num_gpus(); we run that cell as if there were no GPU. Momentum and
    weight decay are the defaults of d2lf.train_face_rec."""
    try:
        with open(TRAINING_MD) as f:
            cells = re.findall(r'```\{\.python \.input\}\n(.*?)```', f.read(),
                               re.S)
        cell = next(c for c in cells if 'num_gpus()' in c and 'width' in c)
        no_gpu = types.SimpleNamespace(num_gpus=lambda: 0,
                                       try_all_gpus=lambda: [mx.cpu()])
        names = {'d2l': no_gpu, 'd2lf': d2lf, 'print': lambda *a, **k: None,
                 'all_devices': lambda: [mx.cpu()]}
        exec(cell, names)
        defaults = inspect.signature(d2lf.train_face_rec).parameters
        cfg = {k: names[k] for k in ('depth', 'width', 'embedding_size',
                                     'batch_size', 'lr', 's', 'm1', 'm2',
                                     'm3')}
        cfg.update(hybridize='.hybridize()' in ''.join(cells),
                   momentum=defaults['momentum'].default,
                   wd=defaults['wd'].default)
        where = 'training.md (CPU branch)'
    except Exception as e:  # no such section or cell (yet)
        cfg, where = dict(FALLBACK), f'fallback ({type(e).__name__}: {e})'
    return cfg, (f'{where}: depth {cfg["depth"]}, width {cfg["width"]}, '
                 f'embedding {cfg["embedding_size"]}, batch '
                 f'{cfg["batch_size"]}, s {cfg["s"]}, margins '
                 f'({cfg["m1"]}, {cfg["m2"]}, {cfg["m3"]}), '
                 f'{"hybridized" if cfg["hybridize"] else "imperative"}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--steps', type=int, default=8,
                        help='training steps per timed run')
    args = parser.parse_args()
    cfg, where = chapter_config()
    data_dir = _common.dataset_dir()
    _, num_classes = d2lf.read_facerec_meta(data_dir)
    train_iter, _ = d2lf.load_data_face_rec(data_dir, (), cfg['batch_size'])
    X, y = next(iter(train_iter))
    X = X.copy()  # keep the batch; the loader may reuse its memory

    net = d2lf.face_resnet(cfg['depth'], cfg['width'], cfg['embedding_size'])
    head = d2lf.MarginLogits(num_classes, cfg['embedding_size'], cfg['s'],
                             cfg['m1'], cfg['m2'], cfg['m3'])
    net.initialize(init.Xavier())
    head.initialize()
    if cfg['hybridize']:
        net.hybridize()
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    params = dict(net.collect_params())
    params.update(head.collect_params())
    trainer = gluon.Trainer(params, 'sgd', {
        'learning_rate': cfg['lr'], 'momentum': cfg['momentum'],
        'wd': cfg['wd']})
    print(f'configuration from {where}; {num_classes} classes; '
          f'{args.steps} steps per run, {args.repeats} rounds; '
          f'load {_common.load()}')

    def train_steps():
        for _ in range(args.steps):
            with autograd.record():
                l = loss(head(net(X), y), y)
            l.backward()
            trainer.step(X.shape[0])
        npx.waitall()
        return args.steps * X.shape[0]

    runs = round_robin({'train': train_steps}, repeats=args.repeats)
    speed = median(rates(runs['train']))
    print(f'  forward+backward+update            '
          f'{spread(rates(runs["train"]))} images/s')
    print(f'  load after: {_common.load()}')
    emit(figure='4. training (images/s)', value=speed, unit='img/s',
         baselines={}, ratio='-', target='(reported)', met=None,
         config=where)


if __name__ == '__main__':
    main()
