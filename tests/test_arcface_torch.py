"""The PyTorch tab of section `arcface` against the MXNet tab and formulas."""
import math

import numpy as onp
import pytest
import torch
from mxnet import autograd, init, npx
from mxnet import np as mxnp
from torch.nn import functional as F

from d2l_face import mxnet as d2lf_mx
from d2l_face import torch as d2lf

npx.set_np()

SETTINGS = d2lf.MARGIN_SETTINGS  # name -> (m1, m2, m3)
S = 64.0
DEPTHS = [18, 34, 50, 100]
WIDTHS = [0.125, 0.25, 0.5, 1.0]


def test_import_gives_the_saved_names():
    for name in ['FaceResidual', 'FaceResNet', 'face_resnet',
                 'count_parameters', 'margin_target_logit', 'MarginLogits',
                 'MARGIN_SETTINGS', 'FACE_RESNET_UNITS']:
        assert hasattr(d2lf, name), name
    # Plain data is written once, for both tabs.
    assert d2lf.MARGIN_SETTINGS == d2lf_mx.MARGIN_SETTINGS
    assert d2lf.FACE_RESNET_UNITS == d2lf_mx.FACE_RESNET_UNITS


def embeddings_at_angles(weight, labels, angles, rng):
    """Embeddings at the given angles to their class weight rows (float64)."""
    w = weight[labels] / onp.linalg.norm(weight[labels], axis=1,
                                         keepdims=True)
    u = rng.normal(size=w.shape)  # made orthogonal to each weight row
    u -= (u * w).sum(axis=1, keepdims=True) * w
    u /= onp.linalg.norm(u, axis=1, keepdims=True)
    scale = rng.uniform(0.5, 3.0, size=(len(labels), 1))
    return scale * (onp.cos(angles)[:, None] * w +
                    onp.sin(angles)[:, None] * u)


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
    head = d2lf.MarginLogits(num_classes, dim, S, *m)
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
        got = d2lf.margin_target_logit(torch.from_numpy(theta), S, *m)
        got_mx = d2lf_mx.margin_target_logit(mxnp.array(theta), S, *m)
        onp.testing.assert_allclose(got.numpy(), got_mx.asnumpy(), rtol=0,
                                    atol=1e-9)


def formula_logits(x, weight, labels, s, m1, m2, m3):
    """The margin logits in float64 from the formula, with the fallback."""
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
    return logits


@pytest.mark.parametrize('name', list(SETTINGS))
def test_loss_equals_formula(name):
    angles = onp.random.default_rng(4).uniform(0.1, math.pi - 0.1, 40)
    got, _, (x, weight, labels) = both_logits(name, angles, 'float64')
    want = formula_logits(x, weight, labels, S, *SETTINGS[name])
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
    head = d2lf.MarginLogits(len(weight), x.shape[1], S, *SETTINGS[name])
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
    head = d2lf.MarginLogits(num_classes, dim, S, *SETTINGS[name])
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


def test_margin_logits_rejects_bad_settings():
    for kwargs in [dict(s=0.0), dict(m1=0.0), dict(m2=-0.1),
                   dict(m2=math.pi)]:
        with pytest.raises(ValueError, match='need a finite s > 0'):
            d2lf.MarginLogits(10, 8, **kwargs)


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
        net = d2lf.face_resnet(depth, width)
    net_mx = d2lf_mx.face_resnet(depth, width)  # not initialized: shapes
    for trainable_only in (True, False):
        count = d2lf.count_parameters(net, trainable_only)
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
    net = d2lf.face_resnet(18, width=0.125, embedding_size=32)
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
    net = d2lf.face_resnet(18, width=0.125, embedding_size=128, dropout=0.2)
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


def test_input_is_normalized_inside():
    net = d2lf.face_resnet(18, width=0.125, embedding_size=16).eval()
    grey = torch.full((1, 3, 112, 112), 0.5)
    zeros = torch.zeros(1, 3, 112, 112)
    with torch.no_grad():
        direct = net.head(net.stages(net.stem(zeros)))
        torch.testing.assert_close(net(grey), direct)


@pytest.mark.parametrize('depth, width', [(17, 1.0), (152, 1.0), ('18', 1.0),
                                          (18, 0.0), (18, -0.5)])
def test_bad_depth_or_width(depth, width):
    with pytest.raises(ValueError, match='must be'):
        d2lf.face_resnet(depth, width)


def test_face_resnet_initializes_as_mxnet_xavier():
    # The same distributions as the MXNet tab's init.Xavier(): convolution
    # and linear weights uniform with a = sqrt(6 / (fan_in + fan_out)), the
    # bias 0, BN scales 1 and shifts 0, PReLU slopes 0.25. mean(w^2) of n
    # uniform draws has a relative standard error of 0.894 / sqrt(n); we
    # allow 8 of them, which PyTorch's default (a = 1 / sqrt(fan_in)) fails
    # for every layer but the stem.
    torch.manual_seed(0)
    net = d2lf.face_resnet(18, width=0.25, embedding_size=64)
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


def test_margin_weights_start_normal_std_001():
    torch.manual_seed(0)
    w = d2lf.MarginLogits(200, 64).weight.detach().double()
    assert abs(float((w ** 2).mean()) / 0.01 ** 2 - 1) <= 8 * math.sqrt(
        2 / w.numel())
    assert abs(float(w.mean())) <= 8 * 0.01 / math.sqrt(w.numel())


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_last_layers_stay_float32_under_autocast(dtype):
    # As in arcface_torch's iresnet.py: the network runs under autocast
    # up to the flattened features; the fully connected layer and the last
    # batch normalization compute in float32 (CPU autocast stands in for
    # CUDA's here; the code is the same).
    net = d2lf.face_resnet(18, width=0.125, embedding_size=32)
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
    net64 = d2lf.face_resnet(18, width=0.125, embedding_size=32).double()
    assert net64(torch.rand(2, 3, 112, 112, dtype=torch.float64)).dtype == (
        torch.float64)
