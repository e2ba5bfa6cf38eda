"""How ``make test`` shares the cores: threads per worker, and the order.

With ``make test`` the tests run in one worker per core (pytest-xdist), and
each notebook goes whole to one worker. Two things follow.

- Each worker, and every kernel it starts, computes with its share of the
  cores. PyTorch and MXNet otherwise start a thread per core in every
  process, and two workers with two threads each on two cores train several
  times slower than with one each.
- The training notebooks take most of the time. The deployment notebook of
  a tab loads the network its training notebook saved, and trains it again
  when it finds none (as on a fresh machine, if it ran beside the training).
  So each tab's training and deployment notebooks go to one worker as one
  unit of work (``--dist loadgroup``), training first; every other test file
  and notebook is a unit of its own, as ``--dist loadscope`` would make it.
  (pytest-xdist hands out the units with the most tests first.)
"""
import os

import pytest

# Per tab, in the order a worker runs them.
TRAIN_THEN_DEPLOY = ('training.ipynb', 'deployment.ipynb')

_workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _workers > 1:  # before any test module imports a framework
    os.environ.setdefault('OMP_NUM_THREADS',
                          str(max(1, (os.cpu_count() or 1) // _workers)))


def _work_unit(item):
    """The unit of work an item belongs to, and its place in the order."""
    path = str(item.path)
    name = os.path.basename(path)
    if name in TRAIN_THEN_DEPLOY:
        tab = os.path.basename(os.path.dirname(path))
        return f'{tab}-training-and-deployment', TRAIN_THEN_DEPLOY.index(name)
    return path, len(TRAIN_THEN_DEPLOY)


# Before pytest-xdist reads the marks (its own hook of this name).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_work_unit(item)[0]))
    # Training before deployment; stable, so cells keep their order.
    items.sort(key=lambda item: _work_unit(item)[1])
