"""Run every benchmark (one process each) and print a summary table.

    make bench                       # or:
    D2L_FACE_SOURCE=standin .venv/bin/python benchmarks/run_all.py

Each script prints its own details and one RESULT line, which we collect.
Extra arguments are passed on to every script (e.g. --repeats 3).
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ['bench_loader.py', 'bench_align.py', 'bench_verification.py',
           'bench_training.py', 'bench_train_program.py']


def run(script, extra_args):
    """Run one script, echoing its output; return its RESULT dict."""
    print(f'\n=== {script} ' + '=' * (60 - len(script)), flush=True)
    start = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script)]
                            + extra_args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith('RESULT '):
            result = json.loads(line[len('RESULT '):])
        else:
            print(line, end='', flush=True)
    proc.wait()
    print(f'--- {script}: {time.time() - start:.0f} s', flush=True)
    if proc.returncode != 0 or result is None:
        return {'figure': script, 'value': None, 'unit': '',
                'baselines': {}, 'ratio': f'FAILED (exit {proc.returncode})',
                'target': '', 'met': False}
    return result


def fmt(value):
    if value is None:
        return '-'
    return f'{value:,.0f}' if abs(value) >= 100 else f'{value:.2f}'


def main():
    os.environ.setdefault('D2L_FACE_SOURCE', 'standin')
    start = time.time()
    results = [run(script, sys.argv[1:]) for script in SCRIPTS]
    rows = [('figure', 'median', 'baseline(s)', 'ratio', 'target', 'met')]
    for r in results:
        baselines = '; '.join(f'{k} {fmt(v)}' for k, v in
                              r['baselines'].items()) or '-'
        met = {True: 'met', False: 'MISSED', None: '-'}[r['met']]
        rows.append((r['figure'], f'{fmt(r["value"])} {r["unit"]}',
                     baselines, r['ratio'], r['target'], met))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print('\n=== summary (medians over rounds; ratios: median of per-round '
          'ratios) ' + '=' * 4)
    for i, row in enumerate(rows):
        print(' | '.join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print('-+-'.join('-' * w for w in widths))
    print(f'total {time.time() - start:.0f} s; load '
          f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')


if __name__ == '__main__':
    main()
