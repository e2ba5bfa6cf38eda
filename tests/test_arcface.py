"""Face-ResNet and the margin logits of section `arcface`."""
import math

import numpy as onp
import pytest
import mxnet as mx
from mxnet import autograd, gluon, init, np, npx

from d2l_face import mxnet as d2lf

npx.set_np()

SETTINGS = d2lf.MARGIN_SETTINGS  # name -> (m1, m2, m3)
S = 64.0


def make_head(num_classes, embedding_size, m, s=S, seed=0):
    """A MarginLogits layer with deterministic random class weights."""
    head = d2lf.MarginLogits(num_classes, embedding_size, s, *m)
    head.initialize()
    rng = onp.random.default_rng(seed)
    head.weight.set_data(np.array(
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
    got = head(np.array(x, dtype='float32'),
               np.array(labels, dtype='int32')).asnumpy()
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
    got = head(np.array(x, dtype='float32'),
               np.array(labels, dtype='int32')).asnumpy()
    target = got[onp.arange(n), labels]
    # The documented fallback: s * (cos(theta) - (1 + cos(theta_max)) - m3).
    want = S * (onp.cos(angles) - 1 - math.cos(theta_max) - m3)
    onp.testing.assert_allclose(target, want, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize('name', list(SETTINGS))
def test_target_logit_is_continuous_and_decreasing(name):
    m1, m2, m3 = SETTINGS[name]
    theta = onp.linspace(0, math.pi, 20001)
    curve = d2lf.margin_target_logit(np.array(theta, dtype='float64'),
                                     1.0, m1, m2, m3).asnumpy()
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
def test_sphereface_penalty_rises_peaks_and_falls(m1):
    # The penalty cos(theta) - target logit / s is cos(theta) - cos(m1 theta)
    # up to theta_max = pi / m1. It is bounded: it rises while its
    # derivative m1 sin(m1 theta) - sin(theta) is positive, peaks where
    # that vanishes, falls until theta_max, and stays at the constant
    # 1 + cos(theta_max) of the fallback beyond.
    theta_max = math.pi / m1
    peak = bisect(lambda t: m1 * math.sin(m1 * t) - math.sin(t),
                  1e-3, theta_max)
    theta = onp.linspace(0, math.pi, 20001)
    logit = d2lf.margin_target_logit(np.array(theta, dtype='float64'), 1.0,
                                     m1).asnumpy()
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


@pytest.mark.parametrize('name', list(SETTINGS))
@pytest.mark.parametrize('sign', [1.0, -1.0], ids=['theta0', 'theta_pi'])
def test_gradients_finite_when_parallel_or_antiparallel(name, sign):
    num_classes, dim = 5, 8
    head = make_head(num_classes, dim, SETTINGS[name])
    labels = np.array([0, 1, 2, 3, 4], dtype='int32')
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


def test_margin_logits_rejects_bad_settings():
    for kwargs in [dict(s=0.0), dict(m1=0.0), dict(m2=-0.1),
                   dict(m2=math.pi)]:
        with pytest.raises(ValueError):
            d2lf.MarginLogits(10, 8, **kwargs)


# Parameter counts. "Trainable" means grad_req != 'null': conv kernels
# (no biases), BN gamma and beta, PReLU slopes (one per channel), and the
# dense layer's weight and bias. BN running mean and variance, and the gamma
# of the embedding BN (fixed to 1), are stored but not trained.

def bn(c):
    return 2 * c  # gamma and beta


def unit(c_in, c):
    """BN, conv3x3, BN, PReLU, conv3x3, BN; the shortcut is counted apart."""
    return bn(c_in) + 9 * c_in * c + bn(c) + c + 9 * c * c + bn(c)


def expected_counts(depth, width, embedding_size=512):
    """(trainable, stored) parameter counts of Face-ResNet from its layout."""
    chans = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    units = d2lf.FACE_RESNET_UNITS[depth]
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
def test_parameter_counts_match_architecture(depth, width):
    net = d2lf.face_resnet(depth, width)
    params = net.collect_params().values()
    trainable = sum(math.prod(p.shape) for p in params
                    if p.grad_req != 'null')
    stored = sum(math.prod(p.shape) for p in params)
    assert (trainable, stored) == expected_counts(depth, width)
    assert d2lf.count_parameters(net) == trainable
    assert d2lf.count_parameters(net, trainable_only=False) == stored


def test_known_full_width_sizes():
    # Published IResNet sizes: about 24.0 M (r18) and 65.2 M (r100).
    assert round(d2lf.count_parameters(d2lf.face_resnet(18)) / 1e6, 1) == 24.0
    assert round(d2lf.count_parameters(d2lf.face_resnet(100)) / 1e6,
                 1) == 65.2


def test_counts_unchanged_by_forward_pass():
    net = d2lf.face_resnet(18, width=0.125, embedding_size=64)
    before = d2lf.count_parameters(net, trainable_only=False)
    net.initialize(init.Xavier())
    net(np.random.uniform(size=(1, 3, 112, 112)))
    assert d2lf.count_parameters(net, trainable_only=False) == before
    assert before == expected_counts(18, 0.125, 64)[1]


@pytest.mark.parametrize('hybridize', [False, True])
def test_output_shape(hybridize):
    net = d2lf.face_resnet(18, width=0.125, embedding_size=128, dropout=0.2)
    net.initialize(init.Xavier())
    if hybridize:
        net.hybridize()
    X = np.random.uniform(size=(3, 3, 112, 112))
    assert net(X).shape == (3, 128)
    with autograd.record():  # training mode: batch statistics, dropout
        Y = net(X)
    Y.backward()
    assert Y.shape == (3, 128)


def test_hybridized_equals_imperative():
    net = d2lf.face_resnet(18, width=0.125, embedding_size=32)
    net.initialize(init.Xavier())
    X = np.random.uniform(size=(2, 3, 112, 112))
    imperative = net(X).asnumpy()
    net.hybridize()
    onp.testing.assert_allclose(net(X).asnumpy(), imperative, rtol=1e-4,
                                atol=1e-5)


def test_input_is_normalized_inside():
    # Pixels in [0, 1]: the network maps 0.5 to 0, so a constant grey image
    # gives the same output as feeding zeros through the stem directly.
    net = d2lf.face_resnet(18, width=0.125, embedding_size=16)
    net.initialize(init.Xavier())
    grey = np.full((1, 3, 112, 112), 0.5)
    zeros = np.zeros((1, 3, 112, 112))
    direct = net.head(net.stages(net.stem(zeros)))
    onp.testing.assert_allclose(net(grey).asnumpy(), direct.asnumpy(),
                                atol=1e-6)


@pytest.mark.parametrize('depth, width', [(17, 1.0), (152, 1.0), ('18', 1.0),
                                          (18, 0.0), (18, -0.5)])
def test_bad_depth_or_width(depth, width):
    with pytest.raises(ValueError):
        d2lf.face_resnet(depth, width)


def test_channel_prelu_matches_gluon_prelu():
    from mxnet.gluon import nn
    X = np.random.normal(size=(2, 3, 5, 5))
    slopes = np.array([0.25, -0.5, 2.0])
    builtin, ours = nn.PReLU(in_channels=3), d2lf.ChannelPReLU(3)
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
        y.backward(np.cos(X))
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
    net = d2lf.face_resnet(18, width=0.25, embedding_size=64)
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


def test_margin_weights_start_normal_std_001():
    mx.random.seed(0)
    head = d2lf.MarginLogits(200, 64)
    head.initialize()
    w = head.weight.data().asnumpy().astype('float64')
    # mean(w^2) of n normal draws: standard error sqrt(2 / n) relative
    assert abs((w ** 2).mean() / 0.01 ** 2 - 1) <= 8 * math.sqrt(2 / w.size)
    assert abs(w.mean()) <= 8 * 0.01 / math.sqrt(w.size)
