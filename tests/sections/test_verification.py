"""The verification section: scores of pairs, thresholds, the 10-fold
protocol, VAL at FAR, ROC curves, and every .bin set of a folder at once.

The metrics are `#@tab all` cells, so each test of them runs on both
libraries through the `d2lf` fixture; embedding a pair needs a network of
one framework."""
import inspect
import os
import warnings

import cv2
import numpy as onp
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from mxnet import np as mx_np

from d2l_face import binsets
from d2l_face import mxnet as d2lf_mx
from d2l_face import torch as d2lf_torch
from synthetic import synthetic_pairs
from tiny_models import cpus, tiny_net

TORCH_CPU = [torch.device('cpu')]


def brute_force_best(scores, issame, thresholds):
    """Reference: the accuracy of every threshold, one at a time."""
    accuracies = [((scores > t) == issame).mean() for t in thresholds]
    best = int(onp.argmax(accuracies))
    return thresholds[best], accuracies[best]


def random_case(seed, n=600, ties=False):
    rng = onp.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    scores = rng.normal(issame * 0.6, 0.5)
    if ties:
        scores = onp.round(scores, 1)  # many equal scores
    return scores, issame


# ---------------------------------------------------------------- thresholds

def test_perfectly_separable_pairs_are_all_right(d2lf):
    issame = onp.arange(600) % 3 == 0
    # every different pair at 0.1, so no fold holds a surprising impostor
    scores = onp.where(issame, 0.8 + onp.linspace(0, 0.05, 600), 0.1)
    acc, std, thresholds = d2lf.verification_accuracy(scores, issame)
    assert acc == 1.0 and std == 0.0
    assert ((thresholds > 0.1) & (thresholds < 0.8)).all()
    val, val_std, far = d2lf.val_at_far(scores, issame)
    assert (val, val_std, far) == (1.0, 0.0, 0.0)


def test_best_threshold_hand_computed(d2lf):
    scores = onp.array([0.9, 0.8, 0.7, 0.6, 0.5])
    issame = onp.array([True, False, True, False, False])
    # accept none 3/5, top 1 4/5, top 2 3/5, top 3 4/5, top 4 3/5, all 2/5:
    # two thresholds tie at 0.8; the strictest one (first) wins.
    t, acc = d2lf.best_threshold(scores, issame)
    assert acc == pytest.approx(0.8) and t == pytest.approx(0.85)
    tp, fp = d2lf.count_accepts(scores, issame, [1.0, 0.85, 0.65, 0.0])
    assert tp.tolist() == [0, 1, 2, 2] and fp.tolist() == [0, 0, 1, 3]


def test_candidates_cover_every_decision(d2lf):
    scores = onp.array([0.3, 0.1, 0.3, -0.2])
    candidates = d2lf.candidate_thresholds(scores)
    accepted = [(scores > t).sum() for t in candidates]
    assert accepted == [0, 2, 3, 4]  # one candidate per distinct decision


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('ties', [False, True])
def test_vectorized_search_equals_loop(d2lf, seed, ties):
    scores, issame = random_case(seed, ties=ties)
    candidates = d2lf.candidate_thresholds(scores)
    assert d2lf.best_threshold(scores, issame) == \
        pytest.approx(brute_force_best(scores, issame, candidates))
    # InsightFace's grid of squared distances, written as cosine thresholds
    grid = 1 - onp.arange(0, 4, 0.01) / 2
    assert d2lf.best_threshold(scores, issame, grid) == \
        pytest.approx(brute_force_best(scores, issame, grid))
    tp, fp = d2lf.count_accepts(scores, issame, grid)
    assert tp.tolist() == [int((scores[issame] > t).sum()) for t in grid]
    assert fp.tolist() == [int((scores[~issame] > t).sum()) for t in grid]


@pytest.mark.parametrize('ties', [False, True])
def test_sorted_variants_agree_with_the_unsorted_ones(d2lf, ties):
    scores, issame = random_case(3, ties=ties)
    order = onp.argsort(-scores, kind='stable')
    descending, same = scores[order], issame[order]
    assert onp.array_equal(
        d2lf.candidate_thresholds(descending, is_sorted=True),
        d2lf.candidate_thresholds(scores))
    grid = 1 - onp.arange(0, 4, 0.01) / 2
    for thresholds in (None, grid):
        assert d2lf.best_threshold_sorted(descending, same, thresholds) == \
            d2lf.best_threshold(scores, issame, thresholds)
    assert all(onp.array_equal(a, b) for a, b in zip(
        d2lf.count_accepts_sorted(descending, same, grid),
        d2lf.count_accepts(scores, issame, grid)))


def test_candidate_search_is_never_worse_than_a_grid(d2lf):
    for seed in range(5):
        scores, issame = random_case(seed)
        grid = onp.arange(-1, 1, 0.01)
        assert d2lf.best_threshold(scores, issame)[1] >= \
            d2lf.best_threshold(scores, issame, grid)[1]


# --------------------------------------------------------------------- folds

@pytest.mark.parametrize('n', [600, 6000, 10, 17, 1234])
def test_folds_partition_pairs_contiguously(d2lf, n):
    folds = d2lf.kfold_splits(n, 10)
    assert len(folds) == 10
    assert onp.concatenate(folds).tolist() == list(range(n))
    sizes = [len(f) for f in folds]
    # like sklearn's KFold: the first n % 10 folds hold one pair more
    assert sizes == [n // 10 + (i < n % 10) for i in range(10)]


def test_kfold_accuracy_matches_a_plain_implementation(d2lf):
    scores, issame = random_case(7, n=600, ties=True)
    grid = 1 - onp.arange(0, 4, 0.01) / 2
    for thresholds in (None, grid):
        expected_acc, expected_t = [], []
        for k in range(10):
            test = onp.arange(600) // 60 == k
            candidates = (d2lf.candidate_thresholds(scores[~test])
                          if thresholds is None else thresholds)
            t, _ = brute_force_best(scores[~test], issame[~test], candidates)
            expected_t.append(t)
            expected_acc.append(((scores[test] > t) == issame[test]).mean())
        acc, std, fold_t = d2lf.verification_accuracy(scores, issame,
                                                      thresholds=thresholds)
        assert acc == pytest.approx(onp.mean(expected_acc))
        assert std == pytest.approx(onp.std(expected_acc))
        assert fold_t == pytest.approx(onp.array(expected_t))
        # LFW's standard error: the sample std (k - 1) over sqrt(k)
        assert d2lf.standard_error(std) == pytest.approx(
            onp.std(expected_acc, ddof=1) / onp.sqrt(10))


# ------------------------------------------------------------------ VAL, ROC

def test_far_threshold_constructed_case(d2lf):
    scores = onp.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.95, 0.1])
    issame = onp.array([False] * 8 + [True, True])
    # 8 different pairs, FAR 0.25 allows 2 of them: threshold 0.7 lets
    # exactly 0.9 and 0.8 through
    t = d2lf.far_threshold(scores, issame, far=0.25)
    assert t == 0.7
    assert (scores[~issame] > t).mean() == 0.25
    assert d2lf.far_threshold(scores, issame, far=1e-3) == 0.9
    assert (scores > d2lf.far_threshold(scores, issame, far=1.0)).all()


def test_val_at_far_constructed_case(d2lf):
    # Each fold of 20 pairs: 10 same with scores 0.50..0.95, 10 different
    # with scores 0.00..0.45 except one impostor at 0.99 in fold 0.
    scores, issame = [], []
    for fold in range(10):
        scores += [0.5 + 0.05 * i for i in range(10)]
        issame += [True] * 10
        scores += [0.05 * i for i in range(10)]
        issame += [False] * 10
    scores, issame = onp.array(scores), onp.array(issame)
    scores[10] = 0.99  # fold 0, a different pair
    val, val_std, far = d2lf.val_at_far(scores, issame, far=1e-3)
    # Folds 1-9 train on fold 0's impostor: threshold 0.99 accepts nothing.
    # Fold 0 trains without it: threshold 0.45, VAL 1, but its impostor
    # passes (FAR 1/10).
    vals = [1.0] + [0.0] * 9
    assert val == pytest.approx(onp.mean(vals))
    assert val_std == pytest.approx(onp.std(vals))
    assert far == pytest.approx(0.1 / 10)


def test_val_at_far_skips_folds_without_same_or_different_pairs(d2lf):
    # 10 pairs in 10 folds: each fold holds one pair only
    scores = onp.linspace(0, 1, 10)
    issame = scores > 0.45
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no "mean of empty slice"
        val, _, far = d2lf.val_at_far(scores, issame)
    # every same pair scores above every different pair; but the highest
    # different pair is above all others, so its own fold accepts it
    assert val == 1.0 and far == pytest.approx(1 / 5)


@pytest.mark.parametrize('seed', range(3))
def test_roc_is_monotone_from_corner_to_corner(d2lf, seed):
    scores, issame = random_case(seed, ties=bool(seed % 2))
    fpr, tpr = d2lf.roc_curve(scores, issame)
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert (onp.diff(fpr) >= 0).all() and (onp.diff(tpr) >= 0).all()
    assert ((onp.diff(fpr) > 0) | (onp.diff(tpr) > 0)).all()


def test_roc_of_separable_scores_reaches_the_top_at_zero_far(d2lf):
    issame = onp.array([True, True, False, False])
    fpr, tpr = d2lf.roc_curve(onp.array([0.9, 0.8, 0.2, 0.1]), issame)
    assert tpr[fpr == 0].max() == 1


def test_plots_draw(d2lf):
    scores, issame = random_case(0)
    d2lf.plot_roc({'a': d2lf.roc_curve(scores, issame)})
    d2lf.plot_score_histogram(scores, issame, threshold=0.3)
    d2lf.d2l.plt.close('all')


# ------------------------------------------------------- metrics, bad input

def with_score(scores, i, value):
    scores = scores.copy()
    scores[i] = value
    return scores


METRICS = {  # name -> the metric of a library, called on (scores, labels)
    'verification_accuracy': lambda d2lf: d2lf.verification_accuracy,
    'best_threshold': lambda d2lf: d2lf.best_threshold,
    'val_at_far': lambda d2lf: d2lf.val_at_far,
    'far_threshold': lambda d2lf: d2lf.far_threshold,
    'roc_curve': lambda d2lf: d2lf.roc_curve,
    'count_accepts': lambda d2lf: lambda s, i: d2lf.count_accepts(
        s, i, [0.0, 0.5]),
    'plot_score_histogram': lambda d2lf: d2lf.plot_score_histogram,
}
SCORES, ISSAME = random_case(0, n=100)
BAD_PAIRS = {
    'a NaN score': (with_score(SCORES, 17, onp.nan), ISSAME, 'NaN'),
    'an infinite score': (with_score(SCORES, 3, onp.inf), ISSAME, 'NaN'),
    'no pairs': (onp.array([]), onp.array([], bool), 'too few'),
    'fewer labels': (SCORES, ISSAME[:-1], 'one label per pair'),
    'more labels': (SCORES[:-1], ISSAME, 'one label per pair'),
    'scores in 2-D': (SCORES.reshape(10, 10), ISSAME.reshape(10, 10),
                      'one label per pair'),
    'labels that are not 0/1': (SCORES, ISSAME * 2, 'True/False'),
}


@pytest.mark.parametrize('metric', METRICS)
@pytest.mark.parametrize('case', BAD_PAIRS)
def test_metrics_refuse_bad_pairs(d2lf, metric, case):
    scores, issame, message = BAD_PAIRS[case]
    with pytest.raises(ValueError, match=message):
        METRICS[metric](d2lf)(scores, issame)
    d2lf.d2l.plt.close('all')


def test_nan_message_names_the_first_bad_pair(d2lf):
    scores = with_score(with_score(SCORES, 17, onp.nan), 40, onp.nan)
    with pytest.raises(ValueError, match='2 scores .* pair 17'):
        d2lf.verification_accuracy(scores, ISSAME)


@pytest.mark.parametrize('metric', ['verification_accuracy', 'val_at_far'])
def test_folds_need_a_pair_each(d2lf, metric):
    metric = getattr(d2lf, metric)
    with pytest.raises(ValueError, match='9 pairs are too few for 10'):
        metric(SCORES[:9], ISSAME[:9])
    metric(SCORES[:10], onp.arange(10) % 2 == 0)  # one pair a fold is fine
    with pytest.raises(ValueError, match='2 or more folds'):
        metric(SCORES, ISSAME, num_folds=1)
    with pytest.raises(ValueError, match='2 or more folds'):
        d2lf.kfold_splits(100, 0)


@pytest.mark.parametrize('metric', ['val_at_far', 'roc_curve'])
@pytest.mark.parametrize('label', [True, False])
def test_val_and_roc_need_both_kinds_of_pairs(d2lf, metric, label):
    with pytest.raises(ValueError, match='both same and different'):
        getattr(d2lf, metric)(SCORES, onp.full(100, label))


def test_far_outside_zero_one_is_refused(d2lf):
    for far in (-0.1, 1.5, onp.nan, '0.1', None, [0.1], 0.1j):
        with pytest.raises(ValueError, match='far must be a number between'):
            d2lf.far_threshold(SCORES, ISSAME, far)


@pytest.mark.parametrize('thresholds', [[], [onp.nan], [0.1, onp.inf],
                                        [[0.1]], 'abc'])
def test_thresholds_given_must_be_finite_numbers(d2lf, thresholds):
    for search in (d2lf.best_threshold,
                   lambda s, i, t: d2lf.verification_accuracy(s, i, 10, t)):
        with pytest.raises(ValueError):
            search(SCORES, ISSAME, thresholds)


@pytest.mark.parametrize('num_pairs, num_folds', [(10, 2.5), (10.5, 2),
                                                  (10, True), (10, '2')])
def test_fold_counts_must_be_integers(d2lf, num_pairs, num_folds):
    with pytest.raises(ValueError, match='must be integers'):
        d2lf.kfold_splits(num_pairs, num_folds)


@pytest.mark.parametrize('scores, labels', [
    (SCORES.astype(complex), ISSAME), (SCORES.astype(str), ISSAME),
    (SCORES, ISSAME.astype(str)), (SCORES.astype(object), ISSAME)])
def test_scores_and_labels_must_be_real(d2lf, scores, labels):
    with pytest.raises(ValueError, match='must be'):
        d2lf.verification_accuracy(scores, labels)


def test_candidates_and_pair_scores_refuse_bad_input(d2lf):
    for scores in ([], [0.1, onp.nan]):
        with pytest.raises(ValueError, match='at least one score'):
            d2lf.candidate_thresholds(scores)
    with pytest.raises(ValueError, match='two embeddings per pair'):
        d2lf.pair_scores(onp.ones((3, 4)))
    with pytest.raises(ValueError, match='two embeddings per pair'):
        d2lf.pair_scores(onp.ones(4))


finite_scores = st.lists(st.floats(-1, 1), min_size=10, max_size=60)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(finite_scores, st.data())
def test_any_finite_scores_give_rates_and_any_nan_an_error(d2lf, scores,
                                                           data):
    scores = onp.array(scores)
    issame = onp.array(data.draw(st.lists(st.booleans(), min_size=len(scores),
                                          max_size=len(scores))))
    acc, std, thresholds = d2lf.verification_accuracy(scores, issame)
    assert 0 <= acc <= 1 and 0 <= std and onp.isfinite(thresholds).all()
    i = data.draw(st.integers(0, len(scores) - 1))
    with pytest.raises(ValueError, match='NaN'):
        d2lf.verification_accuracy(with_score(scores, i, onp.nan), issame)


# ------------------------------------------- one definition, two libraries

SHARED = ['pair_scores', 'check_pairs', 'count_accepts_sorted',
          'count_accepts', 'candidate_thresholds', 'best_threshold_sorted',
          'best_threshold', 'kfold_splits', 'kfold_train_test',
          'verification_accuracy', 'standard_error', 'far_threshold',
          'val_at_far', 'roc_curve', 'plot_roc', 'plot_score_histogram',
          'evaluate_verification', 'TrainingBoard', 'facerec_batches',
          'training_status', 'embed_face', 'identify', 'pixel_embeddings',
          'find_bin_sets', 'evaluate_bin_sets', 'more_verification_sets',
          'facerec_train_args']


@pytest.mark.parametrize('name', SHARED)
def test_shared_cells_are_one_definition_in_both_libraries(name):
    assert inspect.getsource(getattr(d2lf_torch, name)) == \
        inspect.getsource(getattr(d2lf_mx, name))
    assert d2lf_torch.CPU_CONFIG == d2lf_mx.CPU_CONFIG
    assert d2lf_torch.GPU_CONFIG == d2lf_mx.GPU_CONFIG


def test_shared_metrics_give_the_same_numbers_from_both_libraries():
    rng = onp.random.default_rng(0)
    issame = rng.random(300) < 0.5
    scores = rng.normal(issame * 0.6, 0.5)
    for fn in ['verification_accuracy', 'val_at_far', 'roc_curve']:
        ours = getattr(d2lf_torch, fn)(scores, issame)
        theirs = getattr(d2lf_mx, fn)(scores, issame)
        for a, b in zip(ours, theirs):
            assert onp.array_equal(a, b), fn


# ------------------------------------------------------- embedding pairs

def test_embed_pairs_is_unit_flip_sum_mxnet():
    net = tiny_net(d2lf_mx)
    images, _ = synthetic_pairs()
    emb = d2lf_mx.embed_pairs(net, images, batch_size=7, devices=cpus(d2lf_mx))
    assert emb.shape == (20, 8)
    assert onp.linalg.norm(emb, axis=1) == pytest.approx(onp.ones(20))
    X = [mx_np.array(c).astype('float32') / 255 for c in images]
    expected = (net(X[0]) + net(X[1])).asnumpy()
    expected /= onp.linalg.norm(expected, axis=1, keepdims=True)
    assert onp.abs(emb - expected).max() < 1e-5


def test_embed_pairs_on_two_devices_equals_one():
    devices = cpus(d2lf_mx, 2)
    net = tiny_net(d2lf_mx, devices=devices)
    images, _ = synthetic_pairs(num_pairs=5)  # 10 images: last chunk of 3
    one = d2lf_mx.embed_pairs(net, images, batch_size=7, devices=devices[:1])
    two = d2lf_mx.embed_pairs(net, images, batch_size=7, devices=devices)
    assert onp.abs(one - two).max() < 1e-6
    with pytest.raises(ValueError, match='n > 0'):
        d2lf_mx.embed_pairs(net, images[:, :0], devices=devices)


def test_embed_pairs_is_unit_flip_sum_in_eval_mode_pytorch():
    net = tiny_net(d2lf_torch)
    images, _ = synthetic_pairs()
    emb = d2lf_torch.embed_pairs(net, images, batch_size=7, devices=TORCH_CPU)
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
    one = d2lf_torch.embed_pairs(net, images, batch_size=1, devices=TORCH_CPU)
    assert not net.training and onp.abs(one - emb).max() < 1e-6


def test_embed_pairs_refuses_bad_shapes(d2lf):
    images, _ = synthetic_pairs()
    for bad in [images[0], images[:1], images[:, :0]]:
        with pytest.raises(ValueError, match=r'\(2, n, 3, h, w\)'):
            d2lf.embed_pairs(tiny_net(d2lf), bad, devices=cpus(d2lf))


def test_evaluate_verification_keys_and_ranges(d2lf):
    images, issame = synthetic_pairs(num_pairs=40)
    result = d2lf.evaluate_verification(tiny_net(d2lf), (images, issame),
                                        devices=cpus(d2lf))
    assert set(result) == {'acc', 'acc_std', 'acc_se', 'threshold', 'val',
                           'val_std', 'far'}
    assert result['acc_se'] == pytest.approx(result['acc_std'] / 3)
    assert 0 <= result['acc'] <= 1 and 0 <= result['val'] <= 1


# ------------------------------------------- every verification set at once

IMAGE = 112


def jpeg(value):
    """A flat gray 112x112 JPEG whose pixels are all `value`."""
    ok, data = cv2.imencode('.jpg', onp.full((IMAGE, IMAGE, 3), value,
                                             onp.uint8))
    assert ok
    return data.tobytes()


def write_set(path, num_pairs=20, seed=0):
    """A .bin of pairs of flat grays, those of a same pair alike."""
    rng = onp.random.default_rng(seed)
    issame = [bool(i % 2) for i in range(num_pairs)]
    values = rng.integers(0, 240, 2 * num_pairs)
    values[1::2] = onp.where(issame, values[::2] + rng.integers(0, 16),
                             values[1::2])
    binsets.save_bin_pairs(str(path), [jpeg(v) for v in values], issame)
    return onp.array(issame)


def gray_embedding(images):
    """Unit embeddings at an angle set by each image's mean gray, plus a
    little fixed noise: alike grays give a high cosine."""
    gray = images[0].reshape(images.shape[1], -1).mean(axis=1) / 255
    noise = onp.random.default_rng(1).normal(0, 0.1, size=(len(gray), 2))
    embeddings = onp.stack([onp.cos(onp.pi * gray), onp.sin(onp.pi * gray)],
                           axis=1) + noise
    return embeddings / onp.linalg.norm(embeddings, axis=1, keepdims=True)


def test_finds_exactly_the_bin_files_in_the_papers_order(d2lf, tmp_path):
    for name in ('zzz', 'cplfw', 'lfw', 'agedb_30', 'aaa', 'cfp_fp'):
        write_set(tmp_path / f'{name}.bin', num_pairs=10)
    (tmp_path / 'notes.txt').write_text('not a set')
    (tmp_path / 'lfw.bin.bak').write_bytes(b'old')
    (tmp_path / 'train.rec').write_bytes(b'')
    os.mkdir(tmp_path / 'folder.bin')  # a folder is not a set
    found = d2lf.find_bin_sets(str(tmp_path))
    assert list(found) == ['lfw', 'cfp_fp', 'agedb_30', 'cplfw', 'aaa',
                           'zzz']
    assert found['lfw'] == os.path.join(str(tmp_path), 'lfw.bin')


def test_evaluates_every_set_and_prints_a_row_each(d2lf, tmp_path, capsys):
    write_set(tmp_path / 'lfw.bin', seed=1)
    write_set(tmp_path / 'other.bin', num_pairs=30, seed=2)
    (tmp_path / 'readme.md').write_text('skipped')
    seen = []

    def embed(images):
        seen.append(images.shape)
        return gray_embedding(images)

    results = d2lf.evaluate_bin_sets(embed, str(tmp_path))
    assert list(results) == ['lfw', 'other']
    assert seen == [(2, 40, 3, IMAGE, IMAGE), (2, 60, 3, IMAGE, IMAGE)]
    assert [results[n]['pairs'] for n in results] == [20, 30]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # the header, then one row per set
    assert lines[1].split()[:2] == ['lfw', '20']
    assert lines[2].split()[:2] == ['other', '30']
    assert f"{results['other']['acc']:.4f} ± " \
           f"{results['other']['acc_std']:.4f}" in lines[2]


def test_accuracy_and_val_equal_those_of_the_same_scores(d2lf, tmp_path):
    write_set(tmp_path / 'lfw.bin', num_pairs=40, seed=3)
    result = d2lf.evaluate_bin_sets(gray_embedding, [str(tmp_path)])['lfw']
    images, issame = d2lf.load_bin(str(tmp_path / 'lfw.bin'))
    scores = d2lf.pair_scores(gray_embedding(images))
    acc, acc_std, _ = d2lf.verification_accuracy(scores, issame)
    val, val_std, far = d2lf.val_at_far(scores, issame)
    assert (result['acc'], result['acc_std']) == (acc, acc_std)
    assert (result['val'], result['val_std'], result['far']) == \
        (val, val_std, far)
    assert acc > 0.5  # the gray levels tell the pairs apart somewhat


def test_several_folders_and_a_name_in_two(d2lf, tmp_path):
    first, second = tmp_path / 'a', tmp_path / 'b'
    first.mkdir()
    second.mkdir()
    write_set(first / 'lfw.bin')
    write_set(second / 'calfw.bin')
    assert list(d2lf.find_bin_sets([str(first), str(second)])) == \
        ['lfw', 'calfw']
    write_set(second / 'lfw.bin')
    with pytest.raises(ValueError, match='two verification sets named'):
        d2lf.find_bin_sets([str(first), str(second)])


def test_no_set_at_all(d2lf, tmp_path):
    (tmp_path / 'notes.txt').write_text('nothing to evaluate')
    with pytest.raises(FileNotFoundError, match='no .bin verification set'):
        d2lf.evaluate_bin_sets(gray_embedding, str(tmp_path))


@pytest.mark.parametrize('damage', ['truncated', 'not_a_pickle',
                                    'bad_jpeg', 'fifo'])
def test_a_damaged_set_is_named(d2lf, tmp_path, damage):
    write_set(tmp_path / 'lfw.bin')
    bad = tmp_path / 'cfp_fp.bin'
    if damage == 'truncated':
        write_set(bad)
        bad.write_bytes(bad.read_bytes()[:-100])
    elif damage == 'not_a_pickle':
        bad.write_bytes(b'\x00' * 1000)
    elif damage == 'bad_jpeg':
        binsets.save_bin_pairs(str(bad), [b'\xff\xd8 not a jpeg' * 10] * 20,
                               [True, False] * 5)
    else:
        os.mkfifo(bad)  # would block a plain open() forever
    with pytest.raises(Exception) as info:
        d2lf.evaluate_bin_sets(gray_embedding, str(tmp_path))
    assert str(bad) in str(info.value)


def test_embeddings_must_be_unit_and_one_per_image(d2lf, tmp_path):
    write_set(tmp_path / 'lfw.bin')
    path = str(tmp_path / 'lfw.bin')
    with pytest.raises(ValueError, match='unit-length') as info:
        d2lf.evaluate_bin_sets(lambda images: 2 * gray_embedding(images),
                              str(tmp_path))
    assert path in str(info.value)
    with pytest.raises(ValueError, match='one unit-length embedding per'):
        d2lf.evaluate_bin_sets(lambda images: gray_embedding(images)[:-1],
                              str(tmp_path))
    with pytest.raises(ValueError, match='unit-length'):  # NaN: all zeros
        d2lf.evaluate_bin_sets(lambda images: gray_embedding(images) * onp.nan,
                              str(tmp_path))
