import os
import shutil

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def repo_root():
    return REPO


# A small stand-in shared by the test files: NUM_CLASSES x PER_CLASS images.
NUM_CLASSES, PER_CLASS = 6, 5


@pytest.fixture(scope='session')
def standin_root(tmp_path_factory):
    from d2l_face import standin
    root = tmp_path_factory.mktemp('standin')
    standin.generate(str(root), num_classes=NUM_CLASSES,
                     images_per_class=PER_CLASS, num_val_pairs=20, num_wild=8)
    return root


def packless_copy(standin_root, tmp_path):
    """A private copy of the small stand-in (without any pack), as a str."""
    from d2l_face import standin
    copy = tmp_path / 'faces'
    shutil.copytree(standin_root / standin.DATASET_DIR, copy,
                    ignore=shutil.ignore_patterns('train.*'))
    return str(copy)
