"""Test-run order: the notebooks that train start first.

With ``make test`` the tests run in several workers, and each notebook goes
whole to one worker. The two training notebooks take most of the time, so
they are handed out first, one to each worker, and everything else fills in
beside them; otherwise they could start last, or both in one worker.
"""
import os

LONGEST_FIRST = ('training.ipynb',)


def pytest_collection_modifyitems(items):
    def starts_late(item):
        return os.path.basename(str(item.path)) not in LONGEST_FIRST
    items.sort(key=starts_late)  # stable: cells keep their order
