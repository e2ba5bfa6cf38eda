"""Figure 3: verification scoring of 6,000 pairs of 512-d embeddings.

(a) the loop of InsightFace's original LFW-style evaluation, written here
    from its description: squared L2 distances of normalized embeddings,
    thresholds np.arange(0, 4, 0.01), 10 folds of consecutive pairs; for each
    fold, the accuracy of every threshold on the other nine folds (one
    vectorized pass over the pairs per threshold, counting true and false
    positives and negatives as the original does), the first best
    threshold, then its accuracy on the fold (the original's ROC curve and
    VAL@FAR, which need further loops, are left out);
(b) the project's functions from the verification section: d2lf.pair_scores (cosine
    similarity of the pairs) and d2lf.verification_accuracy (one sort and
    cumulative sum per fold), given the same grid as cosine thresholds.
Both are timed from the embeddings, and again from precomputed distances
or scores (the threshold search alone).
The target compares the threshold searches, (a)'s loop against the
project's 10-fold function, each given its input (distances or scores).
The embeddings are synthetic (fixed seed): same-person pairs share a random
direction under strong noise, so that accuracy is about 80% and the best
threshold differs between folds. Besides the timings we check that (a) and
(b) agree exactly on every fold's accuracy and threshold.
"""
import argparse
import _common
from _common import emit, median, paired_ratio, round_robin, spread

import numpy as onp

from d2l_face import mxnet as d2lf

THRESHOLDS = onp.arange(0, 4, 0.01)


def synthetic_pairs(num_pairs=6000, dim=512, noise=3.5, seed=0):
    """Normalized embeddings (2, num_pairs, dim) and issame (num_pairs,)."""
    rng = onp.random.default_rng(seed)
    issame = rng.uniform(size=num_pairs) < 0.5
    base = rng.normal(size=(num_pairs, dim))
    other = onp.where(issame[:, None], base, rng.normal(size=(num_pairs, dim)))
    emb = onp.stack([base + noise * rng.normal(size=(num_pairs, dim)),
                     other + noise * rng.normal(size=(num_pairs, dim))])
    emb /= onp.linalg.norm(emb, axis=2, keepdims=True)
    return emb, issame


def rates_at(threshold, dist, issame):
    """(tpr, fpr, accuracy) when 'same' means dist < threshold.

    Like the original, each call counts all four outcomes (it also serves
    the ROC curve), in one vectorized pass over the pairs."""
    predict = onp.less(dist, threshold)
    true_pos = onp.sum(onp.logical_and(predict, issame))
    false_pos = onp.sum(onp.logical_and(predict, onp.logical_not(issame)))
    true_neg = onp.sum(onp.logical_and(onp.logical_not(predict),
                                       onp.logical_not(issame)))
    false_neg = onp.sum(onp.logical_and(onp.logical_not(predict), issame))
    tpr = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    fpr = false_pos / (false_pos + true_neg) if false_pos + true_neg else 0.0
    return tpr, fpr, (true_pos + true_neg) / dist.size


def loop_search(dist, issame, thresholds=THRESHOLDS, num_folds=10):
    """Baseline (a) on distances: per fold, one pass per threshold."""
    folds = onp.array_split(onp.arange(len(issame)), num_folds)
    accuracies, best = onp.zeros(num_folds), onp.zeros(num_folds)
    for k, test in enumerate(folds):
        train = onp.concatenate(folds[:k] + folds[k + 1:])
        train_acc = onp.zeros(len(thresholds))
        for t, threshold in enumerate(thresholds):
            train_acc[t] = rates_at(threshold, dist[train], issame[train])[2]
        best[k] = thresholds[onp.argmax(train_acc)]
        accuracies[k] = rates_at(best[k], dist[test], issame[test])[2]
    return accuracies, best


def loop_verification(emb1, emb2, issame, thresholds=THRESHOLDS):
    """Baseline (a) from embeddings: squared distances, then the loop."""
    dist = onp.sum(onp.square(onp.subtract(emb1, emb2)), axis=1)
    return loop_search(dist, issame, thresholds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    emb, issame = synthetic_pairs()
    dist = onp.sum(onp.square(emb[0] - emb[1]), axis=1)
    print(f'{len(issame)} pairs of {emb.shape[2]}-d embeddings, '
          f'{issame.sum()} same; {len(THRESHOLDS)} thresholds; 10 folds; '
          f'{args.repeats} rounds; load {_common.load()}')
    cases = {'a': lambda: loop_verification(emb[0], emb[1], issame),
             'a search': lambda: loop_search(dist, issame)}
    if hasattr(d2lf, 'verification_accuracy'):
        # The project scores pairs by cosine similarity, 'same' when the
        # score exceeds a threshold. For unit vectors the squared distance
        # is 2 - 2 cos, so the grid d = 0, 0.01, ... becomes 1 - d / 2, in
        # the same order (the first best grid point is the same one).
        grid = 1 - THRESHOLDS / 2
        pairs = onp.empty((2 * len(issame), emb.shape[2]))
        pairs[0::2], pairs[1::2] = emb[0], emb[1]  # the layout of pair_scores
        scores = d2lf.pair_scores(pairs)
        cases['b'] = lambda: d2lf.verification_accuracy(
            d2lf.pair_scores(pairs), issame, 10, grid)
        cases['b search'] = lambda: d2lf.verification_accuracy(
            scores, issame, 10, grid)
        print('  (b) is d2lf.pair_scores + d2lf.verification_accuracy '
              '(verification section), on the equivalent grid of cosine thresholds')
    runs = round_robin({k: (lambda f: lambda: (f(), 1)[1])(f)
                        for k, f in cases.items()}, repeats=args.repeats)
    ms = {k: [r['wall'] * 1e3 for r in v] for k, v in runs.items()}
    names = {'a': '(a) from embeddings: distances + loop',
             'b': '(b) from embeddings: pair_scores + vectorized',
             'a search': '(a) threshold search only (given distances)',
             'b search': '(b) threshold search only (given scores)'}
    for key in ('a', 'b', 'a search', 'b search'):
        if key in ms:
            print(f'  {names[key]:46s} {spread(ms[key])} ms')
    acc_a, thr_a = loop_verification(emb[0], emb[1], issame)
    print(f'  (a) accuracy {acc_a.mean():.4f}, std over folds '
          f'{acc_a.std():.4f}; '
          f'thresholds (squared distance) {onp.round(thr_a, 2).tolist()}')
    a, a_search = median(ms['a']), median(ms['a search'])
    if 'b' not in cases:
        print('  (b) missing: no verification_accuracy in d2l_face.mxnet')
        emit(figure='3. verification (ms)', value=None, unit='ms',
             baselines={'(a) loop': a}, ratio='(b) missing',
             target='>= 50x faster, same results', met=None)
        return
    mean_b, std_b, thr_b = d2lf.verification_accuracy(scores, issame, 10,
                                                      grid)
    index_a = [int(onp.flatnonzero(THRESHOLDS == t)[0]) for t in thr_a]
    index_b = [int(onp.flatnonzero(grid == t)[0]) for t in thr_b]
    folds = onp.array_split(onp.arange(len(issame)), 10)
    acc_b = onp.array([((scores[f] > t) == issame[f]).mean()
                       for f, t in zip(folds, thr_b)])
    same = (index_a == index_b and onp.array_equal(acc_a, acc_b) and
            mean_b == acc_a.mean() and std_b == acc_a.std())
    print(f'  (b) accuracy {mean_b:.4f}, std over folds {std_b:.4f}; '
          f'thresholds (as '
          f'squared distance 2 - 2t) '
          f'{onp.round(THRESHOLDS[index_b], 2).tolist()}')
    print(f'  same grid point chosen in every fold: {index_a == index_b}; '
          f'fold accuracies, mean and std equal: '
          f'{onp.array_equal(acc_a, acc_b) and mean_b == acc_a.mean()}')
    b_search = median(ms['b search'])
    search = paired_ratio(ms['a search'], ms['b search'])
    whole = paired_ratio(ms['a'], ms['b'])
    print(f'  per-round ratios (medians): (a)/(b) = {search:.0f}x for the '
          f'threshold search (the target), {whole:.0f}x from embeddings')
    emit(figure='3. verification search (ms)', value=b_search, unit='ms',
         baselines={'(a) loop': a_search},
         ratio=f'{search:.0f}x faster (from embeddings {whole:.0f}x); '
               f'equal: {same}',
         target='>= 50x faster, same results',
         met=search >= 50 and same)


if __name__ == '__main__':
    main()
