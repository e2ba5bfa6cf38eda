"""Code saved from the Face Recognition chapter (PyTorch).

Everything below the WARNING line is written by ``make lib`` (``d2lbook build
lib``) from the cells marked ``#@save`` in ``chapter_face_recognition/*.md``
that belong to the PyTorch tab or to all tabs; only this header, which holds
the imports that code needs, is edited by hand. ``onp`` is NumPy, spelled as
in the MXNet tab, whose ``np`` is MXNet's own, so that the framework-free
cells read the same in both tabs.
"""
import json
import math
import os
import time

import cv2
import numpy as onp
import torch
from d2l import torch as d2l
from torch import distributed as dist
from torch import nn
from torch.distributed import nn as dist_nn
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

def split_classes(num_classes, num_shards):
    """Split range(num_classes) into `num_shards` contiguous (start, stop).

    Defined in :numref:`sec_facerecognition_parallel`"""
    if not 1 <= num_shards <= num_classes:
        raise ValueError(f'cannot split {num_classes} classes into '
                         f'{num_shards} non-empty shards')
    base, extra = divmod(num_classes, num_shards)
    stops = [(i + 1) * base + min(i + 1, extra) for i in range(num_shards)]
    return list(zip([0] + stops[:-1], stops))

def sharded_softmax_loss(logits, labels, ranges, home):
    """Defined in :numref:`sec_facerecognition_parallel`"""
    """Softmax cross-entropy from per-shard logits, never gathered.

    logits[i] holds the logits of classes ranges[i] for the whole batch on
    its shard's device; the per-example loss is returned on `home`."""
    # 1. k maxima per example come home; the largest is the shift M.
    top = torch.stack([z.max(dim=1).values.to(home) for z in logits])
    top = top.max(dim=0).values.detach()
    sum_exp, target = 0, 0
    for z, (start, stop) in zip(logits, ranges):
        # 2. Each shard sums exp(z - M) over its classes.
        shift = top.to(z.device)[:, None]
        sum_exp = sum_exp + torch.exp(z - shift).sum(dim=1).to(home)
        # 3. The shard that owns the label sends the target logit.
        local = labels.to(z.device) - start
        owned = (local >= 0) & (local < stop - start)
        picked = z.gather(1, torch.where(owned, local, 0)[:, None])[:, 0]
        target = target + (picked * owned).to(home)
    return torch.log(sum_exp) + top - target

class MarginShard(MarginLogits):
    """Defined in :numref:`sec_facerecognition_parallel`"""
    """MarginLogits of a range of classes; a label outside the range
    (negative, or past its end) gets no margin."""
    def forward(self, embeddings, labels):
        def unit_rows(x):
            return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + 1e-12)
        cos = unit_rows(embeddings) @ unit_rows(self.weight).T
        cos = torch.clamp(cos, -1 + self.eps, 1 - self.eps)
        owned = (labels >= 0) & (labels < self.num_classes)
        local = torch.where(owned, labels, 0)
        cos_target = cos.gather(1, local[:, None])[:, 0]
        target = margin_target_logit(torch.arccos(cos_target), self.s,
                                     self.m1, self.m2, self.m3)
        one_hot = F.one_hot(local, self.num_classes).to(cos.dtype)
        one_hot = one_hot * owned[:, None]  # no margin for other shards
        return self.s * cos + one_hot * (target - self.s * cos_target)[:, None]

class ShardedMarginLoss(nn.Module):
    """Margin softmax loss with the class weight split over devices.

    Defined in :numref:`sec_facerecognition_parallel`"""
    def __init__(self, num_classes, embedding_size, devices, s=64.0, m1=1.0,
                 m2=0.0, m3=0.0):
        super().__init__()
        self.devices = list(devices)
        self.ranges = split_classes(num_classes, len(self.devices))
        self.shards = nn.ModuleList(
            MarginShard(stop - start, embedding_size, s, m1, m2, m3).to(device)
            for (start, stop), device in zip(self.ranges, self.devices))

    def shard_logits(self, embeddings, labels):
        """Return each shard's margin logits, (batch, its classes), on its
        own device."""
        return [shard(embeddings.to(device), labels.to(device) - start)
                for shard, device, (start, _) in zip(
                    self.shards, self.devices, self.ranges)]

    def forward(self, embeddings, labels):
        return sharded_softmax_loss(self.shard_logits(embeddings, labels),
                                    labels, self.ranges, embeddings.device)

def face_batches(data_dir, num_classes, batch_size, num_steps, seed=0):
    """Defined in :numref:`sec_facerecognition_parallel`"""
    """`num_steps` batches of the first `num_classes` identities' images,
    shuffled and flipped alike in every process with the same `seed`."""
    items = list_facerec_images(data_dir, num_classes)
    if len(items) < batch_size:
        raise ValueError(f'{data_dir} has {len(items)} images of the first '
                         f'{num_classes} identities, fewer than the batch '
                         f'size {batch_size}: not one batch to train on')
    images = torch.stack([torch.from_numpy(onp.ascontiguousarray(
        read_face_image(path))) for path, _ in items]).permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in items])
    generator = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < num_steps:
        order = torch.randperm(len(items), generator=generator)
        for i in range(0, len(items) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            flip = torch.rand(batch_size, generator=generator) < 0.5
            X = images[idx].float() / 255  # [0, 1], as ToTensor makes them
            X = torch.where(flip[:, None, None, None], X.flip(3), X)
            batches.append((X, labels[idx]))
            if len(batches) == num_steps:
                break
    return batches

def init_face_model(num_classes, width, seed):
    """A small face net and CosFace-style margin layer, alike for a seed.

    Defined in :numref:`sec_facerecognition_parallel`"""
    torch.manual_seed(seed)
    net = face_resnet(18, width=width, embedding_size=64)
    head = MarginLogits(num_classes, 64, s=16.0, m3=0.1)
    return net, head

def train_on_parts(net, head, batches, parts, num_parts, lr=0.05):
    """Defined in :numref:`sec_facerecognition_parallel`"""
    """SGD on the parts `parts` of each batch cut into `num_parts` equal
    parts; return the mean loss over those parts at each step."""
    if batches[0][0].shape[0] % num_parts:
        raise ValueError(f'a batch of {batches[0][0].shape[0]} does not '
                         f'cut into {num_parts} equal parts')
    params = list(net.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9,
                                weight_decay=5e-4)
    device, dtype, losses = params[0].device, params[0].dtype, []
    net.train()
    for X, y in batches:
        Xs = X.to(device, dtype).chunk(num_parts)
        ys = y.to(device).chunk(num_parts)
        optimizer.zero_grad()
        # Each part through the network on its own: its own batch statistics.
        loss = sum(F.cross_entropy(head(net(Xs[i]), ys[i]), ys[i],
                                   reduction='sum') for i in parts)
        loss = loss / sum(len(ys[i]) for i in parts)
        loss.backward()  # in DDP, the gradients of all ranks are averaged
        optimizer.step()
        losses.append(float(loss))
    return losses

def train_face_worker(data_dir, out_dir, backend='gloo', num_classes=20,
                      batch_size=8, num_steps=10, lr=0.05, width=0.125,
                      seed=0, dtype='float32'):
    """Defined in :numref:`sec_facerecognition_parallel`"""
    """In a job that torchrun started: train a small face net data
    parallel, `batch_size` images per rank; save losses and model."""
    dist.init_process_group(backend)  # reads MASTER_ADDR, RANK, ...
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = (torch.device('cuda', int(os.environ['LOCAL_RANK']))
              if backend == 'nccl' else torch.device('cpu'))
    batches = face_batches(data_dir, num_classes, batch_size * world_size,
                           num_steps, seed)
    net, head = (nn.parallel.DistributedDataParallel(
        m.to(device, getattr(torch, dtype)))
        for m in init_face_model(num_classes, width, seed))
    tic = time.time()
    losses = train_on_parts(net, head, batches, [rank], world_size, lr)
    seconds = time.time() - tic
    os.makedirs(out_dir, exist_ok=True)
    torch.save({'net': net.module.state_dict(),
                'head': head.module.state_dict()},
               os.path.join(out_dir, f'rank{rank}.pt'))
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump({'rank': rank, 'world_size': world_size,
                   'losses': losses, 'seconds': seconds}, f)
    print(f'rank {rank}/{world_size}: loss {losses[0]:.2f} -> '
          f'{losses[-1]:.2f} in {seconds:.1f} s')
    # The ranks end together. The group ends with the process: with Gloo,
    # dist.destroy_process_group() hangs now and then (PyTorch issue 75097).
    dist.barrier()

def dist_sharded_softmax_loss(logits, labels, start):
    """Defined in :numref:`sec_facerecognition_parallel`"""
    """Softmax cross-entropy of the global batch, from this rank's logits of
    the classes start, start + 1, ... and those of the other ranks."""
    top = logits.detach().max(dim=1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX)  # 1. the shift M
    # 2. and 3., recorded by autograd: their gradients are all-reduced too.
    sum_exp = dist_nn.all_reduce(torch.exp(logits - top[:, None]).sum(dim=1))
    local = labels - start
    owned = (local >= 0) & (local < logits.shape[1])
    picked = logits.gather(1, torch.where(owned, local, 0)[:, None])[:, 0]
    target = dist_nn.all_reduce(picked * owned)
    return torch.log(sum_exp) + top - target

class DistShardedMarginLoss(nn.Module):
    """Margin softmax loss with the class weight split over the ranks.

    Defined in :numref:`sec_facerecognition_parallel`"""
    def __init__(self, num_classes, embedding_size, s=64.0, m1=1.0, m2=0.0,
                 m3=0.0):
        super().__init__()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.start, stop = split_classes(num_classes, self.world_size)[
            self.rank]
        self.shard = MarginShard(stop - self.start, embedding_size, s, m1,
                                 m2, m3)

    def forward(self, embeddings, labels):
        """The loss of this rank's examples (every rank has as many)."""
        X = torch.cat(dist_nn.all_gather(embeddings))
        ys = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(ys, labels)
        y = torch.cat(ys)
        loss = dist_sharded_softmax_loss(self.shard(X, y - self.start), y,
                                         self.start)
        n = len(labels)
        return loss[self.rank * n:(self.rank + 1) * n]

def random_margin_problem(num_classes, embedding_size, batch_size, seed=0):
    """Random embeddings, labels and class weight, alike for a seed.

    Defined in :numref:`sec_facerecognition_parallel`"""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(batch_size, embedding_size, generator=generator)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    W = torch.randn(num_classes, embedding_size, generator=generator)
    return X, y, W

def sharded_loss_worker(out_dir, num_classes=1000, embedding_size=64,
                        batch_size=8, margin=(64.0, 1.0, 0.5, 0.0), seed=0):
    """Defined in :numref:`sec_facerecognition_parallel`"""
    """In a job that torchrun started: the sharded loss of a random problem
    and its gradients; each rank saves its examples' and its shard's."""
    dist.init_process_group('gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    X, y, W = random_margin_problem(num_classes, embedding_size,
                                    batch_size * world_size, seed)
    loss_fn = DistShardedMarginLoss(num_classes, embedding_size, *margin)
    weight, start = loss_fn.shard.weight, loss_fn.start
    with torch.no_grad():
        weight.copy_(W[start:start + len(weight)])
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    X = X[mine].clone().requires_grad_()
    loss = loss_fn(X, y[mine])
    loss.sum().backward()
    torch.save({'loss': loss.detach(), 'grad_x': X.grad,
                'grad_w': weight.grad, 'start': start},
               os.path.join(out_dir, f'rank{rank}.pt'))
    dist.barrier()  # the ranks end together, as in train_face_worker