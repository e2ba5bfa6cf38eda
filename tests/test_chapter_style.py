"""The chapter reads like the book: short cells, one definition per fact."""
import glob
import os
import re
import statistics

import pytest

from synthetic import REPO

MAX_CELL_LINES = 40  # d2l-en's longest cells are about this long
# d2l-en's sections run to about 480 Markdown lines and its typical cell to 6
# lines; ours may be longer, as each holds two tabs, but not twice as long.
MAX_SECTION_LINES = 1000
MAX_MEDIAN_CELL_LINES = 8
SECTIONS = sorted(glob.glob(os.path.join(REPO, 'chapter_face_recognition',
                                         '*.md')))
GENERATED = {os.path.join('d2l_face', 'mxnet.py'),
             os.path.join('d2l_face', 'torch.py')}
SKIP_DIRS = {'.git', '.venv', '_build', 'data', '.hypothesis', '__pycache__',
             '.pytest_cache'}


def code_cells(text):
    """Yield (first line number, number of lines) of each code cell."""
    start = None
    for number, line in enumerate(text.splitlines(), 1):
        if start is None and re.match(r'^```\{\.python', line):
            start = number
        elif start is not None and line.startswith('```'):
            yield start, number - start - 1
            start = None


def hand_written_files():
    """Every source and page of the project that a person writes."""
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), REPO)
            if name.endswith(('.py', '.md')) and path not in GENERATED:
                yield path


def places_of(literal):
    """The hand-written files holding `literal` (this test file aside)."""
    found = []
    this_file = os.path.relpath(os.path.abspath(__file__), REPO)
    for path in hand_written_files():
        if path == this_file:
            continue
        with open(os.path.join(REPO, path), encoding='utf-8') as f:
            if literal in f.read():
                found.append(path)
    return sorted(found)


def test_code_cells_counts_lines_between_fences():
    text = 'a\n```{.python .input}\nx = 1\ny = 2\n```\nb\n```bash\nls\n```\n'
    assert list(code_cells(text)) == [(2, 2)]


@pytest.mark.parametrize('section', SECTIONS, ids=os.path.basename)
def test_no_code_cell_a_reader_must_scroll_past(section):
    with open(section, encoding='utf-8') as f:
        long_cells = [(start, n) for start, n in code_cells(f.read())
                      if n > MAX_CELL_LINES]
    assert not long_cells, (
        f'{os.path.basename(section)}: code cells longer than '
        f'{MAX_CELL_LINES} lines at (line, length) {long_cells}; split them '
        f'or move machinery into a module of d2l_face')


@pytest.mark.parametrize('section', SECTIONS, ids=os.path.basename)
def test_a_section_stays_at_the_books_scale(section):
    with open(section, encoding='utf-8') as f:
        num_lines = len(f.read().splitlines())
    assert num_lines <= MAX_SECTION_LINES, (
        f'{os.path.basename(section)} has {num_lines} lines; split it where '
        f'it teaches two things')


def test_a_typical_code_cell_is_short():
    lengths = []
    for section in SECTIONS:
        with open(section, encoding='utf-8') as f:
            lengths += [n for _, n in code_cells(f.read())]
    assert statistics.median(lengths) <= MAX_MEDIAN_CELL_LINES, (
        f'the median code cell of the chapter has '
        f'{statistics.median(lengths)} lines')


@pytest.mark.parametrize('literal', [
    '38.2946',  # the ArcFace landmark template's first coordinate
    "'%08d'",   # the identity folder naming
])
def test_a_format_fact_is_defined_in_one_place(literal):
    assert places_of(literal) == [os.path.join('d2l_face', 'formats.py')]
