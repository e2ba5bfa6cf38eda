"""d2l-face: the saved code of the Face Recognition chapter of Dive into Deep Learning.

``from d2l_face import mxnet as d2lf`` gives the helpers the chapter's notebooks
save with ``#@save``; the modules beside it are written by hand.
"""
import os

__version__ = "0.1.0"


def data_root():
    """Return the folder where datasets are downloaded or generated.

    ``D2L_FACE_DATA`` wins; in a checkout of the book it is the ``data`` folder
    next to ``config.ini`` (so Jupyter, d2lbook and nbval all find the same
    files whatever their working directory); elsewhere ``~/.d2l_face/data``.
    """
    if os.environ.get('D2L_FACE_DATA'):
        return os.path.abspath(os.environ['D2L_FACE_DATA'])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(repo, 'config.ini')):
        return os.path.join(repo, 'data')
    return os.path.join(os.path.expanduser('~'), '.d2l_face', 'data')
