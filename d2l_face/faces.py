"""Drawing synthetic faces: the identity, the look of one image, the pixels.

An identity (:func:`draw_identity_params`) fixes a person's face shape,
skin, hair, eyes, eyebrows, nose, mouth and a few marks (moles, freckles,
glasses, beard); a look (:func:`draw_look`) varies what changes from image
to image: pose, expression, occlusion. :func:`render_image` draws one
aligned 112x112 crop of a person, with a random background, lighting, color
cast, blur and noise; :func:`render_wild` places a turned and scaled face in
a larger scene and returns its five landmarks (:func:`face_landmarks`).
Unperturbed, the five landmarks sit on the ArcFace 112x112 template, so the
crops are "aligned" like the real ones.

Everything is drawn with OpenCV from the random generator passed in, so the
same generator state gives the same pixels. :mod:`d2l_face.standin` seeds
the generators and writes the stand-in dataset from these faces.
"""
import functools

import cv2
import numpy as onp

from d2l_face import formats

SIZE = formats.TEMPLATE_SIZE
# The ArcFace template as the float64 values of its published decimals:
# `formats` keeps it in float32, whose shortest decimals are those, and the
# stand-in has always drawn from the float64 ones (a float32 value moves a
# few edges of a few dozen images by a pixel).
_TEMPLATE = onp.array([[float(onp.format_float_positional(v)) for v in point]
                      for point in formats.ARCFACE_TEMPLATE])

# Palettes in OpenCV's BGR order.
SKIN = [(196, 224, 255), (167, 194, 241), (138, 172, 224), (98, 134, 198),
        (72, 102, 161), (52, 78, 120), (40, 58, 92), (160, 200, 234)]
HAIR = [(20, 22, 25), (28, 40, 60), (40, 72, 110), (30, 60, 140),
        (110, 180, 215), (160, 215, 235), (150, 150, 150), (220, 225, 225),
        (35, 70, 170)]
IRIS = [(30, 60, 100), (20, 30, 45), (190, 120, 70), (80, 130, 80),
        (140, 130, 120), (50, 110, 140)]
FRAMES = [(20, 20, 20), (30, 50, 90), (40, 160, 200), (190, 190, 190),
          (40, 40, 170), (150, 70, 30)]
HAIR_STYLES = ('short', 'fringe', 'side', 'long', 'curly', 'bald')
BEARDS = (None, None, None, None, 'moustache', 'goatee', 'full')


def _pick(rng, palette, jitter):
    """A palette color with a little per-channel jitter."""
    color = onp.array(palette[rng.integers(len(palette))], float)
    return onp.clip(color + rng.uniform(-jitter, jitter, 3), 0, 255)


def draw_identity_params(rng, geometry_scale=1.0):
    """Draw the traits that stay the same in all images of one person.

    Positions are in the canonical 112x112 frame; `geometry_scale` scales how
    far the eyes, nose and mouth stray from the ArcFace template.
    """
    g = geometry_scale
    eye_spread, mouth_spread = rng.uniform(-2.5, 2.5, 2) * g
    eyes = _TEMPLATE[:2] + [[-eye_spread, 0], [eye_spread, 0]]
    eyes[:, 1] += rng.uniform(-2, 2) * g
    mouth = _TEMPLATE[3:] + [[-mouth_spread, 0], [mouth_spread, 0]]
    mouth[:, 1] += rng.uniform(-2, 2) * g
    skin = _pick(rng, SKIN, 12)
    hair = _pick(rng, HAIR, 15)
    return {
        'skin': skin, 'hair': hair, 'iris': _pick(rng, IRIS, 15),
        'lips': onp.clip(skin * [0.75, 0.7, 1.0] - [10, 20, 0], 0, 255),
        'style': HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        'hairline': rng.uniform(18, 30), 'volume': rng.uniform(2, 8),
        'part': rng.choice([-1.0, 1.0]),
        'center_y': 60 + rng.uniform(-1.5, 1.5) * g,
        'half_width': rng.uniform(37, 45), 'chin': rng.uniform(47, 54),
        'jaw': rng.uniform(1.6, 3.2),  # superellipse power: <2 pointed chin
        'eyes': eyes,
        'eye_size': (rng.uniform(5.5, 7.5), rng.uniform(2.4, 3.6)),
        'iris_r': rng.uniform(2.2, 3.0),
        'brow_gap': rng.uniform(7, 11), 'brow_thick': rng.uniform(1.2, 3.5),
        'brow_tilt': rng.uniform(-4, 4), 'brow_arch': rng.uniform(0, 3.5),
        'brow_len': rng.uniform(13, 18),
        'nose': _TEMPLATE[2] + [0, rng.uniform(-3, 3) * g],
        'nose_width': rng.uniform(3.5, 6.5),
        'mouth': mouth, 'lip_thick': (rng.uniform(1.2, 3), rng.uniform(2, 4)),
        'mole': (rng.uniform([25, 45], [87, 100])
                 if rng.random() < 0.45 else None),
        'freckles': (rng.uniform([30, 55], [82, 82], (14, 2))
                     if rng.random() < 0.15 else None),
        'glasses': (rng.integers(2), _pick(rng, FRAMES, 10))
                   if rng.random() < 0.25 else None,
        'beard': BEARDS[rng.integers(len(BEARDS))],
    }


def draw_look(rng, wild=False):
    """Draw what changes from image to image: pose, expression, lighting..."""
    return {
        'yaw': 0.0 if wild else rng.uniform(-0.35, 0.35),
        'smile': 0.0 if wild else rng.uniform(0, 1) * (rng.random() < 0.5),
        'open': 0.0 if wild else rng.uniform(1, 4) * (rng.random() < 0.2),
        'raise': rng.uniform(0, 2.5),
        'blink': not wild and rng.random() < 0.08,
        'gaze': rng.uniform([-1, -0.5], [1, 0.5]),
        'shirt': rng.uniform(0, 255, 3),
        'occluder': (None if wild or rng.random() > 0.25 else
                     ('bar', 'sunglasses', 'hand', 'scarf')[rng.integers(4)]),
        'occluder_color': rng.uniform(0, 255, 3),
        'side': rng.choice([-1.0, 1.0]),  # which side a hand comes from
    }


def face_landmarks(person, look):
    """The five landmarks of `person` drawn with `look`, canonical frame.

    Turning the head (yaw) slides features sideways by their depth: the nose
    tip furthest, the mouth and eyes less. A smile lifts the mouth corners.
    """
    pts = onp.vstack([person['eyes'], person['nose'], person['mouth']])
    pts[:, 0] += look['yaw'] * onp.array([6, 6, 14, 8, 8])
    pts[3:, 1] -= 2.5 * look['smile']
    return pts


class _Layer:
    """A drawing in the canonical 112x112 frame on a supersampled canvas.

    `mask` records where the person covers the background. Coordinates are
    floats; cv2's sub-pixel `shift` keeps them exact at any scale.
    """

    def __init__(self, ss):
        self.ss = ss
        self.img = onp.zeros((SIZE * ss, SIZE * ss, 3), onp.uint8)
        self.mask = onp.zeros((SIZE * ss, SIZE * ss), onp.uint8)

    def _pt(self, pts):
        # Pixel centers: canonical x maps to canvas (x + 0.5) * ss - 0.5, so
        # the later INTER_AREA downscale brings each point back to x.
        return onp.round(((onp.asarray(pts, float) + 0.5) * self.ss - 0.5)
                        * 16).astype(onp.int32)

    def _len(self, v):
        return int(round(v * self.ss * 16))

    def _thick(self, t):
        return -1 if t < 0 else max(1, int(round(t * self.ss)))

    def ellipse(self, c, axes, color, angle=0.0, arc=(0, 360), t=-1,
                solid=False):
        args = (tuple(self._pt(c)), (self._len(axes[0]), self._len(axes[1])),
                angle, arc[0], arc[1])
        cv2.ellipse(self.img, *args, tuple(map(float, color)),
                    self._thick(t), cv2.LINE_AA, 4)
        if solid:
            cv2.ellipse(self.mask, *args, 255, self._thick(t), cv2.LINE_AA, 4)

    def poly(self, pts, color, solid=False):
        pts = [self._pt(pts)]
        cv2.fillPoly(self.img, pts, tuple(map(float, color)), cv2.LINE_AA, 4)
        if solid:
            cv2.fillPoly(self.mask, pts, 255, cv2.LINE_AA, 4)

    def line(self, pts, color, t):
        cv2.polylines(self.img, [self._pt(pts)], False,
                      tuple(map(float, color)), self._thick(t),
                      cv2.LINE_AA, 4)


def _face_outline(p, n=40):
    """Face contour: a superellipse whose lower half has its own jaw power."""
    t = onp.linspace(0, 2 * onp.pi, n, endpoint=False)
    s, c = onp.sin(t), onp.cos(t)
    power = onp.where(c >= 0, 2.2, p['jaw'])
    height = onp.where(c >= 0, 56.0, p['chin'])
    x = 56 + p['half_width'] * onp.sign(s) * onp.abs(s) ** (2 / power)
    y = p['center_y'] - height * onp.sign(c) * onp.abs(c) ** (2 / power)
    return onp.stack([x, y], 1)


def _hair_top(p):
    """Polygon of the hair above the hairline, outside then back along it."""
    a, v, cy = p['half_width'], p['volume'], p['center_y']
    t = onp.linspace(onp.pi, 2 * onp.pi, 24)
    outer = onp.stack([56 + (a + v) * onp.cos(t), cy + (56 + v) * onp.sin(t)], 1)
    if p['style'] == 'curly':  # a bumpy outline reads as curls
        bumps = 2.5 * onp.sin(9 * t)
        outer += onp.stack([bumps * onp.cos(t), bumps * onp.sin(t)], 1)
    x = onp.linspace(56 + a - 2, 56 - a + 2, 16)
    u = (x - 56) / a
    line = {'short': p['hairline'] + 8 * u ** 2,
            'fringe': p['hairline'] + 9 + 1.5 * onp.cos(12 * u),
            'side': p['hairline'] + 6 * p['part'] * u + 6 * u ** 2,
            'long': p['hairline'] + 9 * onp.abs(u),
            'curly': p['hairline'] + 2 + 6 * u ** 2}[p['style']]
    if p['style'] == 'long':  # strands fall past the cheeks to the jaw
        sides = [[56 + a - 1, cy + 28], [56 + a - 5, cy]]
    else:
        sides = [[56 + a - 1, cy - 10]]
    inner = onp.vstack([sides, onp.stack([x, line], 1),
                       onp.array(sides[::-1]) * [-1, 1] + [112, 0]])
    return onp.vstack([outer, inner])


def _draw_head(L, p, look, lm):
    """Body, neck, ears, face and beard."""
    skin, hair = p['skin'], p['hair']
    L.ellipse((56, 138), (64, 34), look['shirt'], solid=True)
    L.poly([(39, 80), (73, 80), (76, 125), (36, 125)], skin * 0.8, solid=True)
    if p['style'] == 'long':
        L.ellipse((56, p['center_y'] + 8), (p['half_width'] + 9, 66), hair,
                  solid=True)
    for side in (-1, 1):  # the ear away from the viewer slips behind the head
        shift = 3 * look['yaw'] * side
        L.ellipse((56 + side * (p['half_width'] - 1 - shift), lm[0, 1] + 9),
                  (5 - abs(shift) / 2, 10), skin * 0.88, solid=True)
    outline = _face_outline(p)
    outline[:, 0] += 2 * look['yaw'] * (outline[:, 1] > p['center_y'])
    L.poly(outline, skin, solid=True)
    if p['beard'] == 'full':
        below = outline[outline[:, 1] > lm[3, 1] - 6]
        angle = onp.arctan2(below[:, 1] - 60, below[:, 0] - 56)
        below = below[onp.argsort(angle)]  # the jaw from right to left
        L.poly(below, hair)


def _draw_features(L, p, look, lm):
    """Nose, mouth, eyes and eyebrows at the landmarks `lm`."""
    skin, dark = p['skin'], p['skin'] * 0.6
    nose, w = lm[2], p['nose_width']
    L.line([(nose[0] - 2 + look['yaw'] * 4, lm[0, 1] + 5),
            (nose[0] - w * 0.6, nose[1] - 3)], skin * 0.82, 1.2)
    L.ellipse(nose + [0, -1], (w, 3), skin * 0.78, arc=(0, 180), t=1)
    for side in (-1, 1):
        L.ellipse(nose + [side * w * 0.5, 0.3], (1.5, 0.9), dark * 0.7)
    left, right = lm[3], lm[4]
    mid = (left + right) / 2 + [0, 2.5 * look['smile']]
    up, low = p['lip_thick']
    bow = [(mid[0] - 3, mid[1] - up - 0.5), (mid[0], mid[1] - up + 0.7),
           (mid[0] + 3, mid[1] - up - 0.5)]
    lower = [(mid[0] + 5, mid[1] + low + look['open']),
             (mid[0] - 5, mid[1] + low + look['open'])]
    L.poly([left, *bow, right, *lower], p['lips'])
    if look['open'] > 0:
        L.ellipse(mid + [0, look['open'] / 2], (9, look['open'] / 2 + 0.5),
                  (40, 30, 60))
    L.line([left, mid + [0, look['open'] * 0.3], right], p['lips'] * 0.6, 0.8)
    if p['beard'] in ('moustache', 'full'):
        top = mid[1] - up
        L.poly([left + [-2, 1], (left[0] + 4, top - 5), (mid[0], top - 3.5),
                (right[0] - 4, top - 5), right + [2, 1], (mid[0], top - 0.5)],
               p['hair'])
    if p['beard'] == 'goatee':
        L.ellipse(mid + [0, low + 8], (7, 6), p['hair'])
    ew, eh = p['eye_size']
    for i, side in ((0, -1), (1, 1)):
        c = lm[i]
        width = ew * (1 + 0.5 * look['yaw'] * side)  # the far eye narrows
        if look['blink']:
            L.ellipse(c, (width, 1.5), dark * 0.6, arc=(0, 180), t=1)
        else:
            L.ellipse(c, (width, eh), (235, 240, 240))
            iris = c + look['gaze']
            L.ellipse(iris, (p['iris_r'], min(p['iris_r'], eh)), p['iris'])
            pupil = p['iris_r'] * 0.45
            L.ellipse(iris, (pupil, pupil), (15, 15, 15))
            L.ellipse(iris + [-0.8, -0.8], (0.6, 0.6), (255, 255, 255))
            L.ellipse(c, (width, eh), dark * 0.5, arc=(180, 360), t=0.9)
        brow_y = c[1] - p['brow_gap'] - look['raise']
        xs = onp.linspace(-0.45, 0.55, 6) * p['brow_len']
        ys = (brow_y + p['brow_tilt'] * xs / p['brow_len']
              - p['brow_arch'] * (1 - (2 * xs / p['brow_len']) ** 2))
        L.line(onp.stack([c[0] + side * xs, ys], 1), p['hair'] * 0.7,
               p['brow_thick'])


def _draw_extras(L, p, look, lm):
    """Marks, hair on top, glasses and occluders that move with the face."""
    if p['mole'] is not None:
        L.ellipse(p['mole'], (1.2, 1.2), p['skin'] * 0.35)
    if p['freckles'] is not None:
        for f in p['freckles']:
            L.ellipse(f, (0.7, 0.7), p['skin'] * [0.6, 0.7, 0.85])
    if p['style'] != 'bald':
        L.poly(_hair_top(p), p['hair'], solid=True)
    else:
        for side in (-1, 1):
            L.ellipse((56 + side * (p['half_width'] + 0.5), lm[0, 1] - 8),
                      (3, 7), p['hair'], solid=True)
    if p['glasses'] is not None:
        shape, color = p['glasses']
        r = p['eye_size'][0] + 3.5
        for c in lm[:2]:
            if shape:
                L.ellipse(c, (r, r * 0.8), color, t=1.3)
            else:
                L.poly(c + [(-r, -r * 0.7), (r, -r * 0.7), (r, r * 0.7),
                            (-r, r * 0.7)], color)
                q = (r - 1.3, r * 0.7 - 1.3)  # the lens inside the frame
                L.poly(c + [(-q[0], -q[1]), (q[0], -q[1]), q, (-q[0], q[1])],
                       p['skin'])
        L.line([lm[0] + [r, 0], lm[1] - [r, 0]], color, 1.3)
    kind, color = look['occluder'], look['occluder_color']
    if kind == 'sunglasses':  # covers the eyes; the mouth stays visible
        for c in lm[:2]:
            L.ellipse(c + [0, 1], (10, 7), (25, 25, 25))
        L.line([lm[0] + [9, 0], lm[1] - [9, 0]], (25, 25, 25), 1.5)
    elif kind == 'scarf':  # covers mouth and chin; the eyes stay visible
        top = lm[2, 1] + 6
        L.poly([(10, top), (102, top), (102, 125), (10, 125)], color,
               solid=True)
    elif kind == 'hand':  # one side of the lower face
        side = look['side']
        hand = p['skin'] * 0.95
        L.ellipse((56 + side * 22, 100), (16, 20), hand, angle=side * 20)
        for k in range(4):
            L.ellipse((56 + side * (10 + 6 * k), 80 + 2 * k), (3, 13), hand,
                      angle=side * 10)


def draw_face(person, look, ss=2):
    """Draw a face in the canonical frame: (BGR, mask), each ss x 112 px."""
    L = _Layer(ss)
    lm = face_landmarks(person, look)
    _draw_head(L, person, look, lm)
    _draw_features(L, person, look, lm)
    _draw_extras(L, person, look, lm)
    return L.img, L.mask


def _similarity(scale, angle_deg, center, target):
    """2x3 matrix: turn and scale about `center`, then move it to `target`."""
    M = cv2.getRotationMatrix2D(tuple(map(float, center)), angle_deg, scale)
    M[:, 2] += onp.asarray(target, float) - center
    return M


@functools.lru_cache(maxsize=4)
def _grid(h, w):
    """Pixel coordinates relative to the image center, in half-widths."""
    yy, xx = onp.mgrid[0:h, 0:w].astype(onp.float32)
    r = max(h, w) / 2
    return (xx - w / 2) / r, (yy - h / 2) / r


def _ramp(h, w, angle):
    """A linear ramp across the image, -1..1 along the direction `angle`."""
    xx, yy = _grid(h, w)
    return onp.float32(onp.cos(angle)) * xx + onp.float32(onp.sin(angle)) * yy


def _background(rng, h, w, clutter):
    """A two-color gradient with random shapes: clutter to ignore."""
    a, b = rng.uniform(0, 255, (2, 3)).astype(onp.float32)
    t = 0.5 + 0.35 * _ramp(h, w, rng.uniform(0, 2 * onp.pi))
    img = (a + (b - a) * t[..., None]).astype(onp.uint8)
    for _ in range(rng.integers(clutter // 2, clutter + 1)):
        color = tuple(map(float, rng.uniform(0, 255, 3)))
        x0, y0 = rng.uniform(0, [w, h]).astype(int)
        x1, y1 = (onp.array([x0, y0])
                  + rng.uniform(-0.4, 0.4, 2) * [w, h]).astype(int)
        kind = rng.integers(3)
        if kind == 0:
            cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
        elif kind == 1:
            cv2.circle(img, (x0, y0), int(abs(x1 - x0) / 2) + 2, color, -1)
        else:
            cv2.line(img, (x0, y0), (x1, y1), color, int(rng.integers(1, 5)))
    return img


def _place(img, mask, bg, M, shape):
    """Warp a canonical face and its mask by M and lay it over `bg`."""
    size = (shape[1], shape[0])
    face = cv2.warpAffine(img, M, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE).astype(onp.float32)
    alpha = cv2.warpAffine(mask, M, size, flags=cv2.INTER_LINEAR)
    alpha = alpha.astype(onp.float32)[..., None] / 255
    return bg + (face - bg) * alpha


def _light_and_noise(rng, img, strength):
    """Contrast, brightness, color cast, a directional light, blur, noise.

    `img` is float32 and is changed in place; returns uint8.
    """
    h, w = img.shape[:2]
    mean = img.mean()
    img -= mean
    img *= rng.uniform(1 - 0.3 * strength, 1 + 0.2 * strength)  # contrast
    img += mean
    gain = rng.uniform(1 - 0.45 * strength, 1 + 0.3 * strength)
    cast = rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength, 3)
    img *= (gain * cast).astype(onp.float32)
    light = 1 + onp.float32(rng.uniform(0, 0.6 * strength)) * _ramp(
        h, w, rng.uniform(0, 2 * onp.pi))
    img *= light[..., None]
    img += (rng.uniform(-20, 20, 3) * strength).astype(onp.float32)
    if rng.random() < 0.3 * strength:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.1))
    noise = rng.standard_normal(img.shape, dtype=onp.float32)
    noise *= onp.float32(rng.uniform(1, 6))
    img += noise
    img += 0.5
    return onp.clip(img, 0, 255, out=img).astype(onp.uint8)


def render_image(person, rng):
    """One aligned 112x112 BGR crop of `person`; everything else from `rng`."""
    look = draw_look(rng)
    img, mask = draw_face(person, look)
    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    # Residual pose of an imperfect alignment: small turn, zoom and shift.
    center = _TEMPLATE.mean(0)
    M = _similarity(rng.uniform(0.9, 1.1), onp.clip(rng.normal(0, 6), -15, 15),
                    center, center + onp.clip(rng.normal(0, 3, 2), -8, 8))
    out = _place(img, mask, _background(rng, SIZE, SIZE, 8).astype(onp.float32),
                 M, (SIZE, SIZE))
    if look['occluder'] == 'bar':  # never tall enough to hide eyes and mouth
        x, y = rng.uniform(0, SIZE, 2)
        bw, bh = rng.uniform([20, 8], [50, 20])
        x0, x1 = int(max(x - bw / 2, 0)), int(x + bw / 2)
        out[int(y):int(y + bh), x0:x1] = look['occluder_color']
    return _light_and_noise(rng, out, 0.6), int(rng.integers(40, 96))


def render_wild(person, rng, size=(400, 300)):
    """A scene with one face turned and scaled; return (BGR, landmarks)."""
    w, h = size
    look = draw_look(rng, wild=True)
    side = rng.uniform(80, 180)  # on-scene size of the 112 px crop
    angle = rng.uniform(-30, 30)
    img, mask = draw_face(person, look)  # 2x canvas: 224 px > any `side`
    n = int(onp.ceil(side))
    img = cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (n, n), interpolation=cv2.INTER_AREA)
    # Fade the shoulders out so the canvas border does not show in the scene.
    fade = onp.clip((1 - onp.arange(n) / n) / 0.12, 0, 1)
    mask = (mask * fade[:, None]).astype(onp.uint8)
    center = _TEMPLATE.mean(0)
    target = rng.uniform(0.6 * side, [w - 0.6 * side, h - 0.6 * side])
    M = _similarity(side / SIZE, angle, center, target)  # canonical -> scene
    k = n / SIZE  # resized pixel centers: r = (x + 0.5) * k - 0.5
    to_canon = onp.array([[1 / k, 0, 0.5 / k - 0.5], [0, 1 / k, 0.5 / k - 0.5],
                         [0, 0, 1]])
    out = _place(img, mask, _background(rng, h, w, 30).astype(onp.float32),
                 M @ to_canon, (h, w))
    lm = face_landmarks(person, look) @ M[:, :2].T + M[:, 2]
    return _light_and_noise(rng, out, 0.4), lm
