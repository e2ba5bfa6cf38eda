"""Code saved from the Face Recognition chapter (PyTorch).

Everything below the WARNING line is written by ``make lib`` (``d2lbook build
lib``) from the cells marked ``#@save`` in ``chapter_face_recognition/*.md``
that belong to the PyTorch tab or to all tabs; only this header, which holds
the imports that code needs, is edited by hand. ``onp`` is NumPy, spelled as
in the MXNet tab, whose ``np`` is MXNet's own, so that the framework-free
cells read the same in both tabs.
"""
import os

import cv2
import numpy as onp
import torch
from d2l import torch as d2l
from torch import nn

import d2l_face
from d2l_face import datahub, formats, recordio, standin

#################   WARNING   ################
# The below part is generated automatically through:
#    d2lbook build lib
# Don't edit it directly

