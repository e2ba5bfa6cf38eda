"""How ``make test`` shares the cores: threads per worker, and the order.

With ``make test`` the tests run in one worker per core (pytest-xdist), and
each notebook goes whole to one worker. Two things follow.

- Each worker, and every kernel it starts, computes with its share of the
  cores. PyTorch and MXNet otherwise start a thread per core in every
  process, and two workers with two threads each on two cores train several
  times slower than with one each.
- The training notebooks take most of the time, and so do the deployment
  notebooks, which train the same network when they find none saved (as on
  a fresh machine, where they run beside the training ones). They are
  handed out first, and everything else fills in beside them; otherwise
  they could start last, or all in one worker.
"""
import os

LONGEST_FIRST = ('training.ipynb', 'deployment.ipynb')

_workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _workers > 1:  # before any test module imports a framework
    os.environ.setdefault('OMP_NUM_THREADS',
                          str(max(1, (os.cpu_count() or 1) // _workers)))


def pytest_collection_modifyitems(items):
    def starts_late(item):
        return os.path.basename(str(item.path)) not in LONGEST_FIRST
    items.sort(key=starts_late)  # stable: cells keep their order
