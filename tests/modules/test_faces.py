"""d2l_face.faces: synthetic faces drawn from a random generator.

The five landmarks of an unperturbed face sit on the ArcFace template, a
crop is an aligned 112x112 image, a wild scene holds its face's landmarks,
and the same generator state always draws the same pixels.
"""
import numpy as onp
import pytest

from d2l_face import faces, formats


def person(seed=0):
    return faces.draw_identity_params(onp.random.default_rng(seed))


def test_unperturbed_face_sits_on_the_template():
    person = faces.draw_identity_params(onp.random.default_rng(0),
                                          geometry_scale=0)
    look = faces.draw_look(onp.random.default_rng(0), wild=True)
    assert onp.allclose(faces.face_landmarks(person, look),
                       formats.ARCFACE_TEMPLATE)




def test_a_crop_is_an_aligned_image_and_a_jpeg_quality():
    img, quality = faces.render_image(person(), onp.random.default_rng(1))
    assert img.shape == (faces.SIZE, faces.SIZE, 3) and img.dtype == onp.uint8
    assert type(quality) is int and 40 <= quality < 96
    assert img.std() > 10  # a picture, not a flat color


@pytest.mark.parametrize('render', [faces.render_image, faces.render_wild])
def test_the_same_generator_state_draws_the_same_pixels(render):
    first = render(person(), onp.random.default_rng(7))[0]
    again = render(person(), onp.random.default_rng(7))[0]
    other = render(person(), onp.random.default_rng(8))[0]
    assert onp.array_equal(first, again)
    assert not onp.array_equal(first, other)


def test_a_wild_face_and_its_landmarks_lie_inside_the_scene():
    for seed in range(5):
        img, lm = faces.render_wild(person(seed), onp.random.default_rng(seed),
                                    size=(400, 300))
        assert img.shape == (300, 400, 3) and lm.shape == (5, 2)
        assert (lm >= 0).all() and (lm[:, 0] < 400).all() \
            and (lm[:, 1] < 300).all()
        # the eyes and the mouth apart: a face, not a dot
        eyes, mouth = lm[:2].mean(0), lm[3:].mean(0)
        assert onp.linalg.norm(eyes - mouth) > 10
