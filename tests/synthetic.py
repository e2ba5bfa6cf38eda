"""Framework-free test data, a deadline and process clean-up, shared by
the test files."""
import contextlib
import os
import shutil
import signal

import cv2
import numpy as onp
import psutil


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


# --- Crafted JPEGs (the format checks and the loaders refuse them) ---------

def jpeg(height, width, **flags):
    """A gray JPEG of this size; `progressive=True` for a progressive one."""
    image = onp.full((height, width, 3), 128, onp.uint8)
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if flags.get('progressive') \
        else []
    return cv2.imencode('.jpg', image, params)[1].tobytes()


def with_claimed_size(data, height, width):
    """Rewrite the frame header of a JPEG to claim another size."""
    from d2l_face import formats
    size = formats.jpeg_size(data)
    sof = data.index(bytes([size[0] >> 8, size[0] & 255,
                            size[1] >> 8, size[1] & 255]))
    return (data[:sof] + bytes([height >> 8, height & 255, width >> 8,
                                width & 255]) + data[sof + 4:])


def smuggled(hidden, shown=(112, 112)):
    """A JPEG whose real frame (claiming `hidden`) sits behind FF 00 and a
    length, followed by a frame header claiming `shown`."""
    body = with_claimed_size(jpeg(8, 8), *hidden)[2:]
    fake_frame = (b'\xff\xc0\x00\x11\x08' + bytes([shown[0] >> 8, shown[0] & 255,
                  shown[1] >> 8, shown[1] & 255]) + b'\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01')
    length = len(body) + 2
    return (b'\xff\xd8\xff\x00' + bytes([length >> 8, length & 255]) + body
            + fake_frame + b'\xff\xd9')


def to_numpy(x):
    """A NumPy array of a batch of either tab: MXNet's or PyTorch's."""
    return x.asnumpy() if hasattr(x, 'asnumpy') else x.numpy()


def assert_close(actual, expected, what):
    """Equal to 1e-5, relative to the largest magnitude of `expected`."""
    actual, expected = onp.asarray(actual), onp.asarray(expected)
    scale = max(1.0, float(onp.abs(expected).max()))
    onp.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale,
                                err_msg=what)


def alive(procs):
    """The processes of `procs` that still run (a zombie has ended)."""
    running = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def end_all(procs):
    """Kill whatever of `procs` still runs: a test leaves nothing behind."""
    for p in alive(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
