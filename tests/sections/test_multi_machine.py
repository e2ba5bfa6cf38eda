"""Section `multi_machine`: the margin layer sharded over the ranks of a
torch.distributed job (Gloo), against one process (the PyTorch tab)."""
import psutil
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from d2l_face import cluster
from d2l_face import torch as d2lf
from synthetic import assert_close

# (s, m1, m2, m3): ArcFace, and the combined margin of the ArcFace paper.
MARGINS = {name: (64.0,) + d2lf.MARGIN_SETTINGS[name]
           for name in ('arcface', 'combined')}


def one_process(X, y, W, margin):
    """Per-example loss; gradients of its sum w.r.t. X and W, in one process."""
    full = d2lf.MarginLogits(W.shape[0], W.shape[1], *margin)
    full.weight = nn.Parameter(W.clone())
    return d2lf.loss_and_grads(
        lambda X, y: F.cross_entropy(full(X, y), y, reduction='none'),
        [full.weight], X, y)


def test_a_random_margin_problem_is_alike_for_a_seed():
    a, b, c = (d2lf.random_margin_problem(10, 8, 6, seed)
               for seed in (3, 3, 4))
    assert [tuple(t.shape) for t in a] == [(6, 8), (6,), (10, 8)]
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert 0 <= int(a[1].min()) and int(a[1].max()) < 10


@pytest.mark.parametrize('world_size,margin_name', [(2, 'arcface'),
                                                    (3, 'combined')])
def test_sharded_loss_across_processes_equals_one_process(
        tmp_path, world_size, margin_name):
    num_classes, dim, batch = 10, 8, 3
    margin = MARGINS[margin_name]
    out_dir = tmp_path / 'out'  # the ranks make it
    code = (f'from d2l_face import torch as d2lf; d2lf.sharded_loss_worker('
            f'{str(out_dir)!r}, {num_classes}, {dim}, {batch}, {margin!r}, '
            f'seed=5)')
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster.launch_local_torchrun(['-c', code], world_size, timeout=300)
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before]
    assert not left, f'processes left running: {left}'
    ranks = [d2lf.load_tensors(out_dir / f'rank{r}.pt')
             for r in range(world_size)]
    ranges = d2lf.split_classes(num_classes, world_size)
    assert [r['start'] for r in ranks] == [start for start, _ in ranges]
    X, y, W = d2lf.random_margin_problem(num_classes, dim,
                                         batch * world_size, seed=5)
    loss1, grad_x1, grad_w1 = one_process(X, y, W, margin)
    assert_close(torch.cat([r['loss'] for r in ranks]), loss1, 'loss')
    assert_close(torch.cat([r['grad_x'] for r in ranks]), grad_x1,
                 'gradient of the embeddings')
    for r, (start, stop) in zip(ranks, ranges):
        assert_close(r['grad_w'], grad_w1[start:stop],
                     f'gradient of the weight rows {start}:{stop}')
