"""Fixtures shared by every test file; plain helpers live in synthetic.py.

The tests are laid out as the project is: `tests/modules/` holds one file per
hand-written module of `d2l_face`, `tests/sections/` one file per section of
the chapter (each run over both tabs through the `d2lf` fixture), and this
folder the checks on the book as a whole.
"""
import os
import sys

import pytest

# Test files in the subfolders import `synthetic` from here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import NUM_CLASSES, PER_CLASS, REPO  # noqa: E402


@pytest.fixture(scope='session')
def repo_root():
    return REPO


@pytest.fixture(scope='session')
def standin_root(tmp_path_factory):
    """A small stand-in shared by the test files: NUM_CLASSES x PER_CLASS."""
    from d2l_face import standin
    root = tmp_path_factory.mktemp('standin')
    standin.generate(str(root), num_classes=NUM_CLASSES,
                     images_per_class=PER_CLASS, num_val_pairs=20, num_wild=8)
    return root
