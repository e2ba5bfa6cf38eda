"""d2l_face.packs: when a pack is the chapter's own, and when it is fresh.

Written here with made-up bytes: the packs module never parses the files,
it only weighs them against their marker (the packer itself is the
dataset section's, tested with real packs in test_loader_speedups.py).
"""
import os

import pytest

from d2l_face import formats, packs, publish


@pytest.fixture
def folder(tmp_path):
    """A folder dataset of two images, as `fingerprint` reads it."""
    (tmp_path / formats.PROPERTY_FILE).write_text('2,112,112\n')
    for label in range(2):
        (tmp_path / f'0000000{label}').mkdir()
        (tmp_path / f'0000000{label}' / '00000000.jpg').write_bytes(b'jpeg')
    return tmp_path


def items(folder):
    return [(str(folder / f'0000000{label}' / '00000000.jpg'), label)
            for label in range(2)]


def pack(folder, rec=b'records', idx=b'0\t0\n'):
    """Write and publish a pack of `folder`; return its prefix and sources."""
    prefix = str(folder / 'train')
    sources = packs.fingerprint(str(folder), items(folder))
    with packs.staging(prefix) as tmp:
        with open(tmp + '.rec', 'wb') as f:
            f.write(rec)
        with open(tmp + '.idx', 'wb') as f:
            f.write(idx)
        packs.publish(tmp, prefix, 2, sources)
    return prefix, sources


def test_a_published_pack_is_fresh_and_ours(folder):
    prefix, sources = pack(folder)
    assert packs.is_fresh(prefix, 2, sources)
    assert not packs.is_fresh(prefix, 3, sources)  # another record count
    assert packs.foreign_reason(prefix) is None
    assert sorted(n for n in os.listdir(folder) if n.startswith('train')) == [
        'train.d2l-pack.json', 'train.idx', 'train.rec']  # no temporary


def test_changing_an_image_changes_the_fingerprint(folder):
    before = packs.fingerprint(str(folder), items(folder))
    (folder / '00000001' / '00000000.jpg').write_bytes(b'other')
    assert packs.fingerprint(str(folder), items(folder)) != before


def test_a_pack_without_our_marker_is_never_replaced(folder):
    (folder / 'train.rec').write_bytes(b'theirs')
    (folder / 'train.idx').write_bytes(b'theirs')
    prefix = str(folder / 'train')
    assert packs.foreign_reason(prefix) == 'not made by d2l_face (no marker)'
    with pytest.raises(publish.ForeignError, match='no marker'):
        pack(folder)
    assert (folder / 'train.rec').read_bytes() == b'theirs'


def test_a_pack_changed_since_we_wrote_it_is_not_ours(folder):
    prefix, _ = pack(folder)
    with open(prefix + '.rec', 'ab') as f:
        f.write(b'more')
    assert 'as they are now' in packs.foreign_reason(prefix)


def test_our_pack_is_replaced_by_a_new_one(folder):
    prefix, _ = pack(folder)
    _, sources = pack(folder, rec=b'new records')
    assert (folder / 'train.rec').read_bytes() == b'new records'
    assert packs.is_fresh(prefix, 2, sources)


def test_staging_removes_what_a_failed_packer_wrote(folder):
    with pytest.raises(OSError):
        with packs.staging(str(folder / 'train')) as tmp:
            open(tmp + '.rec', 'wb').close()
            raise OSError(28, 'No space left on device')
    assert sorted(os.listdir(folder)) == ['00000000', '00000001', 'property']
