"""Helpers shared by the benchmark scripts: data, timing, result lines.

Every figure is measured side by side with its baselines in the same
process, round-robin (a, b, c, b, c, a, ...), so that a slow spell of a
shared machine hits all of them alike. We report medians over the rounds,
and ratios as the median over rounds of the ratio within each round.
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault('D2L_FACE_SOURCE', 'standin')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def dataset_dir():
    """The training set's folder (the stand-in unless told otherwise)."""
    from d2l_face import mxnet as d2lf
    return d2lf.get_facerec_dir('faces-casia-ultrasmall')


def round_robin(cases, repeats, warmup=1):
    """Run each case repeatedly, interleaved; return {name: [run, ...]}.

    A case is a function returning how many units (images, faces) it did;
    a run is a dict with the units, wall seconds and this process's CPU
    seconds (threads included, child processes not). Each round starts
    with a different case, so that no case always follows the same one."""
    for _ in range(warmup):
        for case in cases.values():
            case()
    runs = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            case = cases[name]
            cpu, wall = time.process_time(), time.perf_counter()
            units = case()
            runs[name].append({'units': units,
                               'wall': time.perf_counter() - wall,
                               'cpu': time.process_time() - cpu})
    return runs


def rates(runs):
    """Units per wall-clock second of each run."""
    return [r['units'] / r['wall'] for r in runs]


def per_unit_us(runs, key='wall'):
    """Microseconds (of wall or CPU time) per unit of each run."""
    return [r[key] / r['units'] * 1e6 for r in runs]


def paired_ratio(numerators, denominators):
    """Median over rounds of the ratio of two cases measured in that round.

    The two runs of a round are seconds apart, so a change of the machine's
    load between rounds cancels out; this is the ratio we compare with the
    targets."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def median(values):
    return statistics.median(values)


def spread(values):
    """'median (min-max)' for a list of numbers."""
    fmt = '{:,.0f}' if median(values) >= 100 else '{:.2f}'
    return (f'{fmt.format(median(values))} '
            f'({fmt.format(min(values))}-{fmt.format(max(values))})')


def load():
    """The machine's 1-minute load average, to judge how busy it was."""
    return f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores'


def emit(**result):
    """Print the line that run_all.py collects for its final table."""
    print('RESULT ' + json.dumps(result, default=lambda x: x.item()),
          flush=True)
