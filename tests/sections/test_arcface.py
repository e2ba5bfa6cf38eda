"""Section `arcface`: Face-ResNet and the margin logits, in both tabs.

A test that takes `d2lf` holds for both tabs; the others test one tab, or
compare the PyTorch tab with the MXNet one."""
import math

import mxnet as mx
import numpy as onp
import pytest
import torch
from mxnet import autograd, gluon, init, npx
from mxnet import np as mxnp
from torch.nn import functional as F

from d2l_face import mxnet as d2lf_mx
from d2l_face import torch as d2lf_torch

npx.set_np()

SETTINGS = d2lf_mx.MARGIN_SETTINGS  # name -> (m1, m2, m3)
S = 64.0
DEPTHS = [18, 34, 50, 100]
WIDTHS = [0.125, 0.25, 0.5, 1.0]


# ------------------------------------------------------- the two tabs alike

def is_torch(d2lf):
    return d2lf is d2lf_torch


def tensor(d2lf, x):
    """A NumPy array as the tab's tensor, of the same dtype."""
    return (torch.from_numpy(x) if is_torch(d2lf)
            else mxnp.array(x, dtype=x.dtype))


def numpy(y):
    """A tensor of either tab as a NumPy array."""
    return y.detach().numpy() if isinstance(y, torch.Tensor) else y.asnumpy()


def seeded(d2lf, seed):
    """Seed the random generator that the tab's initializers draw from."""
    torch.manual_seed(seed) if is_torch(d2lf) else mx.random.seed(seed)


def initialized(d2lf, block):
    """The block ready to run: MXNet initializes it, PyTorch did already."""
    if not is_torch(d2lf):
        block.initialize(init.Xavier())
    return block


@pytest.mark.parametrize('name', list(SETTINGS))
def test_target_logit_is_continuous_and_decreasing(d2lf, name):
    m1, m2, m3 = SETTINGS[name]
    theta = onp.linspace(0, math.pi, 20001)
    curve = numpy(d2lf.margin_target_logit(tensor(d2lf, theta), 1.0, m1, m2,
                                           m3))
    steps = onp.diff(curve)
    assert (steps <= 1e-12).all(), 'target logit must not rise with theta'
    # No jump: neighbouring grid points differ at most by slope * step.
    assert onp.abs(steps).max() < 2 * max(m1, 1) * (theta[1] - theta[0])
    assert curve[0] == pytest.approx(math.cos(m2) - m3)


def bisect(f, lo, hi, steps=100):
    """A root of f in [lo, hi], where f(lo) and f(hi) differ in sign."""
    assert f(lo) * f(hi) < 0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize('m1', [SETTINGS['sphereface'][0], 1.2, 2.0])
def test_sphereface_penalty_rises_peaks_and_falls(d2lf, m1):
    # The penalty cos(theta) - target logit / s is cos(theta) - cos(m1 theta)
    # up to theta_max = pi / m1. It is bounded: it rises while its
    # derivative m1 sin(m1 theta) - sin(theta) is positive, peaks where
    # that vanishes, falls until theta_max, and stays at the constant
    # 1 + cos(theta_max) of the fallback beyond.
    theta_max = math.pi / m1
    peak = bisect(lambda t: m1 * math.sin(m1 * t) - math.sin(t),
                  1e-3, theta_max)
    theta = onp.linspace(0, math.pi, 20001)
    logit = numpy(d2lf.margin_target_logit(tensor(d2lf, theta), 1.0, m1))
    penalty = onp.cos(theta) - logit
    inside = theta <= theta_max
    onp.testing.assert_allclose(
        penalty[inside], onp.cos(theta[inside]) - onp.cos(m1 * theta[inside]),
        atol=1e-12)
    onp.testing.assert_allclose(penalty[~inside], 1 + math.cos(theta_max),
                                atol=1e-12)
    steps = onp.diff(penalty)
    rising, falling = theta[1:] <= peak, (theta[:-1] >= peak) & inside[1:]
    assert (steps[rising] > 0).all() and (steps[falling] < 0).all()
    assert theta[penalty.argmax()] == pytest.approx(peak,
                                                    abs=theta[1] - theta[0])
    assert penalty.max() == pytest.approx(
        math.cos(peak) - math.cos(m1 * peak), abs=1e-6)
    # The fallback's constant lies below the peak: the penalty does fall.
    assert 1 + math.cos(theta_max) < penalty.max()


@pytest.mark.parametrize('kwargs', [dict(s=0.0), dict(m1=0.0), dict(m2=-0.1),
                                    dict(m2=math.pi), dict(s=math.inf),
                                    dict(m3=math.nan)], ids=str)
def test_margin_logits_rejects_bad_settings(d2lf, kwargs):
    with pytest.raises(ValueError, match='need a finite s > 0'):
        d2lf.MarginLogits(10, 8, **kwargs)


@pytest.mark.parametrize('depth, width', [(17, 1.0), (152, 1.0), ('18', 1.0),
                                          (18, 0.0), (18, -0.5)])
def test_bad_depth_or_width(d2lf, depth, width):
    with pytest.raises(ValueError, match='must be'):
        d2lf.face_resnet(depth, width)


def test_margin_weights_start_normal_std_001(d2lf):
    seeded(d2lf, 0)
    head = d2lf.MarginLogits(200, 64)
    if not is_torch(d2lf):
        head.initialize()
    w = (numpy(head.weight) if is_torch(d2lf)
         else head.weight.data().asnumpy()).astype('float64')
    # mean(w^2) of n normal draws: standard error sqrt(2 / n) relative
    assert abs((w ** 2).mean() / 0.01 ** 2 - 1) <= 8 * math.sqrt(2 / w.size)
    assert abs(w.mean()) <= 8 * 0.01 / math.sqrt(w.size)


def test_input_is_normalized_inside(d2lf):
    # Pixels in [0, 1]: the network maps 0.5 to 0, so a constant grey image
    # gives the same output as feeding zeros through the stem directly.
    net = initialized(d2lf, d2lf.face_resnet(18, width=0.125,
                                             embedding_size=16))
    if is_torch(d2lf):
        net.eval()
    grey = tensor(d2lf, onp.full((1, 3, 112, 112), 0.5, onp.float32))
    zeros = tensor(d2lf, onp.zeros((1, 3, 112, 112), onp.float32))
    with torch.no_grad():  # (for the PyTorch tab)
        want = numpy(net(grey))
        direct = numpy(net.head(net.stages(net.stem(zeros))))
    onp.testing.assert_allclose(want, direct, atol=1e-6)


# Parameter counts. "Trainable" means what training updates: conv kernels
# (no biases), BN scales and shifts, PReLU slopes (one per channel), and the
# dense layer's weight and bias. BN running means and variances, and the
# scale of the embedding BN (fixed to 1), are stored but not trained.

def bn(c):
    return 2 * c  # gamma and beta


def unit(c_in, c):
    """BN, conv3x3, BN, PReLU, conv3x3, BN; the shortcut is counted apart."""
    return bn(c_in) + 9 * c_in * c + bn(c) + c + 9 * c * c + bn(c)


def expected_counts(depth, width, embedding_size=512):
    """(trainable, stored) parameter counts of Face-ResNet from its layout."""
    chans = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    units = d2lf_mx.FACE_RESNET_UNITS[depth]
    trainable = 9 * 3 * chans[0] + bn(chans[0]) + chans[0]   # stem
    num_bn_channels = chans[0]
    c_in = chans[0]
    for num_units, c in zip(units, chans):
        for i in range(num_units):
            trainable += unit(c_in, c)
            num_bn_channels += c_in + 2 * c
            if i == 0:  # stride 2, so a shortcut: 1x1 conv, then BN
                trainable += c_in * c + bn(c)
                num_bn_channels += c
            c_in = c
    head = bn(c_in) + 49 * c_in * embedding_size + embedding_size
    trainable += head + embedding_size  # embedding BN: beta only
    num_bn_channels += c_in + embedding_size
    # Stored extra: running mean and variance of every BN, the fixed gamma.
    stored = trainable + 2 * num_bn_channels + embedding_size
    return trainable, stored


@pytest.mark.parametrize('depth', [18, 34, 50, 100])
@pytest.mark.parametrize('width', [1.0, 0.25])
def test_parameter_counts_match_architecture(d2lf, depth, width):
    if is_torch(d2lf):
        with torch.device('meta'):  # shapes only: nothing allocated
            net = d2lf.face_resnet(depth, width)
    else:
        net = d2lf.face_resnet(depth, width)  # not initialized: shapes
    assert (d2lf.count_parameters(net),
            d2lf.count_parameters(net, trainable_only=False)) == (
                expected_counts(depth, width))


def test_known_full_width_sizes(d2lf):
    # Published IResNet sizes: about 24.0 M (r18) and 65.2 M (r100).
    with torch.device('meta'):  # (for the PyTorch tab) shapes only
        sizes = [d2lf.count_parameters(d2lf.face_resnet(depth))
                 for depth in (18, 100)]
    assert [round(n / 1e6, 1) for n in sizes] == [24.0, 65.2]


# ------------------------------------------------------- the MXNet tab alone

npx.set_np()


def make_head(num_classes, embedding_size, m, s=S, seed=0):
    """A MarginLogits layer with deterministic random class weights."""
    head = d2lf_mx.MarginLogits(num_classes, embedding_size, s, *m)
    head.initialize()
    rng = onp.random.default_rng(seed)
    head.weight.set_data(mxnp.array(
        rng.normal(size=(num_classes, embedding_size)), dtype='float32'))
    return head


def embeddings_at_angles(weight, labels, angles, rng):
    """Embeddings at the given angles to their class weight rows (float64)."""
    w = weight[labels] / onp.linalg.norm(weight[labels], axis=1,
                                         keepdims=True)
    # A random direction orthogonal to each weight row.
    u = rng.normal(size=w.shape)
    u -= (u * w).sum(axis=1, keepdims=True) * w
    u /= onp.linalg.norm(u, axis=1, keepdims=True)
    scale = rng.uniform(0.5, 3.0, size=(len(labels), 1))
    return scale * (onp.cos(angles)[:, None] * w +
                    onp.sin(angles)[:, None] * u)


def expected_logits(x, weight, labels, s, m1, m2, m3):
    """The margin logits in float64: the formula, with the fallback."""
    xn = x / onp.linalg.norm(x, axis=1, keepdims=True)
    wn = weight / onp.linalg.norm(weight, axis=1, keepdims=True)
    cos = onp.clip(xn @ wn.T, -1, 1)
    logits = s * cos
    rows = onp.arange(len(labels))
    theta = onp.arccos(cos[rows, labels])
    theta_max = (math.pi - m2) / m1
    target = onp.where(theta <= theta_max,
                       onp.cos(m1 * onp.minimum(theta, theta_max) + m2),
                       onp.cos(theta) - 1 - math.cos(theta_max))
    logits[rows, labels] = s * (target - m3)
    return logits, theta


@pytest.mark.parametrize('name', list(SETTINGS))
def test_logits_match_formula_where_no_fallback(name):
    m1, m2, m3 = SETTINGS[name]
    rng = onp.random.default_rng(1)
    num_classes, dim, n = 12, 32, 64
    head = make_head(num_classes, dim, (m1, m2, m3))
    weight = head.weight.data().asnumpy().astype(onp.float64)
    labels = rng.integers(0, num_classes, size=n)
    theta_max = (math.pi - m2) / m1
    # Angles over the whole range where m1 * theta + m2 <= pi.
    angles = rng.uniform(0.05, min(theta_max, math.pi) - 0.05, size=n)
    x = embeddings_at_angles(weight, labels, angles, rng)
    got = head(mxnp.array(x, dtype='float32'),
               mxnp.array(labels, dtype='int32')).asnumpy()
    want, theta = expected_logits(x, weight, labels, S, m1, m2, m3)
    onp.testing.assert_allclose(theta, angles, atol=1e-9)
    assert (m1 * theta + m2 <= math.pi).all()
    onp.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
    # Off-target logits are s * cos(theta_j) exactly as for plain cosines.
    off = onp.ones_like(want, dtype=bool)
    off[onp.arange(n), labels] = False
    onp.testing.assert_allclose(got[off], want[off], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('name', ['sphereface', 'arcface', 'combined'])
def test_fallback_past_theta_max_is_shifted_cosine(name):
    m1, m2, m3 = SETTINGS[name]
    theta_max = (math.pi - m2) / m1
    rng = onp.random.default_rng(2)
    num_classes, dim, n = 6, 16, 40
    head = make_head(num_classes, dim, (m1, m2, m3))
    weight = head.weight.data().asnumpy().astype(onp.float64)
    labels = rng.integers(0, num_classes, size=n)
    angles = rng.uniform(theta_max + 0.02, math.pi - 0.02, size=n)
    x = embeddings_at_angles(weight, labels, angles, rng)
    got = head(mxnp.array(x, dtype='float32'),
               mxnp.array(labels, dtype='int32')).asnumpy()
    target = got[onp.arange(n), labels]
    # The documented fallback: s * (cos(theta) - (1 + cos(theta_max)) - m3).
    want = S * (onp.cos(angles) - 1 - math.cos(theta_max) - m3)
    onp.testing.assert_allclose(target, want, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize('name', list(SETTINGS))
@pytest.mark.parametrize('sign', [1.0, -1.0], ids=['theta0', 'theta_pi'])
def test_gradients_finite_when_parallel_or_antiparallel(name, sign):
    num_classes, dim = 5, 8
    head = make_head(num_classes, dim, SETTINGS[name])
    labels = mxnp.array([0, 1, 2, 3, 4], dtype='int32')
    # Each embedding exactly along (theta = 0) or against (theta = pi) its
    # own class weight.
    x = sign * head.weight.data().copy()
    x.attach_grad()
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    with autograd.record():
        logits = head(x, labels)
        total = loss(logits, labels).sum()
    total.backward()
    assert onp.isfinite(logits.asnumpy()).all()
    assert onp.isfinite(x.grad.asnumpy()).all()
    assert onp.isfinite(head.weight.grad().asnumpy()).all()


@pytest.mark.parametrize('depth', [18, 34, 50, 100])
@pytest.mark.parametrize('width', [1.0, 0.25])
def test_mxnet_counts_what_the_trainer_updates(depth, width):
    net = d2lf_mx.face_resnet(depth, width)
    params = net.collect_params().values()
    trainable = sum(math.prod(p.shape) for p in params
                    if p.grad_req != 'null')
    stored = sum(math.prod(p.shape) for p in params)
    assert (trainable, stored) == expected_counts(depth, width)
    assert d2lf_mx.count_parameters(net) == trainable
    assert d2lf_mx.count_parameters(net, trainable_only=False) == stored


def test_counts_unchanged_by_forward_pass():
    net = d2lf_mx.face_resnet(18, width=0.125, embedding_size=64)
    before = d2lf_mx.count_parameters(net, trainable_only=False)
    net.initialize(init.Xavier())
    net(mxnp.random.uniform(size=(1, 3, 112, 112)))
    assert d2lf_mx.count_parameters(net, trainable_only=False) == before
    assert before == expected_counts(18, 0.125, 64)[1]


@pytest.mark.parametrize('hybridize', [False, True])
def test_output_shape(hybridize):
    net = d2lf_mx.face_resnet(18, width=0.125, embedding_size=128, dropout=0.2)
    net.initialize(init.Xavier())
    if hybridize:
        net.hybridize()
    X = mxnp.random.uniform(size=(3, 3, 112, 112))
    assert net(X).shape == (3, 128)
    with autograd.record():  # training mode: batch statistics, dropout
        Y = net(X)
    Y.backward()
    assert Y.shape == (3, 128)


def test_hybridized_equals_imperative():
    net = d2lf_mx.face_resnet(18, width=0.125, embedding_size=32)
    net.initialize(init.Xavier())
    X = mxnp.random.uniform(size=(2, 3, 112, 112))
    imperative = net(X).asnumpy()
    net.hybridize()
    onp.testing.assert_allclose(net(X).asnumpy(), imperative, rtol=1e-4,
                                atol=1e-5)


def test_channel_prelu_matches_gluon_prelu():
    from mxnet.gluon import nn
    X = mxnp.random.normal(size=(2, 3, 5, 5))
    slopes = mxnp.array([0.25, -0.5, 2.0])
    builtin, ours = nn.PReLU(in_channels=3), d2lf_mx.ChannelPReLU(3)
    builtin.initialize()
    ours.initialize(init.Xavier())  # must not override the 0.25 start
    onp.testing.assert_allclose(ours.slope.weight.data().asnumpy().ravel(),
                                0.25)
    builtin.alpha.set_data(slopes)
    ours.slope.weight.set_data(slopes.reshape(3, 1, 1, 1))
    results = []
    for layer, slope in [(builtin, builtin.alpha), (ours, ours.slope.weight)]:
        x = X.copy()
        x.attach_grad()
        with autograd.record():
            y = layer(x)
        y.backward(mxnp.cos(X))
        results.append((y.asnumpy(), x.grad.asnumpy(),
                        slope.grad().asnumpy().ravel()))
    for a, b in zip(*results):
        onp.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def check_xavier_uniform(name, w, fan_in, fan_out, sigmas=8):
    """w drawn from U(-a, a), a = sqrt(6 / (fan_in + fan_out)): every value
    within a, and mean(w^2) = a^2 / 3 within `sigmas` standard errors (the
    standard error of mean(w^2) over n draws is 0.894 a^2 / 3 / sqrt(n))."""
    a = math.sqrt(6 / (fan_in + fan_out))
    w = onp.asarray(w, dtype='float64').ravel()
    assert onp.abs(w).max() <= a * (1 + 1e-6), name
    tolerance = sigmas * math.sqrt(4 / 45) * 3 / math.sqrt(w.size)
    assert abs((w ** 2).mean() / (a * a / 3) - 1) <= tolerance, name
    return tolerance


def test_face_resnet_initializes_as_xavier():
    # The tab's init.Xavier(): convolution and dense weights uniform with
    # a = sqrt(6 / (fan_in + fan_out)), fans times the kernel size; biases
    # and BN shifts 0, BN scales 1, PReLU slopes 0.25 (their own inits).
    mx.random.seed(0)
    net = d2lf_mx.face_resnet(18, width=0.25, embedding_size=64)
    net.initialize(init.Xavier())
    weights = 0
    for p in net.collect_params().values():
        value = p.data().asnumpy()
        if value.shape[1:] == (1, 1, 1):  # ChannelPReLU's slopes
            assert (value == 0.25).all(), p.name
        elif p.name.endswith('weight'):
            receptive = math.prod(value.shape[2:])
            fan_in, fan_out = (value.shape[1] * receptive,
                               value.shape[0] * receptive)
            tolerance = check_xavier_uniform(p.name, value, fan_in, fan_out)
            # PyTorch's default, U(+-1/sqrt(fan_in)), would fail the check,
            # its mean(w^2) being (fan_in + fan_out) / (6 fan_in) of
            # Xavier's; but for the stem's 27 inputs and 144 outputs.
            assert (abs((fan_in + fan_out) / (6 * fan_in) - 1) > tolerance
                    or fan_in == 27)
            weights += 1
        elif p.name.endswith(('bias', 'beta', 'running_mean')):
            assert (value == 0).all(), p.name
        else:
            assert p.name.endswith(('gamma', 'running_var')), p.name
            assert (value == 1).all(), p.name
    assert weights == 2 * 8 + 4 + 1 + 1  # 16 body, 4 shortcuts, stem, dense


# ----------------------------------------------- the PyTorch tab, and both

npx.set_np()


def test_import_gives_the_saved_names(d2lf):
    for name in ['FaceResidual', 'FaceResNet', 'face_resnet',
                 'count_parameters', 'margin_target_logit', 'MarginLogits',
                 'MARGIN_SETTINGS', 'FACE_RESNET_UNITS']:
        assert hasattr(d2lf, name), name
    # Plain data is written once, for both tabs.
    assert d2lf.MARGIN_SETTINGS == d2lf_mx.MARGIN_SETTINGS
    assert d2lf.FACE_RESNET_UNITS == d2lf_mx.FACE_RESNET_UNITS


# Angles whose cosine lies within 1e-7 of +-1, where MarginLogits clips it.
CLIPPED = onp.array([0.0, 1e-6, 1e-4, math.pi - 1e-4, math.pi - 1e-6,
                     math.pi])


def angle_sets(m1, m2):
    """Named target angles: all over, near 0 and pi, past the fallback."""
    theta_max = (math.pi - m2) / m1
    rng = onp.random.default_rng(3)
    sets = {'uniform': rng.uniform(1e-3, math.pi - 1e-3, 64),
            'near_0': onp.array([1e-3, 3e-3, 1e-2, 0.05]),
            'near_pi': math.pi - onp.array([1e-3, 3e-3, 1e-2, 0.05])}
    if theta_max < math.pi:
        sets['past_theta_max'] = rng.uniform(theta_max, math.pi - 1e-3, 32)
    return sets


def both_logits(name, angles, dtype, seed=0):
    """Margin logits of both frameworks on the same numpy inputs."""
    m = SETTINGS[name]
    rng = onp.random.default_rng(seed)
    num_classes, dim = 7, 16
    weight = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, size=len(angles))
    x = embeddings_at_angles(weight, labels, angles, rng).astype(dtype)
    weight = weight.astype(dtype)
    head_mx = d2lf_mx.MarginLogits(num_classes, dim, S, *m)
    head_mx.initialize()
    head_mx.cast(dtype)
    head_mx.weight.set_data(mxnp.array(weight, dtype=dtype))
    got_mx = head_mx(mxnp.array(x, dtype=dtype),
                     mxnp.array(labels, dtype='int32')).asnumpy()
    head = d2lf_torch.MarginLogits(num_classes, dim, S, *m)
    head.to(getattr(torch, dtype))  # before the copy: no float32 rounding
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
    got = head(torch.from_numpy(x), torch.from_numpy(labels)).detach()
    return got.numpy(), got_mx, (x, weight, labels)


@pytest.mark.parametrize('name', list(SETTINGS))
def test_logits_agree_across_frameworks_float64(name):
    for angles in angle_sets(*SETTINGS[name][:2]).values():
        got, got_mx, _ = both_logits(name, angles, 'float64')
        assert got.dtype == got_mx.dtype == onp.float64
        onp.testing.assert_allclose(got, got_mx, rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', list(SETTINGS))
def test_logits_agree_across_frameworks_float32(name):
    # In float32 the two frameworks round the cosines differently, by about
    # one unit in the last place (6e-8). Where the target logit is a smooth
    # function of the cosine, that moves it by far less than 1e-5 of s. Near
    # theta = 0 (unless clipped) the arc cosine turns one rounding step
    # into a large change of angle; there the float64 test above holds.
    m1, m2, _ = SETTINGS[name]
    sets = angle_sets(m1, m2)
    angles = onp.concatenate([onp.clip(sets['uniform'], 0.3, None),
                              sets['near_pi'], CLIPPED,
                              sets.get('past_theta_max', [])])
    got, got_mx, _ = both_logits(name, angles, 'float32')
    onp.testing.assert_allclose(got / S, got_mx / S, rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', list(SETTINGS))
def test_clipped_cosines_agree_across_frameworks(name):
    # Both clip the cosine to 1 - 1e-7 (-1 + 1e-7) as a float32 number:
    # MXNet rounds np.clip's bounds to float32 even for float64 arrays, so
    # this is compared in float32, where the bounds are the same.
    got, got_mx, _ = both_logits(name, CLIPPED, 'float32')
    onp.testing.assert_allclose(got, got_mx, rtol=0, atol=1e-5)


def test_target_logit_function_agrees_across_frameworks():
    theta = onp.linspace(0, math.pi, 10001)
    for m in SETTINGS.values():
        got = d2lf_torch.margin_target_logit(torch.from_numpy(theta), S, *m)
        got_mx = d2lf_mx.margin_target_logit(mxnp.array(theta), S, *m)
        onp.testing.assert_allclose(got.numpy(), got_mx.asnumpy(), rtol=0,
                                    atol=1e-9)


@pytest.mark.parametrize('name', list(SETTINGS))
def test_loss_equals_formula(name):
    angles = onp.random.default_rng(4).uniform(0.1, math.pi - 0.1, 40)
    got, _, (x, weight, labels) = both_logits(name, angles, 'float64')
    want, _ = expected_logits(x, weight, labels, S, *SETTINGS[name])
    onp.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # Softmax cross-entropy, written out: log sum exp minus the target.
    top = want.max(axis=1, keepdims=True)
    log_sum = onp.log(onp.exp(want - top).sum(axis=1)) + top[:, 0]
    formula = (log_sum - want[onp.arange(len(labels)), labels]).mean()
    loss = F.cross_entropy(torch.from_numpy(got), torch.from_numpy(labels))
    assert float(loss) == pytest.approx(formula, rel=1e-10)


@pytest.mark.parametrize('name', list(SETTINGS))
def test_gradients_agree_across_frameworks(name):
    angles = onp.random.default_rng(5).uniform(0.1, math.pi - 0.1, 24)
    _, _, (x, weight, labels) = both_logits(name, angles, 'float64')
    head = d2lf_torch.MarginLogits(len(weight), x.shape[1], S, *SETTINGS[name])
    head.double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
    xt = torch.from_numpy(x).requires_grad_()
    F.cross_entropy(head(xt, torch.from_numpy(labels)),
                    torch.from_numpy(labels), reduction='sum').backward()
    head_mx = d2lf_mx.MarginLogits(len(weight), x.shape[1], S,
                                   *SETTINGS[name])
    head_mx.initialize()
    head_mx.cast('float64')
    head_mx.weight.set_data(mxnp.array(weight))
    xm = mxnp.array(x)
    xm.attach_grad()
    with autograd.record():
        logits = head_mx(xm, mxnp.array(labels, dtype='int32'))
        loss = -npx.log_softmax(logits)
        loss = npx.pick(loss, mxnp.array(labels, dtype='int32')).sum()
    loss.backward()
    onp.testing.assert_allclose(xt.grad.numpy(), xm.grad.asnumpy(),
                                rtol=1e-7, atol=1e-9)
    onp.testing.assert_allclose(head.weight.grad.numpy(),
                                head_mx.weight.grad().asnumpy(),
                                rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize('name', list(SETTINGS))
@pytest.mark.parametrize('offset', [0.0, 1e-6, 1e-3])
@pytest.mark.parametrize('sign', [1.0, -1.0], ids=['theta0', 'theta_pi'])
def test_gradients_finite_near_0_and_pi(name, offset, sign):
    num_classes, dim = 5, 8
    torch.manual_seed(0)
    head = d2lf_torch.MarginLogits(num_classes, dim, S, *SETTINGS[name])
    labels = torch.arange(num_classes)
    # Each embedding at the angle `offset` from its own class weight (sign
    # 1) or from the opposite direction (sign -1): theta near 0 or near pi.
    w = head.weight.detach()
    w = w / w.norm(dim=1, keepdim=True)
    u = torch.randn(num_classes, dim)
    u = u - (u * w).sum(dim=1, keepdim=True) * w
    u = u / u.norm(dim=1, keepdim=True)
    x = (sign * math.cos(offset) * w + math.sin(offset) * u).requires_grad_()
    logits = head(x, labels)
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(head.weight.grad).all()


def torch_sizes(net, trainable_only):
    """Sorted sizes of a PyTorch module's parameters (and statistics)."""
    if trainable_only:
        return sorted(p.numel() for p in net.parameters() if p.requires_grad)
    return sorted(t.numel() for t in net.state_dict().values()
                  if t.is_floating_point())


def mxnet_sizes(net, trainable_only):
    return sorted(math.prod(p.shape) for p in net.collect_params().values()
                  if p.grad_req != 'null' or not trainable_only)


@pytest.mark.parametrize('depth', DEPTHS)
@pytest.mark.parametrize('width', WIDTHS)
def test_parameter_counts_equal_across_frameworks(depth, width):
    with torch.device('meta'):  # shapes only: nothing allocated
        net = d2lf_torch.face_resnet(depth, width)
    net_mx = d2lf_mx.face_resnet(depth, width)  # not initialized: shapes
    for trainable_only in (True, False):
        count = d2lf_torch.count_parameters(net, trainable_only)
        assert count == d2lf_mx.count_parameters(net_mx, trainable_only)
        # Not only the totals: every tensor has its counterpart.
        assert torch_sizes(net, trainable_only) == mxnet_sizes(
            net_mx, trainable_only)
    # The step counters of the BN layers are not counted.
    assert any(not t.is_floating_point() for t in net.state_dict().values())


def test_same_weights_give_same_embeddings():
    # Copy every MXNet parameter and statistic into the PyTorch network, in
    # the order both define them, then compare the embeddings in inference
    # mode: the two tabs build the same function, not only the same sizes.
    net_mx = d2lf_mx.face_resnet(18, width=0.125, embedding_size=32)
    net_mx.initialize(init.Xavier())
    rng = onp.random.default_rng(6)
    values = []
    for p in net_mx.collect_params().values():
        if 'var' in p.name:
            value = rng.uniform(0.5, 1.5, size=p.shape)
        elif p.grad_req == 'null' and 'gamma' in p.name:
            value = onp.ones(p.shape)  # the fixed scale of the last BN
        else:
            value = rng.normal(scale=0.3, size=p.shape)
        p.set_data(mxnp.array(value, dtype='float32'))
        values.append(value)
    net = d2lf_torch.face_resnet(18, width=0.125, embedding_size=32)
    state = {k: v for k, v in net.state_dict().items()
             if v.is_floating_point()}
    assert len(state) == len(values)
    with torch.no_grad():
        for (key, tensor), value in zip(state.items(), values):
            assert tensor.numel() == value.size, key
            tensor.copy_(torch.from_numpy(value).reshape(tensor.shape))
    net.eval()
    X = rng.uniform(size=(2, 3, 112, 112)).astype('float32')
    want = net_mx(mxnp.array(X)).asnumpy()
    with torch.no_grad():
        got = net(torch.from_numpy(X)).numpy()
    onp.testing.assert_allclose(got, want, rtol=1e-3,
                                atol=1e-3 * onp.abs(want).max())


def test_output_shape_and_training_step():
    torch.manual_seed(0)
    net = d2lf_torch.face_resnet(18, width=0.125, embedding_size=128,
                                 dropout=0.2)
    X = torch.rand(3, 3, 112, 112)
    Y = net(X)  # training mode: batch statistics, dropout
    assert Y.shape == (3, 128)
    Y.sum().backward()
    assert all(p.grad is not None for p in net.parameters()
               if p.requires_grad)
    # The fixed scale of the embedding BN gets no gradient.
    assert net.head[-1].weight.grad is None
    net.eval()
    with torch.no_grad():
        assert net(X).shape == (3, 128)


def test_face_resnet_initializes_as_mxnet_xavier():
    # The same distributions as the MXNet tab's init.Xavier(): convolution
    # and linear weights uniform with a = sqrt(6 / (fan_in + fan_out)), the
    # bias 0, BN scales 1 and shifts 0, PReLU slopes 0.25. mean(w^2) of n
    # uniform draws has a relative standard error of 0.894 / sqrt(n); we
    # allow 8 of them, which PyTorch's default (a = 1 / sqrt(fan_in)) fails
    # for every layer but the stem.
    torch.manual_seed(0)
    net = d2lf_torch.face_resnet(18, width=0.25, embedding_size=64)
    weights = 0
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.detach().double()
            fan_in = w[0].numel()
            fan_out = w.shape[0] * w[0, 0].numel()
            a = math.sqrt(6 / (fan_in + fan_out))
            tolerance = 8 * math.sqrt(4 / 45) * 3 / math.sqrt(w.numel())
            assert float(w.abs().max()) <= a * (1 + 1e-6)
            ratio = float((w ** 2).mean()) / (a * a / 3)
            assert abs(ratio - 1) <= tolerance, m
            assert (abs((fan_in + fan_out) / (6 * fan_in) - 1) > tolerance
                    or fan_in == 27)
            if m.bias is not None:
                assert (m.bias == 0).all()
            weights += 1
        elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            assert (m.weight == 1).all() and (m.bias == 0).all()
        elif isinstance(m, torch.nn.PReLU):
            assert (m.weight == 0.25).all()
    assert weights == 2 * 8 + 4 + 1 + 1  # 16 body, 4 shortcuts, stem, fc


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_last_layers_stay_float32_under_autocast(dtype):
    # As in arcface_torch's iresnet.py: the network runs under autocast
    # up to the flattened features; the fully connected layer and the last
    # batch normalization compute in float32 (CPU autocast stands in for
    # CUDA's here; the code is the same).
    net = d2lf_torch.face_resnet(18, width=0.125, embedding_size=32)
    seen, conv_out = {}, []

    def record(i):
        def hook(module, args, out):  # returns None: the output unchanged
            seen[i] = (args[0].dtype, out.dtype)
        return hook
    for i, m in enumerate(net.head):
        m.register_forward_hook(record(i))
    net.stem[0].register_forward_hook(
        lambda m, args, out: conv_out.append(out.dtype) and None)
    with torch.autocast('cpu', dtype):
        Y = net(torch.rand(2, 3, 112, 112))
    assert conv_out == [dtype]  # the convolutions in reduced precision
    assert seen[3] == (torch.float32, torch.float32)  # fully connected
    assert seen[4] == (torch.float32, torch.float32)  # embedding BN
    assert Y.dtype == torch.float32
    # Without autocast nothing changes, in float64 too.
    net64 = d2lf_torch.face_resnet(18, width=0.125, embedding_size=32).double()
    assert net64(torch.rand(2, 3, 112, 112, dtype=torch.float64)).dtype == (
        torch.float64)

