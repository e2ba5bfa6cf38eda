"""The committed d2l_face/mxnet.py must be exactly what the notebooks make."""
import os
import shutil
import subprocess
import sys

import pytest

from synthetic import REPO


def build_lib_in_copy(tmp_path):
    """Run `d2lbook build lib` in a copy of the sources and return the copy."""
    copy = tmp_path / 'repo'
    copy.mkdir()
    for name in ['config.ini', 'index.md']:
        shutil.copy(os.path.join(REPO, name), copy / name)
    for folder in ['chapter_face_recognition', 'd2l_face']:
        shutil.copytree(os.path.join(REPO, folder), copy / folder,
                        ignore=shutil.ignore_patterns('__pycache__'))
    d2lbook = os.path.join(os.path.dirname(sys.executable), 'd2lbook')
    subprocess.run([d2lbook, 'build', 'lib'], cwd=copy, check=True,
                   capture_output=True)
    return copy


@pytest.mark.parametrize('module', ['mxnet.py', 'torch.py', '__init__.py'])
def test_committed_library_equals_notebooks(tmp_path, module):
    copy = build_lib_in_copy(tmp_path)
    with open(os.path.join(REPO, 'd2l_face', module)) as f:
        committed = f.read()
    generated = (copy / 'd2l_face' / module).read_text()
    assert committed == generated, (
        f'd2l_face/{module} is out of date with the notebooks: run `make lib`')


def test_saved_cells_reach_the_library():
    from d2l_face import mxnet as d2lf
    for name in ['read_facerec_meta', 'FaceDataset', 'load_data_facerec',
                 'face_align']:
        assert hasattr(d2lf, name), name


def saved_definitions(module):
    """The functions and classes d2lbook wrote below the WARNING line."""
    import ast
    with open(os.path.join(REPO, 'd2l_face', module)) as f:
        source = f.read()
    generated = source[source.index('#################   WARNING'):]
    return [node for node in ast.parse(generated).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))]


def lost_docstring(node):
    """Why `node`'s docstring is lost in the library, or None if it is kept.

    d2lbook adds a 'Defined in' line to a one-line docstring, but puts a
    docstring of its own before a multi-line one, which is then no more
    than a string that `help` never shows."""
    import ast
    doc = ast.get_docstring(node)
    if doc is None:
        return 'no docstring'
    if doc.startswith('Defined in'):
        return 'only "Defined in"'
    second = node.body[1] if len(node.body) > 1 else None
    if (isinstance(second, ast.Expr) and isinstance(second.value, ast.Constant)
            and isinstance(second.value.value, str)):
        return 'a second string after the docstring'
    return None


@pytest.mark.parametrize('module', ['mxnet.py', 'torch.py'])
def test_every_saved_definition_keeps_its_docstring(module):
    lost = {node.name: why for node in saved_definitions(module)
            if (why := lost_docstring(node))}
    assert not lost, (
        f'd2l_face/{module}: docstrings lost by `d2lbook build lib` '
        f'(write them on one line, as d2l does): {lost}')
