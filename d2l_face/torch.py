"""Code saved from the Face Recognition chapter (PyTorch).

Everything below the WARNING line is written by ``make lib`` (``d2lbook build
lib``) from the cells marked ``#@save`` in ``chapter_face_recognition/*.md``
that belong to the PyTorch tab or to all tabs; only this header, which holds
the imports that code needs, is edited by hand. ``onp`` is NumPy, spelled as
in the MXNet tab, whose ``np`` is MXNet's own, so that the framework-free
cells read the same in both tabs.
"""
import collections
import math
import os
import random

import cv2
import numpy as onp
import torch
from d2l import torch as d2l
from IPython import display
from torch import nn
from torch.nn import functional as F

import d2l_face
from d2l_face import datahub, formats, recordio, standin

#################   WARNING   ################
# The below part is generated automatically through:
#    d2lbook build lib
# Don't edit it directly

class FaceResidual(nn.Module):
    """Residual unit of Face-ResNet: BN-conv-BN-PReLU-conv-BN + shortcut.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, in_channels, channels, strides=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels, init=0.25),
            # Striding the second convolution lets the first one still see
            # the input at full resolution.
            nn.Conv2d(channels, channels, 3, stride=strides, padding=1,
                      bias=False),
            nn.BatchNorm2d(channels))
        self.shortcut = None
        if strides != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=strides,
                          bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + shortcut

FACE_RESNET_UNITS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3],
                     100: [3, 13, 30, 3]}

class FaceResNet(nn.Module):
    """ResNet for 112x112 faces, mapping images to embedding vectors.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, units, width=1.0, embedding_size=512, dropout=0.0):
        super().__init__()
        channels = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0], init=0.25))
        stages, in_channels = [], channels[0]
        for num_units, out_channels in zip(units, channels):
            stage = []
            for i in range(num_units):
                stage.append(FaceResidual(in_channels, out_channels,
                                          strides=2 if i == 0 else 1))
                in_channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        embedding_norm = nn.BatchNorm1d(embedding_size)
        # A fixed scale keeps every embedding dimension on the same
        # footing; the batch norm only centers and standardizes them.
        embedding_norm.weight.requires_grad_(False)
        self.head = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Dropout(dropout), nn.Flatten(),
            nn.Linear(in_channels * 7 * 7, embedding_size), embedding_norm)

    def forward(self, x):
        x = (x - 0.5) / 0.5  # [0, 1] pixels, as ToTensor makes them
        return self.head(self.stages(self.stem(x)))

def face_resnet(depth=18, width=1.0, embedding_size=512, dropout=0.0):
    """Return a Face-ResNet of the given depth (18, 34, 50 or 100).

    Defined in :numref:`sec_facerecognition_arcface`"""
    if depth not in FACE_RESNET_UNITS:
        raise ValueError(f'depth must be one of '
                         f'{sorted(FACE_RESNET_UNITS)}, not {depth!r}')
    if not width > 0:
        raise ValueError(f'width must be positive, not {width!r}')
    return FaceResNet(FACE_RESNET_UNITS[depth], width, embedding_size,
                      dropout)

def count_parameters(net, trainable_only=True):
    """Count the parameter values of a module (skip BN statistics if asked).

    Defined in :numref:`sec_facerecognition_arcface`"""
    if trainable_only:
        return sum(p.numel() for p in net.parameters() if p.requires_grad)
    # The state holds the BN statistics too, and a step counter per BN
    # layer, an integer that is no value of the model.
    return sum(t.numel() for t in net.state_dict().values()
               if t.is_floating_point())

def margin_target_logit(theta, s=1.0, m1=1.0, m2=0.0, m3=0.0):
    """Target-class logit s * (cos(m1 * theta + m2) - m3), for angles theta.

    Defined in :numref:`sec_facerecognition_arcface`"""
    theta_max = (math.pi - m2) / m1
    # Clamping keeps the unused branch of torch.where finite, so it adds
    # nothing (not NaN) to the gradient.
    margin = torch.cos(m1 * torch.clamp(theta, max=theta_max) + m2)
    beyond = torch.cos(theta) - (1 + math.cos(theta_max))
    return s * (torch.where(theta <= theta_max, margin, beyond) - m3)

MARGIN_SETTINGS = {  # (m1, m2, m3)
    'softmax': (1.0, 0.0, 0.0), 'sphereface': (1.35, 0.0, 0.0),
    'cosface': (1.0, 0.0, 0.35), 'arcface': (1.0, 0.5, 0.0),
    'combined': (1.0, 0.3, 0.2)}

class MarginLogits(nn.Module):
    """Scaled cosine logits with an angular margin on the target class.

    Defined in :numref:`sec_facerecognition_arcface`"""
    def __init__(self, num_classes, embedding_size, s=64.0, m1=1.0, m2=0.0,
                 m3=0.0, eps=1e-7):
        super().__init__()
        if not s > 0 or not m1 > 0 or not 0 <= m2 < math.pi:
            raise ValueError(f'need s > 0, m1 > 0 and 0 <= m2 < pi, not '
                             f's={s}, m1={m1}, m2={m2}')
        self.num_classes, self.eps = num_classes, eps
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.weight = nn.Parameter(
            torch.normal(0, 0.01, size=(num_classes, embedding_size)))

    def forward(self, embeddings, labels):
        def unit_rows(x):
            return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + 1e-12)
        cos = unit_rows(embeddings) @ unit_rows(self.weight).T
        cos = torch.clamp(cos, -1 + self.eps, 1 - self.eps)
        cos_target = cos.gather(1, labels[:, None])[:, 0]
        target = margin_target_logit(torch.arccos(cos_target), self.s,
                                     self.m1, self.m2, self.m3)
        # Replace the target column of s * cos by the margin logit.
        one_hot = F.one_hot(labels, self.num_classes).to(cos.dtype)
        return self.s * cos + one_hot * (target - self.s * cos_target)[:, None]

def all_devices():
    """Every GPU there is, or the CPU when there is none.

    Defined in :numref:`sec_facerecognition_training`"""
    return [torch.device(f'cuda:{i}')
            for i in range(torch.cuda.device_count())] or [torch.device('cpu')]

def embed_pairs(net, images, batch_size=256, devices=None):
    """Unit-length sums of the embeddings of images[0] and images[1].

    Defined in :numref:`sec_facerecognition_training`"""
    devices = devices or all_devices()
    if images.ndim != 5 or images.shape[0] != 2 or images.shape[1] == 0:
        raise ValueError(f'expected images of shape (2, n, 3, h, w) with '
                         f'n > 0, not {images.shape}')
    # on several GPUs, each gets a part of every batch
    model = nn.DataParallel(net, devices) if len(devices) > 1 else net
    was_training, chunks = net.training, []
    net.eval()  # batch normalization with its running statistics
    try:
        with torch.no_grad():
            for i in range(0, images.shape[1], batch_size):
                total = 0
                for copy in images[:, i:i + batch_size]:  # then flipped
                    X = torch.from_numpy(onp.ascontiguousarray(copy))
                    X = X.to(devices[0], torch.float32) / 255
                    total = total + model(X).cpu().numpy()
                chunks.append(total)
    finally:
        net.train(was_training)
    embeddings = onp.concatenate(chunks).astype(onp.float64)
    return embeddings / onp.linalg.norm(embeddings, axis=1, keepdims=True)

def pair_scores(embeddings):
    """Cosine similarity of the two unit embeddings of each pair.

    Defined in :numref:`sec_facerecognition_training`"""
    embeddings = onp.asarray(embeddings)
    if embeddings.ndim != 2 or len(embeddings) % 2:
        raise ValueError(f'expected two embeddings per pair, in rows, not '
                         f'an array of shape {embeddings.shape}')
    return (embeddings[0::2] * embeddings[1::2]).sum(axis=1)

def check_pairs(scores, issame, num_folds=1):
    """Scores (float64) and labels (bool) of pairs, checked to fit.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = onp.asarray(scores, onp.float64), onp.asarray(issame)
    if scores.ndim != 1 or issame.shape != scores.shape:
        raise ValueError(f'expected one score and one label per pair, not '
                         f'shapes {scores.shape} and {issame.shape}')
    if len(scores) < max(num_folds, 1):
        raise ValueError(f'{len(scores)} pairs are too few for '
                         f'{max(num_folds, 1)} fold(s)')
    if not onp.isfinite(scores).all():
        bad = onp.flatnonzero(~onp.isfinite(scores))
        raise ValueError(f'{len(bad)} scores are NaN or infinite, the first '
                         f'of pair {bad[0]}: is an embedding all zeros?')
    if not onp.isin(issame, (0, 1)).all():
        raise ValueError('labels must be True/False or 1/0')
    return scores, issame.astype(bool)

def count_accepts_sorted(descending, same, thresholds):
    """True and false accepts (score > threshold) of sorted scores.

    Defined in :numref:`sec_facerecognition_training`"""
    same_in_top = onp.concatenate([[0], onp.cumsum(same)])
    # k[i]: how many scores lie strictly above thresholds[i]
    k = onp.searchsorted(-descending, -onp.asarray(thresholds), side='left')
    return same_in_top[k], k - same_in_top[k]

def count_accepts(scores, issame, thresholds):
    """True and false accepts (score > threshold) for each threshold.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    order = onp.argsort(-scores, kind='stable')
    return count_accepts_sorted(scores[order], issame[order], thresholds)

def candidate_thresholds(scores, is_sorted=False):
    """One threshold per distinct decision, from accept none to accept all.

    Defined in :numref:`sec_facerecognition_training`"""
    scores = onp.asarray(scores, onp.float64)
    if scores.size == 0 or not onp.isfinite(scores).all():
        raise ValueError('need at least one score, and no NaN or infinity')
    descending = scores if is_sorted else onp.sort(scores)[::-1]
    values = descending[onp.concatenate([[True],
                                         descending[1:] != descending[:-1]])]
    return onp.concatenate([values[:1], (values[:-1] + values[1:]) / 2,
                            [onp.nextafter(values[-1], -onp.inf)]])

def best_threshold_sorted(descending, same, thresholds=None):
    """The most accurate threshold (the first on ties) for sorted scores.

    Defined in :numref:`sec_facerecognition_training`"""
    if thresholds is None:
        thresholds = candidate_thresholds(descending, is_sorted=True)
    true_accepts, false_accepts = count_accepts_sorted(descending, same,
                                                       thresholds)
    correct = true_accepts + (len(same) - same.sum()) - false_accepts
    best = onp.argmax(correct)
    return thresholds[best], correct[best] / len(descending)

def best_threshold(scores, issame, thresholds=None):
    """The most accurate threshold (the first on ties) and its accuracy.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    order = onp.argsort(-scores, kind='stable')
    return best_threshold_sorted(scores[order], issame[order], thresholds)

def kfold_splits(num_pairs, num_folds=10):
    """Indices of the test pairs of each fold: contiguous, sizes within 1.

    Defined in :numref:`sec_facerecognition_training`"""
    if num_folds < 2 or num_pairs < num_folds:
        raise ValueError(f'need 2 or more folds, and at least one pair per '
                         f'fold: {num_pairs} pairs, {num_folds} folds')
    return onp.array_split(onp.arange(num_pairs), num_folds)

def kfold_train_test(num_pairs, num_folds=10):
    """Yield (train mask, test indices) for each fold.

    Defined in :numref:`sec_facerecognition_training`"""
    for test in kfold_splits(num_pairs, num_folds):
        train = onp.ones(num_pairs, bool)
        train[test] = False
        yield train, test

def verification_accuracy(scores, issame, num_folds=10, thresholds=None):
    """k-fold verification accuracy: mean, std and each fold's threshold.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame, num_folds)
    # Sort once for all folds: dropping a fold from a sorted list keeps the
    # rest sorted, so each fold only needs a mask, not a sort of its own.
    order = onp.argsort(-scores, kind='stable')
    descending, same = scores[order], issame[order]
    accuracies, fold_thresholds = [], []
    for train, test in kfold_train_test(len(scores), num_folds):
        keep = train[order]
        t, _ = best_threshold_sorted(descending[keep], same[keep], thresholds)
        accuracies.append(((scores[test] > t) == issame[test]).mean())
        fold_thresholds.append(t)
    return (onp.mean(accuracies), onp.std(accuracies),
            onp.array(fold_thresholds))

def standard_error(std, num_folds=10):
    """LFW's standard error of the mean, from the std over folds (np.std).

    Defined in :numref:`sec_facerecognition_training`"""
    return std / onp.sqrt(num_folds - 1)

def far_threshold(scores, issame, far=1e-3):
    """Lowest threshold that accepts at most a fraction `far` of impostors.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    if not 0 <= far <= 1:
        raise ValueError(f'far must lie between 0 and 1, not {far}')
    different = onp.sort(scores[~issame])[::-1]
    allowed = int(onp.floor(far * len(different) + 1e-9))
    if allowed >= len(different):
        return onp.nextafter(scores.min(), -onp.inf)  # accept everything
    return different[allowed]

def val_at_far(scores, issame, far=1e-3, num_folds=10):
    """k-fold VAL at a target FAR: mean and std of VAL, mean of FAR.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame, num_folds)
    if issame.all() or not issame.any():
        raise ValueError('VAL and FAR need both same and different pairs')
    vals, fars = [], []
    for train, test in kfold_train_test(len(scores), num_folds):
        t = far_threshold(scores[train], issame[train], far)
        accepted, same = scores[test] > t, issame[test]
        if same.any():  # tiny sets may have folds without same pairs
            vals.append(accepted[same].mean())
        if not same.all():
            fars.append(accepted[~same].mean())
    return onp.mean(vals), onp.std(vals), onp.mean(fars)

def roc_curve(scores, issame):
    """False and true accept rates at every distinct threshold.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    if issame.all() or not issame.any():
        raise ValueError('a ROC curve needs both same and different pairs')
    true_accepts, false_accepts = count_accepts(
        scores, issame, candidate_thresholds(scores))
    return (false_accepts / (~issame).sum(), true_accepts / issame.sum())

def plot_roc(curves, figsize=(4.5, 3.5)):
    """Plot ROC curves, given as a dict name -> (fpr, tpr), log-scaled FPR.

    Defined in :numref:`sec_facerecognition_training`"""
    d2l.use_svg_display()
    _, ax = d2l.plt.subplots(figsize=figsize)
    for name, (fpr, tpr) in curves.items():
        ax.step(fpr, tpr, where='post', label=name)
    ax.set_xscale('log')
    ax.set_xlim(min(fpr[fpr > 0].min() for fpr, _ in curves.values()), 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel('false accept rate')
    ax.set_ylabel('true accept rate')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()

def plot_score_histogram(scores, issame, threshold=None, figsize=(4.5, 3)):
    """Histograms of the scores of same and of different pairs.

    Defined in :numref:`sec_facerecognition_training`"""
    scores, issame = check_pairs(scores, issame)
    d2l.use_svg_display()
    _, ax = d2l.plt.subplots(figsize=figsize)
    bins = onp.linspace(scores.min(), scores.max(), 40)
    ax.hist(scores[issame], bins, alpha=0.6, label='same')
    ax.hist(scores[~issame], bins, alpha=0.6, label='different')
    if threshold is not None:
        ax.axvline(threshold, color='k', linestyle='--', label='threshold')
    ax.set_xlabel('cosine similarity')
    ax.set_ylabel('pairs')
    ax.legend()

def evaluate_verification(net, verification_set, batch_size=256,
                          devices=None, far=1e-3, num_folds=10):
    """Verification accuracy and VAL at FAR of `net` on one .bin set.

    Defined in :numref:`sec_facerecognition_training`"""
    images, issame = verification_set
    scores = pair_scores(embed_pairs(net, images, batch_size, devices))
    acc, acc_std, thresholds = verification_accuracy(scores, issame,
                                                     num_folds)
    val, val_std, far_measured = val_at_far(scores, issame, far, num_folds)
    return {'acc': acc, 'acc_std': acc_std,
            'acc_se': standard_error(acc_std, num_folds),
            'threshold': thresholds.mean(), 'val': val, 'val_std': val_std,
            'far': far_measured}

class TrainingBoard:
    """Live plot: training loss on the left, accuracies on the right."""
    def __init__(self, xlim, figsize=(7, 2.8)):
        """Defined in :numref:`sec_facerecognition_training`"""
        d2l.use_svg_display()
        self.fig, self.axes = d2l.plt.subplots(1, 2, figsize=figsize)
        self.xlim, self.curves = xlim, {}

    def add(self, x, values, status=''):
        """Add a point at x to each named curve, redraw, print a status."""
        for name, value in values.items():
            xs, ys = self.curves.setdefault(name, ([], []))
            xs.append(x)
            ys.append(value)
        for ax in self.axes:
            ax.cla()
        for name, (xs, ys) in self.curves.items():
            on_left = name == 'train loss'
            (self.axes[0] if on_left else self.axes[1]).plot(
                xs, ys, '-' if name.startswith('train') else 'o-',
                label=name)
        d2l.set_axes(self.axes[0], 'epoch', 'loss', self.xlim, None,
                     'linear', 'linear', None)
        d2l.set_axes(self.axes[1], 'epoch', 'accuracy', self.xlim, [0, 1],
                     'linear', 'linear', None)
        for ax in self.axes:
            ax.legend()
        self.fig.tight_layout()
        display.display(self.fig)
        if status:
            print(status)
        display.clear_output(wait=True)

    def finish(self):
        """Show the final plot for good and close its figure."""
        display.display(self.fig)
        d2l.plt.close(self.fig)

def train_face_step(net, margin, loss, optimizer, X, y, devices,
                    batch_size=None, scaler=None):
    """One SGD step on a batch, on all devices: (loss sum, # correct).

    Defined in :numref:`sec_facerecognition_training`"""
    X, y = X.to(devices[0]), y.to(devices[0])
    # With a GradScaler the network runs in float16 where that is safe; the
    # margin layer and the loss always run in float32.
    with torch.autocast(devices[0].type, torch.float16,
                        enabled=scaler is not None):
        embeddings = net(X)
    logits = margin(embeddings.float(), y)
    losses = loss(logits, y)
    optimizer.zero_grad(set_to_none=True)
    mean = losses.sum() / (batch_size or X.shape[0])
    if scaler is None:
        mean.backward()
        optimizer.step()
    else:  # scaled, so that small float16 gradients do not round to zero
        scaler.scale(mean).backward()
        scaler.step(optimizer)  # unscales; skips the step on inf or NaN
        scaler.update()
    correct = (logits.argmax(dim=1) == y).sum()
    return float(losses.sum()), float(correct)

def warmup_cosine(update, num_steps, warmup_steps=0):
    """Learning-rate factor of update 1, 2, ...: linear warm-up, cosine.

    Defined in :numref:`sec_facerecognition_training`"""
    if update < warmup_steps:
        return update / warmup_steps
    done = min(update, num_steps) - warmup_steps
    return (1 + math.cos(math.pi * done /
                         max(num_steps - warmup_steps, 1))) / 2

def facerec_trainer(net, margin, num_steps, lr, wd=5e-4, momentum=0.9,
                    warmup_steps=0):
    """SGD with momentum and weight decay, its learning rate on a cosine.

    Defined in :numref:`sec_facerecognition_training`"""
    params = [p for block in (net, margin) for p in block.parameters()
              if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr, momentum=momentum,
                                weight_decay=wd)
    # LambdaLR's count starts at 0, MXNet's at 1
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: warmup_cosine(i + 1, num_steps, warmup_steps))
    optimizer.register_step_post_hook(lambda *args: schedule.step())
    return optimizer

def describe_batches(train_iter):
    """How many images in batches of what size, where the iterator says.

    Defined in :numref:`sec_facerecognition_training`"""
    pack = getattr(train_iter, 'pack', None)  # as FaceRecordIter has
    batch_size = getattr(train_iter, 'batch_size', None)
    if pack is None or batch_size is None:
        size = len(train_iter) if hasattr(train_iter, '__len__') else '?'
        return f'{type(train_iter).__name__} of length {size}'
    return (f'{len(pack)} images in batches of {batch_size}, the last '
            f'incomplete batch dropped')

def check_train_input(train_iter, num_steps, eval_every=1, log_every=1):
    """Refuse counts below 1, and training data without a single batch.

    Defined in :numref:`sec_facerecognition_training`"""
    for name, value in [('num_steps', num_steps), ('eval_every', eval_every),
                        ('log_every', log_every)]:
        if not value >= 1 or int(value) != value:
            raise ValueError(f'{name} must be a whole number of at least 1, '
                             f'not {value!r}')
    if len(train_iter) == 0:
        raise ValueError(f'the training data yields no batch: '
                         f'{describe_batches(train_iter)}')

def facerec_batches(train_iter, num_steps):
    """Yield num_steps batches, going through train_iter as often as needed.

    Defined in :numref:`sec_facerecognition_training`"""
    step = 0
    while True:
        empty = True
        for X, y in train_iter:
            empty, step = False, step + 1
            yield X, y
            if step == num_steps:
                return
        if empty:
            raise ValueError(f'a pass over the training data yielded no '
                             f'batch, after step {step}: '
                             f'{describe_batches(train_iter)}')

def training_status(step, num_steps, history, images_per_sec):
    """One line: the step, the latest value of each curve, the speed.

    Defined in :numref:`sec_facerecognition_training`"""
    latest = ', '.join(f'{name} {points[-1][1]:.3f}'
                       for name, points in history.items())
    return (f'step {step}/{num_steps}: {latest}, '
            f'{images_per_sec:.1f} images/sec')

def facerec_model(net, margin, devices, fp16=False):
    """Net and margin on devices[0]; the net to call, and a GradScaler.

    Defined in :numref:`sec_facerecognition_training`"""
    if fp16 and devices[0].type != 'cuda':
        raise ValueError(f'fp16=True needs CUDA GPUs, not {devices}')
    net.to(devices[0]), margin.to(devices[0])
    # on several GPUs, each runs a copy of the network on part of a batch
    model = nn.DataParallel(net, devices) if len(devices) > 1 else net
    scaler = (torch.amp.GradScaler('cuda', growth_interval=100) if fp16
              else None)
    return model, scaler

def train_facerec(net, margin, train_iter, verification_sets, num_steps, lr,
                  wd=5e-4, momentum=0.9, warmup_steps=0, eval_every=100,
                  log_every=10, devices=None, plot=True, fp16=False):
    """Train a face embedding network with margin logits, on all devices.

    Defined in :numref:`sec_facerecognition_training`"""
    check_train_input(train_iter, num_steps, eval_every, log_every)
    devices, steps_per_epoch = devices or all_devices(), len(train_iter)
    model, scaler = facerec_model(net, margin, devices, fp16)
    optimizer = facerec_trainer(net, margin, num_steps, lr, wd, momentum,
                                warmup_steps)
    loss = nn.CrossEntropyLoss(reduction='none')
    board = TrainingBoard([0, num_steps / steps_per_epoch]) if plot else None
    history, metric = collections.defaultdict(list), d2l.Accumulator(3)
    timer, seen = d2l.Timer(), 0  # seen: images trained on, for the speed
    for step, (X, y) in enumerate(facerec_batches(train_iter, num_steps), 1):
        timer.start()
        metric.add(*train_face_step(model, margin, loss, optimizer, X, y,
                                    devices, scaler=scaler), X.shape[0])
        timer.stop()
        seen, values = seen + X.shape[0], {}
        if step % log_every == 0 or step == num_steps:
            values['train loss'] = metric[0] / metric[2]
            values['train acc'] = metric[1] / metric[2]
            metric.reset()
        if step % eval_every == 0 or step == num_steps:
            for name, verification_set in verification_sets.items():
                values[name] = evaluate_verification(
                    net, verification_set, devices=devices)['acc']
        for name, value in values.items():
            history[name].append((step / steps_per_epoch, value))
        status = training_status(step, num_steps, history,
                                 seen / timer.sum())
        if board and values:
            board.add(step / steps_per_epoch, values, status)
    if board:
        board.finish()
    print(f'{status}\non {devices}: {timer.sum():.1f} sec of training steps')
    return dict(history)

CPU_CONFIG = dict(  # a narrow network and a short training
    depth=18, width=0.125, embedding_size=128, batch_per_device=64,
    num_steps=450, eval_every=90, lr=0.1, warmup_steps=30, wd=5e-4,
    momentum=0.9, s=16.0, margin='arcface')

GPU_CONFIG = dict(  # a full-width Face-ResNet-50, on all GPUs
    CPU_CONFIG, depth=50, width=1.0, embedding_size=512,
    batch_per_device=128, num_steps=2000, eval_every=200)

def set_seeds(seed=0):
    """Seed Python's, NumPy's and PyTorch's random number generators.

    Defined in :numref:`sec_facerecognition_training`"""
    random.seed(seed)
    onp.random.seed(seed)
    torch.manual_seed(seed)  # the CPU's and every GPU's

def embed_face(net, image, devices=None):
    """Unit embedding of one aligned RGB uint8 face of shape (h, w, 3).

    Defined in :numref:`sec_facerecognition_training`"""
    image = onp.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'expected an RGB image of shape (h, w, 3), not '
                         f'{image.shape}')
    chw = image.astype(onp.uint8).transpose(2, 0, 1)
    both = onp.stack([chw, chw[:, :, ::-1]])[:, None]  # (2, 1, 3, h, w)
    return embed_pairs(net, both, 1, devices)[0]

def identify(probes, gallery, threshold=None):
    """Most similar gallery row of each unit probe, its cosine; -1: nobody.

    Defined in :numref:`sec_facerecognition_training`"""
    probes = onp.asarray(probes, onp.float64)
    gallery = onp.asarray(gallery, onp.float64)
    if probes.ndim != 2 or gallery.ndim != 2 or len(gallery) == 0 or \
            probes.shape[1] != gallery.shape[1]:
        raise ValueError(f'expected probes (n, d) and a non-empty gallery '
                         f'(m, d), not {probes.shape} and {gallery.shape}')
    similarity = probes @ gallery.T
    # A NaN embedding (of a failed enrollment, say) is similar to nothing:
    # argmax would pick it, so it gets -inf and never wins.
    similarity[onp.isnan(similarity)] = -onp.inf
    best = similarity.argmax(axis=1)
    cosine = similarity[onp.arange(len(best)), best]
    nobody = ~(cosine > (-onp.inf if threshold is None else threshold))
    return onp.where(nobody, -1, best), cosine