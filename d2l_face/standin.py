"""A generated stand-in for the CASIA-WebFace "ultrasmall" face dataset.

When the real data cannot be downloaded, the chapter trains on synthetic
faces written in exactly the real on-disk format::

    root/faces-casia-ultrasmall/property        "300,112,112"
    root/faces-casia-ultrasmall/00000000/00000000.jpg ...  one folder a person
    root/faces-casia-ultrasmall/lfw_small.bin   verification pairs
    root/wild/wild_000.jpg ... landmarks.json   faces placed in larger scenes
    root/<either folder>/.standin-made.json     its marker, written last
    root/.standin.lock, .standin-wild.lock      held while generating

The faces are :mod:`d2l_face.faces`' drawings: each identity fixes a
person's traits, each image varies pose, expression, lighting, background,
occlusion, blur, noise and JPEG quality, and the crops are aligned on the
ArcFace template like the real ones. This module lays them out as the
dataset: the training folders, the verification pairs and the wild scenes,
the marker, the workers and the command line. The 600
verification pairs (InsightFace's `.bin` format: a pickled tuple of JPEG
bytes and "same person" flags) use identities that never appear in the
training folders. The defaults (300 identities, 50 images each) take about
50 CPU-seconds, which two worker processes share; the wild scenes alone
(`generate_wild`) take about a second.

Every face is drawn from random numbers seeded by
``(seed, stream, identity, image)``, so the same seed gives byte-identical
files whatever the order or the number of worker processes.

Each folder is built under a temporary name and moved into place
(``d2l_face.publish``). The stand-in replaces only folders it made itself
(they carry its marker); it refuses, with ``publish.ForeignError``, to
touch any other folder of the same name. Run
``python -m d2l_face.standin --root DIR [--wild-only]`` to generate from
the shell.
"""
import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import queue as queue_module
import shutil
import stat
import sys
import time

import cv2
import numpy as onp

from d2l_face import binsets, faces, formats, orphans, publish

# 2: a marker inside each folder instead of one in the root; the files
# themselves are the same as format 1's.
FORMAT_VERSION = 2
DATASET_DIR = 'faces-casia-ultrasmall'
WILD_DIR = 'wild'
# Identity numbers of the verification and wild faces start far above any
# training label, so they can never be training identities.
VAL_ID_OFFSET = 1_000_000
WILD_ID_OFFSET = 2_000_000
_IDENTITY, _IMAGE, _PAIRS, _WILD = range(4)  # tags that separate rng streams


def _jpeg(img, quality):
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError('JPEG encoding failed')
    return buf.tobytes()


def _person(seed, identity, geometry_scale=1.0):
    rng = onp.random.default_rng([seed, _IDENTITY, identity])
    return faces.draw_identity_params(rng, geometry_scale)


def image_bytes(seed, identity, index):
    """JPEG bytes of image `index` of `identity` (training or validation)."""
    rng = onp.random.default_rng([seed, _IMAGE, identity, index])
    return _jpeg(*faces.render_image(_person(seed, identity), rng))


def _work(seed, per_class, out_dir, identities, keys):
    """Write the folders of `identities`, then render the images `keys`.

    Yields ('identity', number) as each folder is done, then
    ('images', {key: JPEG bytes}) for the verification images.
    """
    for identity in identities:
        folder = os.path.join(out_dir, formats.identity_folder(identity))
        os.mkdir(folder)
        for k in range(per_class):
            name = f'{k:08d}{formats.IMAGE_SUFFIX}'
            with open(os.path.join(folder, name), 'wb') as f:
                f.write(image_bytes(seed, identity, k))
        yield 'identity', identity
    yield 'images', {key: image_bytes(seed, *key) for key in keys}


# Worker processes end with their parent (`orphans.die_with_parent`). Tests
# switch the Linux-only mechanism off to check that the portable one
# suffices on its own.
_USE_PDEATHSIG = True


def _worker_main(queue, parent_pid, use_pdeathsig, *args):
    """Body of a worker process: pass on what `_work` yields."""
    orphans.die_with_parent(parent_pid, use_pdeathsig)
    cv2.setNumThreads(1)  # one process per core already keeps them busy
    try:
        for event in _work(*args):
            queue.put(event)
    except Exception as e:  # hand the error (a full disk, say) to the parent
        queue.put(('error', e))
        raise
    queue.put(('done', None))


def _run_workers(workers, seed, per_class, out_dir, identities, keys):
    """Yield the events of `_work` from `workers` spawned processes.

    A worker's exception is raised again here; a worker that dies (say,
    killed, or it crashed while importing) stops the run with an error
    instead of leaving us waiting forever.
    """
    # Not fork: a forked child can hang on the parent's OpenCV thread pool.
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(queue, os.getpid(), _USE_PDEATHSIG, seed,
                               per_class, out_dir, identities[w::workers],
                               keys[w::workers]))
             for w in range(workers)]
    for proc in procs:
        proc.start()
    try:
        running = workers
        while running:
            try:
                kind, value = queue.get(timeout=1)
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError('stand-in: a worker process failed, '
                                       'see its error above') from None
                continue
            if kind == 'error':
                raise value
            if kind == 'done':
                running -= 1
            else:
                yield kind, value
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()


def validation_identities(num_pairs):
    """The identity numbers the verification pairs are drawn from."""
    return list(range(VAL_ID_OFFSET, VAL_ID_OFFSET + max(2, num_pairs // 2)))


def _pair_plan(seed, num_pairs):
    """Half same-person, half different-person pairs, in a seeded order.

    Each pair is ((identity, image), (identity, image), issame).
    """
    ids = validation_identities(num_pairs)
    n, half = len(ids), num_pairs // 2
    rng = onp.random.default_rng([seed, _PAIRS])
    plan = [((ids[i % n], 2 * (i // n)), (ids[i % n], 2 * (i // n) + 1), True)
            for i in range(half)]
    for j in range(half):
        a, b = j % n, (j + int(rng.integers(1, n))) % n
        plan.append(((ids[a], 1000 + j // n), (ids[b], 2000 + j // n), False))
    return [plan[i] for i in rng.permutation(len(plan))]


def _pair_images(plan):
    return sorted({key for a, b, _ in plan for key in (a, b)})


def _assemble_pairs(plan, jpeg):
    bins = [jpeg[key] for a, b, _ in plan for key in (a, b)]
    return bins, [bool(same) for _, _, same in plan]


def make_verification_pairs(seed=0, num_pairs=600):
    """Return (bins, issame_list): the contents of `lfw_small.bin`."""
    plan = _pair_plan(seed, num_pairs)
    jpeg = {key: image_bytes(seed, *key) for key in _pair_images(plan)}
    return _assemble_pairs(plan, jpeg)


def make_wild(seed, num_wild, out_dir):
    """Write the wild scenes and `landmarks.json` into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    landmarks = {}
    for i in range(num_wild):
        person = _person(seed, WILD_ID_OFFSET + i, geometry_scale=0.2)
        rng = onp.random.default_rng([seed, _WILD, i])
        img, lm = faces.render_wild(person, rng)
        name = f'wild_{i:03d}.jpg'
        with open(os.path.join(out_dir, name), 'wb') as f:
            f.write(_jpeg(img, 90))
        landmarks[name] = onp.round(lm, 3).tolist()
    with open(os.path.join(out_dir, 'landmarks.json'), 'w') as f:
        json.dump(landmarks, f, indent=1, sort_keys=True)


def _check_args(seed, **counts):
    """Check that `seed` and the `counts` given are ints in their range."""
    for name, value in [('seed', seed), *counts.items()]:
        if isinstance(value, bool) or not isinstance(value, (int, onp.integer)):
            raise ValueError(f'{name} must be an int, not {value!r}')
    if seed < 0:
        raise ValueError(f'seed must be >= 0, not {seed}')
    num_classes = counts.get('num_classes', 1)
    if not 1 <= num_classes <= VAL_ID_OFFSET:
        raise ValueError(f'num_classes must be in [1, {VAL_ID_OFFSET}], '
                         f'not {num_classes}')
    if counts.get('images_per_class', 1) < 1:
        raise ValueError(f'images_per_class must be >= 1, '
                         f'not {counts["images_per_class"]}')
    num_val_pairs = counts.get('num_val_pairs', 2)
    if num_val_pairs < 2 or num_val_pairs % 2:
        raise ValueError(f'num_val_pairs must be even and >= 2, '
                         f'not {num_val_pairs}')
    if counts.get('num_wild', 0) < 0:
        raise ValueError(f'num_wild must be >= 0, not {counts["num_wild"]}')


# --- Which folders are the stand-in's own --------------------------------
#
# Each folder the stand-in makes carries FOLDER_MARKER, written last, before
# the folder is moved into place in one rename. So a folder in the root is
# complete when its marker matches the parameters asked for, and it is the
# stand-in's own (which it may replace) when it has a valid marker of the
# stand-in at all. Anything else is refused, never deleted.

MADE_BY = 'd2l_face.standin'
FOLDER_MARKER = '.standin-made.json'
# Format 1 kept one marker in the root, written after both folders; its
# folders have no FOLDER_MARKER and count as the stand-in's own while it is
# there.
LEGACY_MARKER = '.standin-complete.json'
_FOLDERS = {'dataset': DATASET_DIR, 'wild': WILD_DIR}
_LOCKS = {'dataset': '.standin.lock', 'wild': '.standin-wild.lock'}


def _refuse(path, what):
    """The error for a folder in the stand-in's way that it did not make."""
    return publish.ForeignError(path, what, 'Move it elsewhere, or generate '
                                'the stand-in under another root.')


def _own_marker(folder, kind):
    """The stand-in's marker of `folder` if it has a valid one, else None."""
    marker = publish.read_marker(os.path.join(folder, FOLDER_MARKER))
    if (marker is not None and marker.get('made_by') == MADE_BY
            and marker.get('kind') == kind
            and isinstance(marker.get('params'), dict)):
        return marker
    return None


def is_standin(folder):
    """Whether `folder` is a training set that the stand-in generator made."""
    return _own_marker(folder, 'dataset') is not None


def _expected_marker(kind, params):
    """The whole marker a complete folder of `kind` made with `params` has."""
    if kind == 'dataset':
        val = validation_identities(params['num_val_pairs'])
        # Ranges, not lists: the marker stays small for any number of classes.
        info = {'train_identity_range': [0, params['num_classes']],
                'val_identity_range': [val[0], val[-1] + 1]}
    else:
        info = {'wild_identity_range': [WILD_ID_OFFSET,
                                        WILD_ID_OFFSET + params['num_wild']]}
    return {'made_by': MADE_BY, 'kind': kind, 'params': params, **info}


def _is_complete(root, kind, params):
    """Whether the folder of `kind` carries exactly the marker it would get.

    Every key and value, not just the parameters: a marker of another shape
    (edited, cut, or written by another version) proves nothing."""
    folder = os.path.join(root, _FOLDERS[kind])
    marker = _own_marker(folder, kind)
    return marker is not None and publish.same_json(
        marker, _expected_marker(kind, params))


def _legacy_owned(root):
    """Whether a format-1 root marker vouches for the folders in `root`."""
    marker = publish.read_marker(os.path.join(root, LEGACY_MARKER))
    params = marker.get('params') if marker is not None else None
    return (isinstance(params, dict)
            and publish.same_json(params.get('format_version'), 1)
            and isinstance(marker.get('train_identities'), list))


def _claim(root, kind):
    """How the folder of `kind` in `root` may go: 'absent', 'own' or 'empty'.

    Raises publish.ForeignError when it holds anything the stand-in did not
    make.
    """
    path = os.path.join(root, _FOLDERS[kind])
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 'absent'
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(path, 'is a file or a link, not a folder the '
                             'stand-in made')
    if _own_marker(path, kind) is not None or _legacy_owned(root):
        return 'own'
    if not os.listdir(path):
        return 'empty'
    raise _refuse(path, f'holds files and no valid {FOLDER_MARKER} of the '
                         f'stand-in')


def _drop_legacy_marker(root):
    """Remove the format-1 marker once no folder in `root` relies on it."""
    for kind, name in _FOLDERS.items():
        path = os.path.join(root, name)
        if os.path.lexists(path) and _own_marker(path, kind) is None:
            return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(root, LEGACY_MARKER))


# --- Temporary folders ----------------------------------------------------
#
# A build happens in ROOT/.standin-tmp-HOST-PID-RANDOM, named and cleaned up
# by d2l_face.publish: if the process is killed, the folder stays, and a later
# run removes it once it can prove that PID on this HOST is dead.

_TMP_PREFIX = '.standin-tmp-'


@contextlib.contextmanager
def _exclusive(path):
    """Hold a lock file so that only one process at a time builds in a root."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, build unguarded
        yield
        return
    with open(path, 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- Building --------------------------------------------------------------

def generate(root, seed=0, num_classes=300, images_per_class=50,
             num_val_pairs=600, num_wild=8, force=False, workers=None):
    """Generate the stand-in under `root` (once); return its dataset folder.

    Also generates the wild scenes (see `generate_wild`). A folder is reused
    when its marker matches the parameters; otherwise (or with `force`) it
    is built in a temporary folder and moved into place. Folders the
    stand-in did not make raise publish.ForeignError. `workers` (default: up
    to 2 processes for big runs) does not change the output.
    """
    _check_args(seed, num_classes=num_classes,
                images_per_class=images_per_class,
                num_val_pairs=num_val_pairs, num_wild=num_wild)
    params = {'format_version': FORMAT_VERSION, 'seed': int(seed),
              'num_classes': int(num_classes),
              'images_per_class': int(images_per_class),
              'num_val_pairs': int(num_val_pairs)}
    root = os.path.abspath(root)
    # Refuse a foreign folder before any work (a minute for the dataset).
    for kind, wanted in (('dataset', params),
                         ('wild', _wild_params(seed, num_wild))):
        if force or not _is_complete(root, kind, wanted):
            _claim(root, kind)
    _generate(root, 'dataset', params, force,
              functools.partial(_build_dataset, params=params,
                                workers=workers))
    generate_wild(root, seed=seed, num_wild=num_wild, force=force)
    return os.path.join(root, DATASET_DIR)


def generate_wild(root, seed=0, num_wild=8, force=False):
    """Generate only the wild scenes under `root` (once); return their folder.

    Takes a second or two and touches nothing in `root` but `wild`, its
    lock and stale temporary folders.
    """
    _check_args(seed, num_wild=num_wild)
    params = _wild_params(seed, num_wild)
    root = os.path.abspath(root)
    _generate(root, 'wild', params, force,
              functools.partial(_build_wild, params=params))
    return os.path.join(root, WILD_DIR)


def _wild_params(seed, num_wild):
    return {'format_version': FORMAT_VERSION, 'seed': int(seed),
            'num_wild': int(num_wild)}


def _generate(root, kind, params, force, build):
    """Build the folder of `kind` with `build(folder)` unless it is current."""
    if os.path.isdir(root):  # what killed runs left, even when all is built
        publish.remove_stale(root, _TMP_PREFIX)
        publish.remove_stale(root)  # and put back what a killed move set aside
    if not force and _is_complete(root, kind, params):
        return
    if getattr(multiprocessing.current_process(), '_inheriting', False):
        # We are a worker process importing a script that calls generate()
        # at the top level; waiting for the lock its parent holds would hang.
        raise RuntimeError('stand-in: generate() was called while a worker '
                           'process imported the main script; call it under '
                           "`if __name__ == '__main__':`")
    os.makedirs(root, exist_ok=True)
    with _exclusive(os.path.join(root, _LOCKS[kind])):
        # Another process may have built the same thing while we waited.
        if not force and _is_complete(root, kind, params):
            return
        _claim(root, kind)  # refuse a foreign folder before the work
        _rebuild(root, kind, params, build)


def _rebuild(root, kind, params, build):
    """Build in a temporary folder with its marker, then move it into place."""
    start, name = time.time(), _FOLDERS[kind]
    tmp = publish.create_dir(root, _TMP_PREFIX)
    try:  # whatever fails (a full disk, say), the temporary folder goes
        out = os.path.join(tmp, name)
        os.mkdir(out)
        build(out)
        publish.write_marker(os.path.join(out, FOLDER_MARKER),
                             _expected_marker(kind, params))
        _move_into_place(tmp, root, kind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _drop_legacy_marker(root)
    print(f'stand-in: wrote {os.path.join(root, name)} in '
          f'{time.time() - start:.1f} s', file=sys.stderr)


def _move_into_place(tmp, root, kind):
    """Move the new folder in; the old one goes if it is the stand-in's."""
    name = _FOLDERS[kind]
    target = os.path.join(root, name)
    how = _claim(root, kind)  # again: the root may have changed meanwhile
    if how == 'empty':
        os.rmdir(target)  # fails, harmlessly, if files arrived meanwhile
    publish.move_all([(os.path.join(tmp, name), target)])


def _build_dataset(out, params, workers):
    """Write the training folders and the verification pairs into `out`."""
    seed, n = params['seed'], params['num_classes']
    with open(os.path.join(out, formats.PROPERTY_FILE), 'w') as f:
        f.write(formats.format_property(n, faces.SIZE, faces.SIZE) + '\n')
    plan = _pair_plan(seed, params['num_val_pairs'])
    keys = _pair_images(plan)
    if workers is None:  # starting processes costs about a second
        big = n * params['images_per_class'] + len(keys) > 2000
        workers = min(2, os.cpu_count() or 1) if big else 1
    args = (seed, params['images_per_class'], out, list(range(n)), keys)
    events = _run_workers(workers, *args) if workers > 1 else _work(*args)
    done, shown, jpeg = 0, 0, {}
    for kind, value in events:
        if kind == 'images':
            jpeg.update(value)
            continue
        done += 1
        if done == n or done - shown >= n / 10:
            print(f'stand-in: {done}/{n} identities', file=sys.stderr)
            shown = done
    path = os.path.join(out, 'lfw_small.bin')
    binsets.save_bin_pairs(path, *_assemble_pairs(plan, jpeg))
    print(f'stand-in: {len(plan)} verification pairs', file=sys.stderr)


def _build_wild(out, params):
    make_wild(params['seed'], params['num_wild'], out)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Generate the synthetic faces-casia-ultrasmall stand-in.')
    parser.add_argument('--root', required=True, help='output folder')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if a complete copy is there')
    parser.add_argument('--wild-only', action='store_true',
                        help='generate only the wild scenes (seconds)')
    args = parser.parse_args(argv)
    make = generate_wild if args.wild_only else generate
    try:
        print(make(args.root, seed=args.seed, force=args.force))
    except (publish.ForeignError, ValueError) as e:
        sys.exit(f'stand-in: error: {e}')


if __name__ == '__main__':
    # Run through the package's module so that worker processes, which
    # import d2l_face.standin, find the same functions.
    from d2l_face.standin import main as _main
    _main()
