"""d2l_face.orphans: children end with their parent, and nothing they start
outlives them.

The reaper runs a command, returns its status, and ends every process the
command started, also one in a session of its own; a worker that calls
`die_with_parent` ends when its parent is killed, with or without Linux's
parent-death signal.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from d2l_face import orphans
from synthetic import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'),
                                reason='the subreaper and /proc are Linux')

# Starts a process in a session of its own (out of reach of its process
# group), writes its pid to argv[1], then exits with argv[2] or sleeps.
ESCAPE = textwrap.dedent('''\
    import os, subprocess, sys, time
    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],
                         start_new_session=True)
    open(sys.argv[1] + '.tmp', 'w').write(str(p.pid))
    os.rename(sys.argv[1] + '.tmp', sys.argv[1])
    if sys.argv[2] == 'sleep':
        time.sleep(600)
    sys.exit(int(sys.argv[2]))
''')


def wait_for(path, timeout=30):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < end, f'{path} never appeared'
        time.sleep(0.05)
    with open(path) as f:
        return int(f.read())


def gone(pid, timeout=10):
    """Whether process `pid` ends (or is a zombie) within `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def reaper(*command):
    return orphans.reaper_command(sys.executable, [sys.executable, *command])


@pytest.mark.parametrize('code', [0, 3])
def test_the_reaper_returns_the_commands_status(code):
    run = subprocess.run(reaper('-c', f'import sys; sys.exit({code})'),
                         timeout=60)
    assert run.returncode == code


def test_a_command_killed_by_a_signal_ends_the_reaper_by_it():
    run = subprocess.run(reaper('-c', 'import os, signal; '
                                'os.kill(os.getpid(), signal.SIGTERM)'),
                         timeout=60)
    assert run.returncode == -signal.SIGTERM


def test_what_the_command_started_ends_with_it(tmp_path):
    path = str(tmp_path / 'pid')
    run = subprocess.run(reaper('-c', ESCAPE, path, '0'), timeout=60)
    assert run.returncode == 0
    assert gone(wait_for(path), timeout=1)  # already when the reaper returned


def test_a_reaper_asked_to_stop_ends_everything_below_it(tmp_path):
    path = str(tmp_path / 'pid')
    proc = subprocess.Popen(reaper('-c', ESCAPE, path, 'sleep'))
    try:
        escapee = wait_for(path)
        command = orphans.descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
        assert all(gone(pid) for pid in command + [escapee])
    finally:
        proc.kill()


def test_descendants_lists_children_and_grandchildren():
    child = subprocess.Popen([sys.executable, '-c', (
        'import subprocess, sys, time; subprocess.Popen([sys.executable, '
        '"-c", "import time; time.sleep(600)"]); time.sleep(600)')])
    try:
        end = time.monotonic() + 30
        while not psutil.Process(child.pid).children():  # its child, later
            assert time.monotonic() < end
            time.sleep(0.05)
        grandchild = psutil.Process(child.pid).children()[0].pid
        assert orphans.descendants(child.pid) == [grandchild]
        # This process may have others, started by earlier tests.
        assert {child.pid, grandchild} <= set(orphans.descendants())
    finally:
        for pid in orphans.descendants(child.pid) + [child.pid]:
            os.kill(pid, signal.SIGKILL)
        child.wait()


# A parent that starts one spawned worker, which calls `die_with_parent`,
# writes its pid to argv[1] and sleeps; the parent waits to be killed.
PARENT = textwrap.dedent('''\
    import multiprocessing, os, sys, time
    from d2l_face import orphans

    def work(parent, use_pdeathsig, path):
        orphans.die_with_parent(parent, use_pdeathsig)
        open(path + '.tmp', 'w').write(str(os.getpid()))
        os.rename(path + '.tmp', path)
        time.sleep(600)

    if __name__ == '__main__':
        ctx = multiprocessing.get_context('spawn')
        ctx.Process(target=work, args=(os.getpid(), {use}, sys.argv[1])).start()
        time.sleep(600)
''')


@pytest.mark.parametrize('use_pdeathsig', [True, False],
                         ids=['pdeathsig', 'portable'])
def test_a_worker_ends_when_its_parent_is_killed(tmp_path, use_pdeathsig):
    script = tmp_path / 'parent.py'
    script.write_text(PARENT.format(use=use_pdeathsig))
    path = str(tmp_path / 'worker')
    parent = subprocess.Popen([sys.executable, str(script), path],
                              env=dict(os.environ, PYTHONPATH=REPO))
    worker = None
    try:
        worker = wait_for(path)  # past die_with_parent
        parent.kill()
        parent.wait(10)
        assert gone(worker, timeout=10)  # the portable watch polls each second
    finally:
        parent.kill()
        parent.wait()
        if worker is not None:  # it may have outlived its parent
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:  # gone, as it should be
                pass
