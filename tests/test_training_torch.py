"""The PyTorch tab of section 3: training step, schedule, files, errors."""
import inspect
import math
import os

import numpy as onp
import pytest
import torch
from torch import nn

from d2l_face import torch as d2lf
from synthetic import HANG, deadline, synthetic_pairs, tiny_class_images

CPU = [torch.device('cpu')]




class TinyNet(nn.Module):
    """A very small embedding network for tests: (N, 3, h, w) -> (N, 8)."""
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4),
                                  nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.LazyLinear(8))

    def forward(self, x):
        return self.body(x - 0.5)


def tiny_net(size=16, seed=0):
    torch.manual_seed(seed)
    net = TinyNet()
    net(torch.rand(2, 3, size, size))  # materialize the lazy layer
    # batch statistics that differ from the initial ones
    net.body[1].running_mean.uniform_(-0.2, 0.2)
    net.body[1].running_var.uniform_(0.5, 2.0)
    return net




def tiny_dataset(num_classes=4, per_class=16, batch_size=16, seed=0):
    """Batches of 112x112 images whose class sets their color and stripes."""
    X, y = tiny_class_images(num_classes, per_class, seed)
    return [(torch.from_numpy(X[i:i + batch_size]),
             torch.from_numpy(y[i:i + batch_size]).long())
            for i in range(0, len(y), batch_size)]


def tiny_face_net_and_margin(num_classes=4, seed=0):
    torch.manual_seed(seed)
    net = d2lf.face_resnet(18, width=0.0625, embedding_size=16)
    margin = d2lf.MarginLogits(num_classes, 16, s=16.0, m2=0.2)
    return net, margin


def loss_fn():
    return nn.CrossEntropyLoss(reduction='none')


# ------------------------------------------------------------ the library

def test_import_gives_the_saved_names():
    for name in ['all_devices', 'embed_pairs', 'evaluate_verification',
                 'TrainingBoard', 'train_face_step', 'warmup_cosine',
                 'facerec_trainer', 'facerec_model', 'train_facerec',
                 'CPU_CONFIG', 'GPU_CONFIG', 'set_seeds', 'embed_face',
                 'identify']:
        assert hasattr(d2lf, name), name
    assert d2lf.all_devices() == (
        [torch.device(f'cuda:{i}') for i in range(torch.cuda.device_count())]
        or CPU)


SHARED = ['pair_scores', 'check_pairs', 'count_accepts_sorted',
          'count_accepts', 'candidate_thresholds', 'best_threshold_sorted',
          'best_threshold', 'kfold_splits', 'kfold_train_test',
          'verification_accuracy', 'standard_error', 'far_threshold',
          'val_at_far', 'roc_curve', 'plot_roc', 'plot_score_histogram',
          'evaluate_verification', 'TrainingBoard', 'describe_batches',
          'check_train_input', 'facerec_batches', 'training_status',
          'embed_face', 'identify']


@pytest.mark.parametrize('name', SHARED)
def test_shared_cells_are_one_definition_in_both_libraries(name):
    from d2l_face import mxnet as d2lf_mx
    assert inspect.getsource(getattr(d2lf, name)) == \
        inspect.getsource(getattr(d2lf_mx, name))
    assert d2lf.CPU_CONFIG == d2lf_mx.CPU_CONFIG
    assert d2lf.GPU_CONFIG == d2lf_mx.GPU_CONFIG


def test_shared_metrics_give_the_same_numbers_from_both_libraries():
    from d2l_face import mxnet as d2lf_mx
    rng = onp.random.default_rng(0)
    issame = rng.random(300) < 0.5
    scores = rng.normal(issame * 0.6, 0.5)
    for fn in ['verification_accuracy', 'val_at_far', 'roc_curve']:
        ours = getattr(d2lf, fn)(scores, issame)
        theirs = getattr(d2lf_mx, fn)(scores, issame)
        for a, b in zip(ours, theirs):
            assert onp.array_equal(a, b), fn


# -------------------------------------------------- embedding and files

def test_embed_pairs_is_unit_flip_sum_in_eval_mode():
    net = tiny_net()
    images, _ = synthetic_pairs()
    emb = d2lf.embed_pairs(net, images, batch_size=7, devices=CPU)
    assert emb.shape == (20, 8) and emb.dtype == onp.float64
    assert onp.linalg.norm(emb, axis=1) == pytest.approx(onp.ones(20))
    assert net.training  # the mode it was in comes back
    net.eval()
    with torch.no_grad():
        X = [torch.from_numpy(c.copy()).float() / 255 for c in images]
        expected = (net(X[0]) + net(X[1])).numpy().astype(onp.float64)
    expected /= onp.linalg.norm(expected, axis=1, keepdims=True)
    # running statistics, not those of a batch: any batching gives the same
    assert onp.abs(emb - expected).max() < 1e-6
    net.eval()
    one = d2lf.embed_pairs(net, images, batch_size=1, devices=CPU)
    assert not net.training and onp.abs(one - emb).max() < 1e-6


def test_embed_pairs_refuses_bad_shapes():
    images, _ = synthetic_pairs()
    for bad in [images[0], images[:1], images[:, :0]]:
        with pytest.raises(ValueError, match=r'\(2, n, 3, h, w\)'):
            d2lf.embed_pairs(tiny_net(), bad, devices=CPU)


def test_embed_face_matches_embed_pairs_and_checks_shape():
    net = tiny_net()
    images, _ = synthetic_pairs()
    face = images[0, 3].transpose(1, 2, 0)
    emb = d2lf.embed_face(net, face, devices=CPU)
    assert emb.shape == (8,) and onp.linalg.norm(emb) == pytest.approx(1)
    pairs = d2lf.embed_pairs(net, images, devices=CPU)
    assert onp.abs(emb - pairs[3]).max() < 1e-6
    with pytest.raises(ValueError, match='RGB'):
        d2lf.embed_face(net, face[:, :, 0])


@pytest.mark.parametrize('dtype', ['float32', 'float64', 'bool', 'int64'])
def test_embed_face_refuses_what_is_not_uint8(dtype):
    # Once cast: 0.5 became 0, 300 became 44 and NaN some byte.
    images, _ = synthetic_pairs()
    face = images[0, 3].transpose(1, 2, 0).astype(dtype)
    if dtype.startswith('float'):
        face[0, 0, 0] = onp.nan
    with pytest.raises(ValueError, match=r'uint8 RGB image .*not ' + dtype):
        d2lf.embed_face(tiny_net(), face, devices=CPU)


def test_evaluate_verification_keys_and_ranges():
    images, issame = synthetic_pairs(num_pairs=40)
    result = d2lf.evaluate_verification(tiny_net(), (images, issame),
                                        devices=CPU)
    assert set(result) == {'acc', 'acc_std', 'acc_se', 'threshold', 'val',
                           'val_std', 'far'}
    assert result['acc_se'] == pytest.approx(result['acc_std'] / 3)
    assert 0 <= result['acc'] <= 1 and 0 <= result['val'] <= 1


def test_state_dict_round_trip_gives_identical_embeddings(tmp_path):
    net, margin = tiny_face_net_and_margin()
    # a few steps, so that the running statistics are not the initial ones
    optimizer = d2lf.facerec_trainer(net, margin, 3, 0.05)
    for X, y in tiny_dataset()[:3]:
        d2lf.train_face_step(net, margin, loss_fn(), optimizer, X, y, CPU)
    images, _ = synthetic_pairs(num_pairs=2, size=112)
    before = d2lf.embed_pairs(net, images, devices=CPU)
    path = str(tmp_path / 'net.pt')
    torch.save(net.state_dict(), path)
    torch.manual_seed(1)  # a clone with other random weights at first
    clone = d2lf.face_resnet(18, width=0.0625, embedding_size=16)
    assert not onp.array_equal(
        d2lf.embed_pairs(clone, images, devices=CPU), before)
    clone.load_state_dict(torch.load(path, weights_only=True))
    after = d2lf.embed_pairs(clone, images, devices=CPU)
    assert onp.array_equal(before, after)


# ------------------------------------------------- step and schedule

def test_step_reduces_the_loss_on_a_tiny_batch():
    net, margin = tiny_face_net_and_margin()
    X, y = tiny_dataset(batch_size=16)[0]
    # From Xavier's initialization, at a rate of 0.05 the loss of this one
    # batch jumps about for seeds 0 to 2; at 0.01 it falls.
    optimizer = d2lf.facerec_trainer(net, margin, 30, 0.01, wd=0)
    losses = []
    for _ in range(8):
        total, correct = d2lf.train_face_step(net, margin, loss_fn(),
                                              optimizer, X, y, CPU)
        assert isinstance(total, float) and 0 <= correct <= 16
        losses.append(total / 16)
    # Over seeds 0-19 (weights and batch; one thread) the last loss was at
    # most 0.11 of the first (seed 7; median 0.001), though it may rise on
    # the way.
    assert losses[-1] < 0.5 * losses[0]


def test_step_batch_size_divides_the_gradient():
    """A doubled batch_size halves the update, as a halved rate would."""
    X, y = tiny_dataset(batch_size=16)[0]
    params = []
    for lr, batch_size in [(0.1, 32), (0.05, None)]:
        net, margin = tiny_face_net_and_margin()
        optimizer = d2lf.facerec_trainer(net, margin, num_steps=10, lr=lr,
                                         wd=0, momentum=0)
        d2lf.train_face_step(net, margin, loss_fn(), optimizer, X, y, CPU,
                             batch_size)
        params.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_schedule_equals_mxnets_cosine_scheduler():
    from mxnet import lr_scheduler
    net, margin = tiny_face_net_and_margin()
    num_steps, warmup, lr = 20, 5, 0.1
    optimizer = d2lf.facerec_trainer(net, margin, num_steps, lr,
                                     warmup_steps=warmup)
    reference = lr_scheduler.CosineScheduler(num_steps, lr, final_lr=0,
                                             warmup_steps=warmup)
    X, y = tiny_dataset(batch_size=4)[0]
    for update in range(1, num_steps + 3):  # updates count from 1
        assert optimizer.param_groups[0]['lr'] == \
            pytest.approx(reference(update), abs=1e-12)
        d2lf.train_face_step(net, margin, loss_fn(), optimizer, X, y, CPU)
    assert optimizer.param_groups[0]['lr'] == 0


def test_trainer_leaves_the_fixed_embedding_scale_alone():
    net, margin = tiny_face_net_and_margin()
    optimizer = d2lf.facerec_trainer(net, margin, 10, 0.1)
    trained = {id(p) for group in optimizer.param_groups
               for p in group['params']}
    fixed = net.head[-1].weight
    assert not fixed.requires_grad and id(fixed) not in trained
    assert id(margin.weight) in trained
    assert len(trained) == sum(p.requires_grad for p in net.parameters()) + 1


def test_mixed_precision_step_keeps_float32_parameters():
    """The GradScaler path, on the CPU's float16 autocast."""
    net, margin = tiny_face_net_and_margin()
    X, y = tiny_dataset(batch_size=8)[0]
    optimizer = d2lf.facerec_trainer(net, margin, 10, 0.05)
    scaler = torch.amp.GradScaler('cpu', growth_interval=100)
    before = margin.weight.detach().clone()
    for _ in range(20):  # float16 overflows skip the first steps
        total, correct = d2lf.train_face_step(
            net, margin, loss_fn(), optimizer, X, y, CPU, scaler=scaler)
        assert onp.isfinite(total) and 0 <= correct <= 8
        if not torch.equal(before, margin.weight):
            break
    assert not torch.equal(before, margin.weight), 'no step was taken'
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert margin.weight.dtype == torch.float32


def test_a_skipped_step_does_not_move_the_schedule():
    # The schedule advances after optimizer.step(); a GradScaler that finds
    # an infinite gradient does not call it, so the schedule counts updates.
    net, margin = tiny_face_net_and_margin()
    num_steps, warmup, lr = 10, 2, 0.1
    optimizer = d2lf.facerec_trainer(net, margin, num_steps, lr,
                                     warmup_steps=warmup)
    scaler = torch.amp.GradScaler('cpu', growth_interval=100)
    X, y = tiny_dataset(batch_size=4)[0]
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
        want = lr * d2lf.warmup_cosine(updates + 1, num_steps, warmup)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(want)


def test_fp16_without_a_gpu_is_refused():
    net, margin = tiny_face_net_and_margin()
    with pytest.raises(ValueError, match='needs CUDA'):
        d2lf.facerec_model(net, margin, CPU, fp16=True)
    model, scaler = d2lf.facerec_model(net, margin, CPU)
    assert model is net and scaler is None


# ----------------------------------------------------------- training loop

def test_training_smoke_loss_decreases():
    """32 steps after a warm-up of 8 steps. Without the warm-up the first
    steps were erratic: with one thread, as `make test` runs, seed 0's last
    logged loss was 0.50 of its first and its accuracy did not grow. With
    it and the Xavier initialization, over seeds 0-19 (seed for the data and
    the weights; one thread) the last loss was a median 0.01 of the first,
    at most 0.61 (seed 13; 0.13 the next), and the accuracy grew for each;
    hence the claim: lower, not a set fraction."""
    torch.manual_seed(0)
    train_iter = tiny_dataset()
    net, margin = tiny_face_net_and_margin()
    images, issame = synthetic_pairs(num_pairs=40, size=112)
    history = d2lf.train_facerec(
        net, margin, train_iter, {'tiny': (images, issame)}, num_steps=32,
        lr=0.05, warmup_steps=8, eval_every=16, log_every=8, devices=CPU,
        plot=False)
    losses = [loss for _, loss in history['train loss']]
    assert len(losses) == 4 and len(history['tiny']) == 2
    assert losses[-1] < losses[0]
    assert history['train acc'][-1][1] > history['train acc'][0][1]
    assert history['train loss'][-1][0] == pytest.approx(32 / len(train_iter))
    assert net.training  # evaluation gave the training mode back


def test_train_on_small_standin_through_the_data_loader(standin_root):
    """Two passes over a 30-image stand-in, as the notebook trains."""
    data_dir = os.path.join(standin_root, 'faces-casia-ultrasmall')
    train_iter, verification_sets = d2lf.load_data_facerec(
        data_dir, ['lfw_small'], batch_size=10)
    X, y = next(iter(train_iter))
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    num_classes = d2lf.read_facerec_meta(data_dir)[1]
    net, margin = tiny_face_net_and_margin(num_classes)
    history = d2lf.train_facerec(
        net, margin, train_iter, verification_sets,
        num_steps=2 * len(train_iter), lr=0.05, warmup_steps=2,
        eval_every=len(train_iter), log_every=1, devices=CPU, plot=False)
    assert len(history['train loss']) == 2 * len(train_iter)
    assert [epoch for epoch, _ in history['lfw_small']] == [1, 2]
    result = d2lf.evaluate_verification(net, verification_sets['lfw_small'],
                                        devices=CPU)
    assert result['acc'] == history['lfw_small'][-1][1]


@pytest.mark.parametrize('plot', [False, True])
def test_fewer_images_than_a_batch_raise_at_once(standin_root, plot):
    from synthetic import NUM_CLASSES, PER_CLASS
    data_dir = os.path.join(standin_root, 'faces-casia-ultrasmall')
    num_images = NUM_CLASSES * PER_CLASS
    train_iter, verification_sets = d2lf.load_data_facerec(
        data_dir, ['lfw_small'], batch_size=num_images + 1)
    net, margin = tiny_face_net_and_margin(NUM_CLASSES)
    with deadline(HANG), pytest.raises(
            ValueError, match=f'no batch: {num_images} images in batches '
                              f'of {num_images + 1}'):
        d2lf.train_facerec(net, margin, train_iter, verification_sets,
                           num_steps=5, lr=0.1, devices=CPU, plot=plot)
    d2lf.d2l.plt.close('all')


@pytest.mark.parametrize('name, value', [
    ('num_steps', 0), ('num_steps', -3), ('num_steps', 2.5),
    ('eval_every', 0), ('log_every', 0)])
def test_step_counts_below_one_raise_at_once(name, value):
    net, margin = tiny_face_net_and_margin()
    counts = dict(num_steps=4, eval_every=2, log_every=2)
    counts[name] = value
    with deadline(HANG), pytest.raises(ValueError, match=f'{name} must be'):
        d2lf.train_facerec(net, margin, tiny_dataset(), {}, lr=0.1,
                           devices=CPU, plot=False, **counts)


def test_an_empty_list_of_batches_raises_at_once():
    net, margin = tiny_face_net_and_margin()
    with deadline(HANG), pytest.raises(ValueError, match='list of length 0'):
        d2lf.train_facerec(net, margin, [], {}, num_steps=3, lr=0.1,
                           devices=CPU, plot=False)


def test_a_pass_without_batches_raises_instead_of_looping():
    net, margin = tiny_face_net_and_margin()
    batches = iter(tiny_dataset()[:1])  # gone through once, like a generator

    class OneShot:
        def __len__(self):
            return 1

        def __iter__(self):
            return batches

    with deadline(60), pytest.raises(
            ValueError, match='no batch, after step 1: OneShot of length 1'):
        d2lf.train_facerec(net, margin, OneShot(), {}, num_steps=3, lr=0.1,
                           devices=CPU, plot=False)


def test_cpu_config_builds_what_the_section_trains():
    config = d2lf.CPU_CONFIG
    net = d2lf.face_resnet(config['depth'], config['width'],
                           config['embedding_size'])
    assert net(torch.zeros(2, 3, 112, 112)).shape == \
        (2, config['embedding_size'])


# --------------------------------------------- divergence and bad settings

def small_batches(batch_size=4, num_batches=2):
    """Two small batches of tiny_dataset's images: quick steps."""
    X, y = tiny_dataset()[0]
    return [(X[i:i + batch_size], y[i:i + batch_size])
            for i in range(0, batch_size * num_batches, batch_size)]


@pytest.mark.parametrize('change', ['lr=1e8', 'm3=nan'])
def test_divergence_stops_at_the_first_non_finite_loss(change):
    net, margin = tiny_face_net_and_margin()
    lr = 1e8 if change == 'lr=1e8' else 0.05
    if change == 'm3=nan':
        margin.m3 = float('nan')  # set after the layer checked it
    history = []
    with pytest.raises(d2lf.TrainingDiverged,
                       match=r'diverged at step \d+: the mean loss of its '
                             r'batch is (nan|inf)'):
        history = d2lf.train_facerec(net, margin, small_batches(), {},
                                     num_steps=20, lr=lr, log_every=1,
                                     devices=CPU, plot=False)
    assert history == []
    assert issubclass(d2lf.TrainingDiverged, FloatingPointError)


@pytest.mark.parametrize('name,value', [
    ('lr', float('nan')), ('lr', 0.0), ('lr', -0.1), ('lr', float('inf')),
    ('wd', -1e-4), ('momentum', float('nan'))])
def test_sgd_settings_are_checked_before_the_first_step(name, value):
    net, margin = tiny_face_net_and_margin()
    settings = dict(lr=0.05, wd=5e-4, momentum=0.9)
    settings[name] = value
    with pytest.raises(ValueError, match=f'{name} must be a finite'):
        d2lf.train_facerec(net, margin, small_batches(), {}, num_steps=2,
                           devices=CPU, plot=False, **settings)


@pytest.mark.parametrize('margin', [
    dict(s=float('inf')), dict(s=float('nan')), dict(m1=float('inf')),
    dict(m2=float('nan')), dict(m3=float('nan')), dict(m3=float('-inf'))])
def test_margin_layers_refuse_scales_and_margins_that_are_not_finite(margin):
    with pytest.raises(ValueError, match='need a finite s > 0'):
        d2lf.MarginLogits(4, 16, **margin)
    with pytest.raises(ValueError, match='need a finite s > 0'):
        d2lf.ShardedMarginLoss(4, 16, CPU * 2, **margin)


def test_a_batch_of_one_names_the_batch_norm_limit():
    net, margin = tiny_face_net_and_margin()
    with pytest.raises(ValueError, match='batch of 1 images on 1 device.*'
                                         'at least 2 images per device'):
        d2lf.train_facerec(net, margin, small_batches(batch_size=1), {},
                           num_steps=2, lr=0.05, devices=CPU, plot=False)
