"""The `d2lf` fixture: a section's test runs once per tab.

A test that takes `d2lf` runs against `d2l_face.mxnet` and `d2l_face.torch`,
the two libraries that `make lib` saves from the chapter; a test of one tab
only imports that library itself.
"""
import importlib

import pytest


@pytest.fixture(params=['mxnet', 'torch'], ids=['mxnet', 'pytorch'])
def d2lf(request):
    return importlib.import_module(f'd2l_face.{request.param}')
