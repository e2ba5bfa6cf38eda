"""Turn the chapter's Markdown sections into plain, unexecuted notebooks.

d2lbook's own reader understands the ``{.python .input}`` cells; this script
applies the same steps ``d2lbook build eval`` does (read, keep one framework
tab, format the code) but skips execution, so readers get notebooks to run
themselves and nbval gets notebooks to execute in CI: one notebook per
section and per tab, in OUT_DIR/<tab>/. Each notebook is then paired with a
percent-format script through jupytext.

Usage: python tools/md2ipynb.py OUT_DIR
"""
import glob
import os
import sys

import jupytext
import nbformat
from d2lbook import config as d2lbook_config
from d2lbook import library, notebook


def convert(md_path, out_dir, tab, default_tab):
    """Write OUT_DIR/<name>.ipynb and its paired OUT_DIR/<name>.py.

    Returns None, writing nothing, when the section has no cell for `tab`."""
    with open(md_path, encoding='UTF-8') as f:
        nb = notebook.read_markdown(f.read())
    nb = notebook.split_markdown_cell(nb)
    nb = notebook.get_tab_notebook(nb, tab, default_tab)
    if nb is None:
        return None
    nb = library.format_code_nb(nb)
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3',
                                 'language': 'python'}
    nb.metadata['language_info'] = {'name': 'python'}
    # Pair the notebook with a script so `jupytext --sync` keeps both in step.
    nb.metadata['jupytext'] = {'formats': 'ipynb,py:percent'}
    name = os.path.splitext(os.path.basename(md_path))[0]
    nbformat.write(nb, os.path.join(out_dir, name + '.ipynb'))
    jupytext.write(nb, os.path.join(out_dir, name + '.py'), fmt='py:percent')
    return name


def main(out_dir):
    cfg = d2lbook_config.Config()
    for tab in cfg.tabs or [None]:
        tab_dir = os.path.join(out_dir, tab or '')
        os.makedirs(tab_dir, exist_ok=True)
        for md_path in sorted(glob.glob('chapter_face_recognition/*.md')):
            name = convert(md_path, tab_dir, tab, cfg.default_tab)
            if name is None:
                print(f'{md_path}: no {tab} cells, no {tab} notebook')
            else:
                print(f'{md_path} -> {tab_dir}/{name}.ipynb (+ .py)')


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
