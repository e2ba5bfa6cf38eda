"""Code saved from the Face Recognition chapter (PyTorch).

Everything below the WARNING line is written by ``make lib`` (``d2lbook build
lib``) from the cells marked ``#@save`` in ``chapter_face_recognition/*.md``
that belong to the PyTorch tab or to all tabs; only this header, which holds
the imports that code needs, is edited by hand. ``onp`` is NumPy, spelled as
in the MXNet tab, whose ``np`` is MXNet's own, so that the framework-free
cells read the same in both tabs.
"""
import io
import math
import os

import cv2
import numpy as onp
import torch
from d2l import torch as d2l
from torch import nn
from torch.nn import functional as F

import d2l_face
from d2l_face import datahub, formats, onnxrun, recordio, standin

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

def find_bin_sets(folders):
    """The .bin verification sets in a folder or list of folders, by name.

    Defined in :numref:`sec_facerecognition_training`"""
    known = ['lfw', 'cfp_fp', 'agedb_30', 'calfw', 'cplfw']
    paths = {}
    for folder in [folders] if isinstance(folders, str) else folders:
        # os.listdir, not glob: a folder name may hold characters such as
        # '[' that a glob pattern would read as wildcards.
        for file_name in sorted(os.listdir(folder)):
            name, ext = os.path.splitext(file_name)
            path = os.path.join(folder, file_name)
            if ext != '.bin' or os.path.isdir(path):
                continue
            if name in paths:
                raise ValueError(f'two verification sets named {name!r}: '
                                 f'{paths[name]} and {path}')
            paths[name] = path
    order = sorted(paths, key=lambda name: (
        known.index(name) if name in known else len(known), name))
    return {name: paths[name] for name in order}

def evaluate_bin_sets(embed, folders, far=1e-3, num_folds=10):
    """Verification accuracy and VAL at FAR on every .bin set in folders.

    Defined in :numref:`sec_facerecognition_training`"""
    sets = find_bin_sets(folders)
    if not sets:
        raise FileNotFoundError(f'no .bin verification set in {folders}')
    print(f'{"set":<14}{"pairs":>6}  {"accuracy ± std":<17}  VAL ± std at '
          f'FAR {far:g} (FAR reached)')
    results = {}
    for name, path in sets.items():
        images, issame = load_bin(path)
        embeddings = onp.asarray(embed(images), onp.float64)
        if embeddings.shape[0] != images.shape[1] or not onp.allclose(
                onp.linalg.norm(embeddings, axis=1), 1, atol=1e-4):
            raise ValueError(f'{path}: embed must return one unit-length '
                             f'embedding per image, {images.shape[1]} in '
                             f'all, not an array of shape {embeddings.shape}')
        scores = pair_scores(embeddings)
        acc, acc_std, _ = verification_accuracy(scores, issame, num_folds)
        val, val_std, far_reached = val_at_far(scores, issame, far,
                                               num_folds)
        results[name] = dict(pairs=len(issame), acc=acc, acc_std=acc_std,
                             val=val, val_std=val_std, far=far_reached)
        print(f'{name:<14}{len(issame):>6}  {acc:.4f} ± {acc_std:.4f}  '
              f'{val:.4f} ± {val_std:.4f} ({far_reached:.4f})')
    return results

class InsightFaceInput(nn.Module):
    """A network for [0, 1] RGB input, fed InsightFace's scaling instead.

    Defined in :numref:`sec_facerecognition_training`"""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, y):
        # y = (x - 127.5) / 127.5 for pixel values x, so y / 2 + 0.5 is
        # x / 255, the input the network expects
        return self.net(y / 2 + 0.5)

def export_onnx(net, path, image_size=(112, 112), opset=17):
    """Write net as an ONNX file that takes InsightFace's input.

    Defined in :numref:`sec_facerecognition_training`"""
    model, was_training = InsightFaceInput(net), net.training
    example = torch.zeros((1, 3) + tuple(image_size),
                          device=next(net.parameters()).device)
    buffer = io.BytesIO()
    try:
        model.eval()  # batch normalization with its running statistics
        torch.onnx.export(
            model, example, buffer, opset_version=opset,
            input_names=['input'], output_names=['embedding'],
            dynamic_axes={'input': {0: 'batch'}, 'embedding': {0: 'batch'}})
    finally:
        net.train(was_training)
    return onnxrun.write_model(buffer.getvalue(), path,
                               onnxrun.insightface_metadata(image_size))