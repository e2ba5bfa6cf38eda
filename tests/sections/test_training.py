"""The training section: the training step and trainer of each tab, the
training loop, what it refuses, and the saved model files.

A test that holds for both tabs takes the `d2lf` fixture; the others import
the one library they test."""
import inspect
import math
import os

import numpy as onp
import pytest
import torch
from mxnet import gluon, init, np, npx
from torch import nn

from d2l_face import mxnet as d2lf_mx
from d2l_face import torch as d2lf_torch
from synthetic import HANG, deadline, synthetic_pairs
from tiny_models import (cpus, small_batches, tiny_dataset,
                         tiny_face_net_and_margin)

TORCH_CPU = [torch.device('cpu')]


def loss_fn():
    return nn.CrossEntropyLoss(reduction='none')


class OneShot:
    """Batches that can be gone through once, like a generator's."""
    def __init__(self, batches):
        self.batches, self.length = iter(batches), len(batches)

    def __len__(self):
        return self.length

    def __iter__(self):
        return self.batches


# ------------------------------------------------------------- both tabs

def test_facerec_batches_goes_round_as_often_as_needed(d2lf):
    batches = [(i, -i) for i in range(3)]
    assert list(d2lf.facerec_batches(batches, 7)) == \
        batches + batches + batches[:1]
    generator = (batch for batch in batches)  # no len, gone through once
    with pytest.raises(ValueError, match='after step 3: generator of '
                                         'length [?]'):
        list(d2lf.facerec_batches(generator, 4))


@pytest.mark.parametrize('plot', [False, True])
def test_fewer_images_than_a_batch_raise_at_once(d2lf, standin_root, plot):
    from synthetic import NUM_CLASSES, PER_CLASS
    data_dir = os.path.join(standin_root, 'faces-casia-ultrasmall')
    num_images = NUM_CLASSES * PER_CLASS
    train_iter, verification_sets = d2lf.load_data_facerec(
        data_dir, ['lfw_small'], batch_size=num_images + 1)
    net, margin = tiny_face_net_and_margin(d2lf, NUM_CLASSES)
    with deadline(HANG), pytest.raises(
            ValueError, match=f'no batch: {num_images} images in batches '
                              f'of {num_images + 1}'):
        d2lf.train_facerec(net, margin, train_iter, verification_sets,
                           num_steps=5, lr=0.1, devices=cpus(d2lf), plot=plot)
    d2lf.d2l.plt.close('all')


@pytest.mark.parametrize('name, value', [
    ('num_steps', 0), ('num_steps', -3), ('num_steps', 2.5),
    ('eval_every', 0), ('log_every', 0)])
def test_step_counts_below_one_raise_at_once(d2lf, name, value):
    net, margin = tiny_face_net_and_margin(d2lf)
    counts = dict(num_steps=4, eval_every=2, log_every=2)
    counts[name] = value
    with deadline(HANG), pytest.raises(ValueError, match=f'{name} must be'):
        d2lf.train_facerec(net, margin, tiny_dataset(d2lf), {}, lr=0.1,
                           devices=cpus(d2lf), plot=False, **counts)


def test_an_empty_list_of_batches_raises_at_once(d2lf):
    net, margin = tiny_face_net_and_margin(d2lf)
    with deadline(HANG), pytest.raises(ValueError, match='list of length 0'):
        d2lf.train_facerec(net, margin, [], {}, num_steps=3, lr=0.1,
                           devices=cpus(d2lf), plot=False)


def test_a_pass_without_batches_raises_instead_of_looping(d2lf):
    net, margin = tiny_face_net_and_margin(d2lf)
    train_iter = OneShot(tiny_dataset(d2lf)[:1])
    with deadline(60), pytest.raises(
            ValueError, match='no batch, after step 1: OneShot of length 1'):
        d2lf.train_facerec(net, margin, train_iter, {}, num_steps=3, lr=0.1,
                           devices=cpus(d2lf), plot=False)


@pytest.mark.parametrize('change', ['lr=1e8', 'm3=nan'])
def test_divergence_stops_at_the_first_non_finite_loss(d2lf, change):
    net, margin = tiny_face_net_and_margin(d2lf)
    lr = 1e8 if change == 'lr=1e8' else 0.05
    if change == 'm3=nan':
        margin.m3 = float('nan')  # set after the layer checked it
    history = []
    with pytest.raises(d2lf.TrainingDiverged,
                       match=r'diverged at step \d+: the mean loss of its '
                             r'batch is (nan|inf)'):
        history = d2lf.train_facerec(net, margin, small_batches(d2lf), {},
                                     num_steps=20, lr=lr, log_every=1,
                                     devices=cpus(d2lf), plot=False)
    assert history == []
    assert issubclass(d2lf.TrainingDiverged, FloatingPointError)


@pytest.mark.parametrize('name,value', [
    ('lr', float('nan')), ('lr', 0.0), ('lr', -0.1), ('lr', float('inf')),
    ('wd', -1e-4), ('momentum', float('nan'))])
def test_sgd_settings_are_checked_before_the_first_step(d2lf, name, value):
    net, margin = tiny_face_net_and_margin(d2lf)
    settings = dict(lr=0.05, wd=5e-4, momentum=0.9)
    settings[name] = value
    with pytest.raises(ValueError, match=f'{name} must be a finite'):
        d2lf.train_facerec(net, margin, small_batches(d2lf), {}, num_steps=2,
                           devices=cpus(d2lf), plot=False, **settings)


@pytest.mark.parametrize('margin', [
    dict(s=float('inf')), dict(s=float('nan')), dict(m1=float('inf')),
    dict(m2=float('nan')), dict(m3=float('nan')), dict(m3=float('-inf'))])
def test_margin_layers_refuse_scales_and_margins_that_are_not_finite(d2lf,
                                                                     margin):
    with pytest.raises(ValueError, match='need a finite s > 0'):
        d2lf.MarginLogits(4, 16, **margin)
    with pytest.raises(ValueError, match='need a finite s > 0'):
        d2lf.ShardedMarginLoss(4, 16, cpus(d2lf, 2), **margin)


def test_a_batch_of_one_names_the_batch_norm_limit(d2lf):
    net, margin = tiny_face_net_and_margin(d2lf)
    with pytest.raises(ValueError, match='batch of 1 images on 1 device.*'
                                         'at least 2 images per device'):
        d2lf.train_facerec(net, margin, small_batches(d2lf, batch_size=1), {},
                           num_steps=2, lr=0.05, devices=cpus(d2lf),
                           plot=False)


def test_saved_network_loads_with_the_same_embeddings(d2lf, tmp_path):
    config = dict(d2lf.CPU_CONFIG, width=0.0625, embedding_size=16)
    net, _ = tiny_face_net_and_margin(d2lf)
    images, _ = synthetic_pairs(num_pairs=2, size=112)
    before = d2lf.embed_pairs(net, images, devices=cpus(d2lf))
    path = str(tmp_path / 'models' / 'net.params')
    d2lf.save_face_net(net, path)  # makes the folder
    assert os.listdir(tmp_path / 'models') == ['net.params']  # no temporary
    clone = d2lf.load_face_net(config, path, cpus(d2lf))
    after = d2lf.embed_pairs(clone, images, devices=cpus(d2lf))
    assert onp.abs(before - after).max() < 1e-6


def test_the_model_file_is_named_after_the_configuration(d2lf):
    import d2l_face
    path = d2lf.face_net_path(dict(d2lf.CPU_CONFIG, width=0.0625))
    assert os.path.dirname(path) == os.path.join(d2l_face.data_root(),
                                                 'models')
    assert os.path.basename(path).startswith('face_resnet18_w0.0625_e128.')


def test_net_and_margin_follow_the_configuration(d2lf):
    config = dict(d2lf.CPU_CONFIG, width=0.0625, embedding_size=16)
    net, margin = d2lf.facerec_net_and_margin(config, 5, cpus(d2lf))
    images, _ = synthetic_pairs(num_pairs=1, size=112)
    assert d2lf.embed_pairs(net, images, devices=cpus(d2lf)).shape == (2, 16)
    assert tuple(margin.weight.shape) == (5, 16)
    args = d2lf.facerec_train_args(config)  # what train_facerec takes
    assert 'lr' in args and set(args) <= set(
        inspect.signature(d2lf.train_facerec).parameters)
    assert all(args[key] == config[key] for key in args)


# ------------------------------------------------------------ MXNet only

def test_training_smoke_loss_decreases_mxnet():
    """32 steps after a warm-up of 8, at a rate of 0.02. With 16 steps, no
    warm-up and 0.05, seeds 0-2 (one thread) ended at 0.22, 0.63 and 0.38
    of the first loss; with the warm-up at 0.05, seed 14 of 0-19 ended at
    1.6 times it. As here, over seeds 0-19 (one thread) the last loss was
    at most 0.10 of the first (median below 0.001) and the accuracy grew for
    each."""
    npx.random.seed(0)
    onp.random.seed(0)
    train_iter = tiny_dataset(d2lf_mx)
    net = d2lf_mx.face_resnet(18, width=0.0625, embedding_size=16)
    net.initialize(init.Xavier())
    net.hybridize()
    margin = d2lf_mx.MarginLogits(4, 16, s=16.0, m2=0.2)
    margin.initialize()
    images, issame = synthetic_pairs(num_pairs=40, size=112)
    history = d2lf_mx.train_facerec(
        net, margin, train_iter, {'tiny': (images, issame)}, num_steps=32,
        lr=0.02, warmup_steps=8, eval_every=16, log_every=8,
        devices=[npx.cpu()], plot=False)
    losses = [loss for _, loss in history['train loss']]
    assert len(losses) == 4 and len(history['tiny']) == 2
    assert losses[-1] < 0.5 * losses[0]
    assert history['train acc'][-1][1] > history['train acc'][0][1]
    assert history['train loss'][-1][0] == pytest.approx(32 / len(train_iter))


def two_context_model(**sgd):
    """A tiny net, margin and SGD trainer on two CPU contexts (as GPUs)."""
    devices = cpus(d2lf_mx, 2)
    npx.random.seed(0)
    net = d2lf_mx.face_resnet(18, width=0.0625, embedding_size=16)
    net.initialize(init.Xavier(), ctx=devices)
    margin = d2lf_mx.MarginLogits(4, 16, s=16.0, m2=0.2)
    margin.initialize(ctx=devices)
    trainer = gluon.Trainer(list(net.collect_params().values()) +
                            list(margin.collect_params().values()), 'sgd',
                            dict(learning_rate=0.05, **sgd))
    return devices, net, margin, trainer


def test_training_step_on_two_devices_keeps_copies_equal():
    """The multi-GPU path, with two CPU contexts standing in for GPUs."""
    devices, net, margin, trainer = two_context_model(momentum=0.9)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    X, y = tiny_dataset(d2lf_mx, batch_size=16)[0]
    total, correct = d2lf_mx.train_face_step(net, margin, loss, trainer, X, y,
                                          devices)
    assert onp.isfinite(total) and 0 <= correct <= 16
    trained = [p for p in net.collect_params().values()
               if p.grad_req != 'null'] + [margin.weight]
    for param in trained:  # the trainer summed the gradients of both parts
        copies = [d.asnumpy() for d in param.list_data()]
        assert onp.array_equal(copies[0], copies[1]), param.name


def bn_statistics(net):
    """name -> the copies of each BN running statistic, as NumPy arrays."""
    return {p.name: [d.asnumpy() for d in p.list_data()]
            for p in net.collect_params().values()
            if p.name.endswith(('running_mean', 'running_var'))}


def test_bn_statistics_averaged_as_save_parameters_averages(tmp_path):
    """Two CPU contexts stand in for GPUs; each sees its half of a batch."""
    devices, net, margin, trainer = two_context_model()
    rng = onp.random.default_rng(0)  # different images in the two halves
    X = np.array(rng.uniform(size=(16, 3, 112, 112)), dtype='float32')
    y = np.array(rng.integers(0, 4, size=16), dtype='int64')
    # Two steps: the trainer's first copies device 0's values of every
    # array it was given, the statistics too, to the other devices.
    for _ in range(2):
        d2lf_mx.train_face_step(net, margin,
                             gluon.loss.SoftmaxCrossEntropyLoss(), trainer,
                             X, y, devices)
    before = bn_statistics(net)
    # a mean and a variance for each of 31 BN layers: the stem's, 3 in each
    # of 8 units, 4 shortcuts', 2 in the head
    assert len(before) == 2 * 31
    assert any(not onp.array_equal(*copies) for copies in before.values())
    # What MXNet saves: the mean of the copies.
    path = str(tmp_path / 'net.params')
    net.save_parameters(path)
    clone = d2lf_mx.face_resnet(18, width=0.0625, embedding_size=16)
    clone.load_parameters(path, ctx=devices)
    saved = {p.name: c.data(devices[1]).asnumpy() for p, c in zip(
        net.collect_params().values(), clone.collect_params().values())}
    trained = {p.name: p.data(devices[0]).asnumpy()
               for p in net.collect_params().values()
               if p.grad_req != 'null'}
    d2lf_mx.average_bn_statistics(net)
    after = bn_statistics(net)
    for name, (a, b) in before.items():
        onp.testing.assert_allclose(after[name][0], (a + b) / 2, rtol=1e-6,
                                    atol=1e-7)
        assert onp.array_equal(after[name][0], after[name][1]), name
        assert onp.array_equal(after[name][0], saved[name]), name
    for p in net.collect_params().values():  # nothing else changed
        if p.grad_req != 'null':
            assert onp.array_equal(p.data(devices[1]).asnumpy(),
                                   trained[p.name]), p.name
    # So the network evaluates on both devices as its reloaded copy does.
    images, _ = synthetic_pairs(num_pairs=4, size=112)
    assert onp.array_equal(d2lf_mx.embed_pairs(net, images, 3, devices),
                           d2lf_mx.embed_pairs(clone, images, 3, devices))


def test_train_facerec_leaves_one_set_of_bn_statistics():
    devices = cpus(d2lf_mx, 2)
    npx.random.seed(0)
    net = d2lf_mx.face_resnet(18, width=0.0625, embedding_size=16)
    net.initialize(init.Xavier())
    margin = d2lf_mx.MarginLogits(4, 16, s=16.0, m2=0.2)
    margin.initialize()
    images, issame = synthetic_pairs(num_pairs=10, size=112)
    d2lf_mx.train_facerec(net, margin, tiny_dataset(d2lf_mx, batch_size=16),
                       {'tiny': (images, issame)}, num_steps=2, lr=0.05,
                       eval_every=2, log_every=1, devices=devices,
                       plot=False)
    for name, (a, b) in bn_statistics(net).items():
        assert onp.array_equal(a, b), name


def test_train_on_small_standin_through_the_data_loader_mxnet(standin_root):
    """Two passes over a 30-image stand-in, as the notebook trains."""
    data_dir = os.path.join(standin_root, 'faces-casia-ultrasmall')
    train_iter, verification_sets = d2lf_mx.load_data_facerec(
        data_dir, ['lfw_small'], batch_size=10)
    npx.random.seed(0)
    net = d2lf_mx.face_resnet(18, width=0.0625, embedding_size=16)
    net.initialize(init.Xavier())
    num_classes = d2lf_mx.read_facerec_meta(data_dir)[1]
    margin = d2lf_mx.MarginLogits(num_classes, 16, s=16.0, m2=0.5)
    margin.initialize()
    history = d2lf_mx.train_facerec(
        net, margin, train_iter, verification_sets,
        num_steps=2 * len(train_iter),
        lr=0.05, warmup_steps=2, eval_every=len(train_iter), log_every=1,
        devices=[npx.cpu()], plot=False)
    assert len(history['train loss']) == 2 * len(train_iter)
    assert [epoch for epoch, _ in history['lfw_small']] == [1, 2]
    result = d2lf_mx.evaluate_verification(net, verification_sets['lfw_small'],
                                        devices=[npx.cpu()])
    assert result['acc'] == history['lfw_small'][-1][1]
    assert 0 <= result['val'] <= 1 and 0 <= result['far'] <= 1


def test_step_batch_size_divides_the_gradient_mxnet():
    """A doubled batch_size halves the update, as a halved rate would."""
    X, y = tiny_dataset(d2lf_mx, batch_size=16)[0]
    params = []
    for lr, batch_size in [(0.1, 32), (0.05, None)]:
        net, margin = tiny_face_net_and_margin(d2lf_mx)
        trainer = d2lf_mx.facerec_trainer(net, margin, num_steps=10, lr=lr,
                                          wd=0, momentum=0)
        d2lf_mx.train_face_step(net, margin,
                                gluon.loss.SoftmaxCrossEntropyLoss(),
                                trainer, X, y, [npx.cpu()], batch_size)
        params.append([p.data().asnumpy()
                       for p in net.collect_params().values()])
    for a, b in zip(*params):
        assert onp.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_cpu_config_builds_what_the_section_trains_mxnet():
    config = d2lf_mx.CPU_CONFIG
    assert d2lf_mx.GPU_CONFIG['lr'] == config['lr']  # shared settings
    assert config['margin'] in d2lf_mx.MARGIN_SETTINGS
    net = d2lf_mx.face_resnet(config['depth'], config['width'],
                           config['embedding_size'])
    net.initialize(init.Xavier())
    X = np.zeros((2, 3, 112, 112))
    assert net(X).shape == (2, config['embedding_size'])


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    net = d2lf_mx.face_resnet(18, width=0.0625, embedding_size=16)
    net.initialize(init.Xavier())
    net.hybridize()
    images, _ = synthetic_pairs(num_pairs=2, size=112)
    before = d2lf_mx.embed_pairs(net, images, devices=[npx.cpu()])
    path = str(tmp_path / 'net.params')
    net.save_parameters(path)
    clone = d2lf_mx.face_resnet(18, width=0.0625, embedding_size=16)
    clone.load_parameters(path, ctx=npx.cpu())
    after = d2lf_mx.embed_pairs(clone, images, devices=[npx.cpu()])
    assert onp.array_equal(before, after)


# ---------------------------------------------------------- PyTorch only

def test_import_gives_the_saved_names():
    for name in ['all_devices', 'embed_pairs', 'evaluate_verification',
                 'TrainingBoard', 'train_face_step', 'warmup_cosine',
                 'facerec_trainer', 'facerec_model', 'train_facerec',
                 'CPU_CONFIG', 'GPU_CONFIG', 'set_seeds', 'embed_face',
                 'identify', 'facerec_net_and_margin', 'face_net_path',
                 'save_face_net', 'load_face_net']:
        assert hasattr(d2lf_torch, name), name
    assert d2lf_torch.all_devices() == (
        [torch.device(f'cuda:{i}') for i in range(torch.cuda.device_count())]
        or TORCH_CPU)


def test_state_dict_round_trip_gives_identical_embeddings(tmp_path):
    net, margin = tiny_face_net_and_margin(d2lf_torch)
    # a few steps, so that the running statistics are not the initial ones
    optimizer = d2lf_torch.facerec_trainer(net, margin, 3, 0.05)
    for X, y in tiny_dataset(d2lf_torch)[:3]:
        d2lf_torch.train_face_step(net, margin, loss_fn(), optimizer, X, y,
                                   TORCH_CPU)
    images, _ = synthetic_pairs(num_pairs=2, size=112)
    before = d2lf_torch.embed_pairs(net, images, devices=TORCH_CPU)
    path = str(tmp_path / 'net.pt')
    torch.save(net.state_dict(), path)
    torch.manual_seed(1)  # a clone with other random weights at first
    clone = d2lf_torch.face_resnet(18, width=0.0625, embedding_size=16)
    assert not onp.array_equal(
        d2lf_torch.embed_pairs(clone, images, devices=TORCH_CPU), before)
    clone.load_state_dict(torch.load(path, weights_only=True))
    after = d2lf_torch.embed_pairs(clone, images, devices=TORCH_CPU)
    assert onp.array_equal(before, after)


# ------------------------------------------------- step and schedule

def test_step_reduces_the_loss_on_a_tiny_batch():
    net, margin = tiny_face_net_and_margin(d2lf_torch)
    X, y = tiny_dataset(d2lf_torch, batch_size=16)[0]
    # From Xavier's initialization, at a rate of 0.05 the loss of this one
    # batch jumps about for seeds 0 to 2; at 0.01 it falls.
    optimizer = d2lf_torch.facerec_trainer(net, margin, 30, 0.01, wd=0)
    losses = []
    for _ in range(8):
        total, correct = d2lf_torch.train_face_step(net, margin, loss_fn(),
                                              optimizer, X, y, TORCH_CPU)
        assert isinstance(total, float) and 0 <= correct <= 16
        losses.append(total / 16)
    # Over seeds 0-19 (weights and batch; one thread) the last loss was at
    # most 0.11 of the first (seed 7; median 0.001), though it may rise on
    # the way.
    assert losses[-1] < 0.5 * losses[0]


def test_step_batch_size_divides_the_gradient_pytorch():
    """A doubled batch_size halves the update, as a halved rate would."""
    X, y = tiny_dataset(d2lf_torch, batch_size=16)[0]
    params = []
    for lr, batch_size in [(0.1, 32), (0.05, None)]:
        net, margin = tiny_face_net_and_margin(d2lf_torch)
        optimizer = d2lf_torch.facerec_trainer(net, margin, num_steps=10,
                                               lr=lr, wd=0, momentum=0)
        d2lf_torch.train_face_step(net, margin, loss_fn(), optimizer, X, y,
                                   TORCH_CPU, batch_size)
        params.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_schedule_equals_mxnets_cosine_scheduler():
    from mxnet import lr_scheduler
    net, margin = tiny_face_net_and_margin(d2lf_torch)
    num_steps, warmup, lr = 20, 5, 0.1
    optimizer = d2lf_torch.facerec_trainer(net, margin, num_steps, lr,
                                     warmup_steps=warmup)
    reference = lr_scheduler.CosineScheduler(num_steps, lr, final_lr=0,
                                             warmup_steps=warmup)
    X, y = tiny_dataset(d2lf_torch, batch_size=4)[0]
    for update in range(1, num_steps + 3):  # updates count from 1
        assert optimizer.param_groups[0]['lr'] == \
            pytest.approx(reference(update), abs=1e-12)
        d2lf_torch.train_face_step(net, margin, loss_fn(), optimizer, X, y,
                                   TORCH_CPU)
    assert optimizer.param_groups[0]['lr'] == 0


def test_trainer_leaves_the_fixed_embedding_scale_alone():
    net, margin = tiny_face_net_and_margin(d2lf_torch)
    optimizer = d2lf_torch.facerec_trainer(net, margin, 10, 0.1)
    trained = {id(p) for group in optimizer.param_groups
               for p in group['params']}
    fixed = net.head[-1].weight
    assert not fixed.requires_grad and id(fixed) not in trained
    assert id(margin.weight) in trained
    assert len(trained) == sum(p.requires_grad for p in net.parameters()) + 1


def test_mixed_precision_step_keeps_float32_parameters():
    """The GradScaler path, on the CPU's float16 autocast."""
    net, margin = tiny_face_net_and_margin(d2lf_torch)
    X, y = tiny_dataset(d2lf_torch, batch_size=8)[0]
    optimizer = d2lf_torch.facerec_trainer(net, margin, 10, 0.05)
    scaler = torch.amp.GradScaler('cpu', growth_interval=100)
    before = margin.weight.detach().clone()
    for _ in range(20):  # float16 overflows skip the first steps
        total, correct = d2lf_torch.train_face_step(
            net, margin, loss_fn(), optimizer, X, y, TORCH_CPU, scaler=scaler)
        assert onp.isfinite(total) and 0 <= correct <= 8
        if not torch.equal(before, margin.weight):
            break
    assert not torch.equal(before, margin.weight), 'no step was taken'
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert margin.weight.dtype == torch.float32


def test_a_skipped_step_does_not_move_the_schedule():
    # The schedule advances after optimizer.step(); a GradScaler that finds
    # an infinite gradient does not call it, so the schedule counts updates.
    net, margin = tiny_face_net_and_margin(d2lf_torch)
    num_steps, warmup, lr = 10, 2, 0.1
    optimizer = d2lf_torch.facerec_trainer(net, margin, num_steps, lr,
                                     warmup_steps=warmup)
    scaler = torch.amp.GradScaler('cpu', growth_interval=100)
    X, y = tiny_dataset(d2lf_torch, batch_size=4)[0]
    updates = 0
    for overflow in [True, False, True, True, False, False]:
        before = margin.weight.detach().clone()
        optimizer.zero_grad()
        logits = margin(net(X), y)
        total = loss_fn()(logits, y).mean() * (math.inf if overflow else 1)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        assert torch.equal(before, margin.weight) == overflow
        updates += not overflow
        want = lr * d2lf_torch.warmup_cosine(updates + 1, num_steps, warmup)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(want)


def test_fp16_without_a_gpu_is_refused():
    net, margin = tiny_face_net_and_margin(d2lf_torch)
    with pytest.raises(ValueError, match='needs CUDA'):
        d2lf_torch.facerec_model(net, margin, TORCH_CPU, fp16=True)
    model, scaler = d2lf_torch.facerec_model(net, margin, TORCH_CPU)
    assert model is net and scaler is None


# ----------------------------------------------------------- training loop

def test_training_smoke_loss_decreases_pytorch():
    """32 steps after a warm-up of 8 steps. Without the warm-up the first
    steps were erratic: with one thread, as `make test` runs, seed 0's last
    logged loss was 0.50 of its first and its accuracy did not grow. With
    it and the Xavier initialization, over seeds 0-19 (seed for the data and
    the weights; one thread) the last loss was a median 0.01 of the first,
    at most 0.61 (seed 13; 0.13 the next), and the accuracy grew for each;
    hence the claim: lower, not a set fraction."""
    torch.manual_seed(0)
    train_iter = tiny_dataset(d2lf_torch)
    net, margin = tiny_face_net_and_margin(d2lf_torch)
    images, issame = synthetic_pairs(num_pairs=40, size=112)
    history = d2lf_torch.train_facerec(
        net, margin, train_iter, {'tiny': (images, issame)}, num_steps=32,
        lr=0.05, warmup_steps=8, eval_every=16, log_every=8, devices=TORCH_CPU,
        plot=False)
    losses = [loss for _, loss in history['train loss']]
    assert len(losses) == 4 and len(history['tiny']) == 2
    assert losses[-1] < losses[0]
    assert history['train acc'][-1][1] > history['train acc'][0][1]
    assert history['train loss'][-1][0] == pytest.approx(32 / len(train_iter))
    assert net.training  # evaluation gave the training mode back


def test_train_on_small_standin_through_the_data_loader_pytorch(standin_root):
    """Two passes over a 30-image stand-in, as the notebook trains."""
    data_dir = os.path.join(standin_root, 'faces-casia-ultrasmall')
    train_iter, verification_sets = d2lf_torch.load_data_facerec(
        data_dir, ['lfw_small'], batch_size=10)
    X, y = next(iter(train_iter))
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    num_classes = d2lf_torch.read_facerec_meta(data_dir)[1]
    net, margin = tiny_face_net_and_margin(d2lf_torch, num_classes)
    history = d2lf_torch.train_facerec(
        net, margin, train_iter, verification_sets,
        num_steps=2 * len(train_iter), lr=0.05, warmup_steps=2,
        eval_every=len(train_iter), log_every=1, devices=TORCH_CPU, plot=False)
    assert len(history['train loss']) == 2 * len(train_iter)
    assert [epoch for epoch, _ in history['lfw_small']] == [1, 2]
    result = d2lf_torch.evaluate_verification(
        net, verification_sets['lfw_small'], devices=TORCH_CPU)
    assert result['acc'] == history['lfw_small'][-1][1]


def test_cpu_config_builds_what_the_section_trains_pytorch():
    config = d2lf_torch.CPU_CONFIG
    net = d2lf_torch.face_resnet(config['depth'], config['width'],
                           config['embedding_size'])
    assert net(torch.zeros(2, 3, 112, 112)).shape == \
        (2, config['embedding_size'])
