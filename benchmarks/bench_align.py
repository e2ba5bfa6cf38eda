"""Figure 2: face alignment, microseconds per face (wall clock).

(a) the original chapter's _face_align: scikit-image SimilarityTransform.estimate
    followed by cv2.warpAffine (reimplemented here);
(b) the project's d2lf.face_align (closed-form least squares in plain Python,
    landmark checks, then cv2.warpAffine);
(c) the limit: cv2.warpAffine alone, with each face's matrix computed
    beforehand.
The faces are the stand-in's wild scenes (400x300, with their landmarks) and
scikit-image's astronaut (512x512) with the landmarks used in the chapter.
We also compare the crops of (b) with those of (a), pixel by pixel.
"""
import argparse
import json
import os

import _common
from _common import (emit, median, paired_ratio, per_unit_us, round_robin,
                     spread)

import cv2
import numpy as onp
from skimage import data as skimage_data
from skimage import transform as skimage_transform

from d2l_face import checks, formats
from d2l_face import mxnet as d2lf

# The original chapter wrote the ArcFace template out (as mxnet.np); its values
# are those of formats.ARCFACE_TEMPLATE, the one definition we import.
SOURCE_TEMPLATE = formats.ARCFACE_TEMPLATE


def source_face_align(image, landmark):
    """Baseline (a): the original chapter's alignment."""
    assert landmark.shape == (5, 2)
    tform = skimage_transform.SimilarityTransform()
    tform.estimate(landmark, SOURCE_TEMPLATE)
    return cv2.warpAffine(image, tform.params[0:2, :], (112, 112),
                          borderValue=0.0)


def faces():
    """[(image, landmarks)] of the wild scenes and the astronaut."""
    data_dir = _common.dataset_dir()
    wild = os.path.join(os.path.dirname(data_dir), 'wild')
    with open(os.path.join(wild, 'landmarks.json')) as f:
        landmarks = json.load(f)
    result = [(cv2.imread(os.path.join(wild, name)), onp.array(points))
              for name, points in sorted(landmarks.items())]
    astronaut = onp.ascontiguousarray(skimage_data.astronaut()[:, :, ::-1])
    result.append((astronaut, onp.array([
        [204.4, 101.9], [247.1, 103.1], [225.6, 126.9], [202.5, 140.0],
        [245.0, 139.0]])))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=41)
    parser.add_argument('--passes', type=int, default=50,
                        help='passes over all faces in one timed run')
    args = parser.parse_args()
    cases = faces()
    matrices = [d2lf.estimate_similarity(checks.check_landmarks(lm),
                                         d2lf.ARCFACE_TEMPLATE)
                for _, lm in cases]
    print(f'{len(cases)} faces x {args.passes} passes per run, '
          f'{args.repeats} rounds; cv2 threads {cv2.getNumThreads()}; '
          f'load {_common.load()}')

    def timed(align):
        def run():
            for _ in range(args.passes):
                for image, landmark in cases:
                    align(image, landmark)
            return args.passes * len(cases)
        return run

    def warp_only():
        for _ in range(args.passes):
            for (image, _), M in zip(cases, matrices):
                cv2.warpAffine(image, M, (112, 112), borderValue=0.0)
        return args.passes * len(cases)

    runs = round_robin({'a': timed(source_face_align),
                        'b': timed(d2lf.face_align),
                        'c': warp_only}, repeats=args.repeats)
    names = {'a': '(a) source: skimage estimate + warpAffine',
             'b': '(b) d2lf.face_align',
             'c': '(c) limit: cv2.warpAffine alone'}
    for key, name in names.items():
        print(f'  {name:42s} {spread(per_unit_us(runs[key]))} us/face; '
              f'CPU {median(per_unit_us(runs[key], "cpu")):.1f} us/face')
    a, b, c = (median(per_unit_us(runs[k])) for k in 'abc')
    b_c = paired_ratio(per_unit_us(runs['b']), per_unit_us(runs['c']))
    a_b = paired_ratio(per_unit_us(runs['a']), per_unit_us(runs['b']))
    diffs = [onp.abs(d2lf.face_align(image, lm).astype(int) -
                     source_face_align(image, lm)).max()
             for image, lm in cases]
    same = sum(d == 0 for d in diffs)
    print(f'  per-round ratios (medians): (b)/(c) = {b_c:.2f}, (a)/(b) = '
          f'{a_b:.2f} ((b) that much faster); ratio of the medians (b)/(c) '
          f'= {b / c:.2f}')
    print(f'  crops of (b) vs (a): max abs difference {max(diffs)} grey '
          f'level(s); {same} of {len(cases)} crops identical')
    emit(figure='2. alignment (us/face)', value=b, unit='us',
         baselines={'(a) source': a, '(c) warp only': c},
         ratio=f'{b_c:.2f}x (c); (a) {a_b:.1f}x slower; '
               f'max diff {max(diffs)}',
         target='<= 1.3x (c), diff <= 1',
         met=b_c <= 1.3 and max(diffs) <= 1)


if __name__ == '__main__':
    main()
