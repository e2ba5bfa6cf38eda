"""Every citation in the chapter resolves, and every reference is cited."""
import glob
import os
import re

from pybtex.database import parse_file

from synthetic import REPO

CITE = re.compile(r':cite[tp]?:`([^`]+)`')


def cited_keys():
    keys = {}
    pages = glob.glob(os.path.join(REPO, 'chapter_face_recognition', '*.md'))
    for page in pages:
        with open(page) as f:
            for match in CITE.finditer(f.read()):
                for key in match.group(1).split(','):
                    keys.setdefault(key.strip(), set()).add(
                        os.path.basename(page))
    return keys


def test_citations_resolve_and_references_are_cited():
    entries = parse_file(os.path.join(REPO, 'references.bib')).entries
    cited = cited_keys()
    missing = {key: pages for key, pages in cited.items()
               if key not in entries}
    assert not missing, f'cited but not in references.bib: {missing}'
    unused = set(entries) - set(cited)
    assert not unused, f'in references.bib but never cited: {unused}'


def test_references_have_what_the_bibliography_prints():
    for key, entry in parse_file(
            os.path.join(REPO, 'references.bib')).entries.items():
        assert entry.persons.get('author'), key
        assert {'title', 'year'} <= set(entry.fields), key
        venue = {'booktitle', 'journal', 'institution'} & set(entry.fields)
        assert venue, f'{key}: no venue'
