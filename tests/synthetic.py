"""Framework-free test data and a deadline, shared by both tabs' tests."""
import contextlib
import os
import shutil
import signal

import numpy as onp


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The small stand-in of conftest's `standin_root`: NUM_CLASSES x PER_CLASS.
NUM_CLASSES, PER_CLASS = 6, 5


def packless_copy(standin_root, tmp_path):
    """A private copy of the small stand-in (without any pack), as a str."""
    from d2l_face import standin
    copy = tmp_path / 'faces'
    shutil.copytree(standin_root / standin.DATASET_DIR, copy,
                    ignore=shutil.ignore_patterns('train.*'))
    return str(copy)


# What "raises at once" allows before a test calls it a hang: generous, so
# that a loaded machine (two workers on shared cores) never trips it, and
# still far below the minutes a loop that never ends would take.
HANG = 60


@contextlib.contextmanager
def deadline(seconds, error=TimeoutError):
    """Fail with `error` when the block runs longer than `seconds`.

    Code that turns any OSError into its own error would catch a
    TimeoutError: give it an `error` that is no Exception."""
    def expire(signum, frame):
        raise error(f'still running after {seconds} s')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synthetic_pairs(num_pairs=10, size=16, seed=0):
    """Pairs of random images as load_bin returns them; every other same."""
    rng = onp.random.default_rng(seed)
    first = rng.integers(0, 256, (2 * num_pairs, 3, size, size), onp.uint8)
    images = onp.stack([first, first[:, :, :, ::-1]])
    return images, onp.arange(num_pairs) % 2 == 0


def tiny_class_images(num_classes=4, per_class=16, seed=0):
    """Shuffled 112x112 float32 images whose class sets color and stripes."""
    rng = onp.random.default_rng(seed)
    X, y = [], []
    for c in range(num_classes):
        base = onp.zeros((3, 112, 112), onp.float32)
        base[c % 3] = 0.7
        base[:, :, (c * 16) % 112:(c * 16) % 112 + 20] = 0.3
        for _ in range(per_class):
            X.append(onp.clip(base + rng.normal(0, 0.1, base.shape), 0, 1))
            y.append(c)
    order = rng.permutation(len(y))
    return onp.stack(X)[order].astype(onp.float32), onp.array(y)[order]


def to_numpy(x):
    """A NumPy array of a batch of either tab: MXNet's or PyTorch's."""
    return x.asnumpy() if hasattr(x, 'asnumpy') else x.numpy()
