"""d2l_face.cluster: a local dist-kvstore job that never orphans a process.

These tests need no framework: the scheduler and the servers are stood in
for by small Python programs, so that the tests show the launcher's own
behaviour (environment, output, failures, timeouts, clean-up) quickly.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from synthetic import REPO, alive, end_all
from d2l_face import cluster

SLEEP = ['-c', 'import time; time.sleep(600)']
QUICK = ['-c', 'pass']  # a scheduler or server that is done at once


def wait_until_gone(procs, timeout):
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(procs)


@pytest.fixture
def descendants():
    """Check that a test's launcher left none of its processes running."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in before]
    still = alive(left)
    end_all(left)
    assert not still, f'processes left running: {still}'


def test_cluster_env_puts_every_address_on_loopback():
    env = cluster.cluster_env(9091, num_workers=3, num_servers=2)
    assert env == {'DMLC_PS_ROOT_URI': '127.0.0.1',
                   'DMLC_PS_ROOT_PORT': '9091', 'DMLC_NUM_SERVER': '2',
                   'DMLC_NUM_WORKER': '3', 'DMLC_NODE_HOST': '127.0.0.1'}


def test_free_port_can_be_bound_on_loopback():
    port = cluster.free_port()
    assert 1024 <= port < 65536
    with socket.socket() as s:
        s.bind(('127.0.0.1', port))


def test_workers_get_their_role_and_the_job_and_their_output_returns(
        descendants):
    code = ('import os; print(" ".join(os.environ[k] for k in ["DMLC_ROLE", '
            '"DMLC_NUM_WORKER", "DMLC_NUM_SERVER", "DMLC_PS_ROOT_URI", '
            '"DMLC_NODE_HOST", "EXTRA"]))')
    outputs = cluster.launch_local_cluster(
        ['-c', code], num_workers=3, num_servers=2, timeout=60,
        env={'EXTRA': 'yes'}, server_args=QUICK)
    assert [o.split() for o in outputs] == [
        ['worker', '3', '2', '127.0.0.1', '127.0.0.1', 'yes']] * 3


def test_a_failing_worker_raises_with_its_output_and_ends_the_rest(
        descendants):
    tic = time.monotonic()
    with pytest.raises(RuntimeError, match=r'worker failed with exit code 3'
                       r'(.|\n)*bad input'):
        cluster.launch_local_cluster(
            ['-c', 'import sys; print("bad input"); sys.exit(3)'],
            timeout=60, server_args=SLEEP)
    assert time.monotonic() - tic < 30  # failed at once, did not time out


def test_a_failing_scheduler_is_reported(descendants):
    with pytest.raises(RuntimeError, match='scheduler failed .* code 5'):
        cluster.launch_local_cluster(SLEEP, timeout=60, server_args=[
            '-c', 'import os, sys, time\n'
            'if os.environ["DMLC_ROLE"] == "scheduler": sys.exit(5)\n'
            'time.sleep(600)'])


def test_a_timeout_raises_and_ends_everything(descendants):
    tic = time.monotonic()
    with pytest.raises(TimeoutError, match='after 1 s'):
        cluster.launch_local_cluster(SLEEP, timeout=1, server_args=SLEEP)
    assert time.monotonic() - tic < 30


@pytest.mark.parametrize('num_workers,num_servers,timeout',
                         [(0, 1, 10), (1, 0, 10), (1, 1, 0)])
def test_bad_arguments_are_refused(num_workers, num_servers, timeout):
    with pytest.raises(ValueError):
        cluster.launch_local_cluster(QUICK, num_workers, num_servers,
                                     timeout=timeout)


# A worker that starts a process of its own, in a session of its own (out of
# reach of the worker's process group): the clean-up must reach it too.
WORKER_WITH_CHILD = ('import subprocess, sys, time; subprocess.Popen('
                     '[sys.executable, "-c", "import time; time.sleep(600)"],'
                     ' start_new_session=True); time.sleep(600)')
PARENT = ('import sys; from d2l_face import cluster; '
          'cluster.launch_local_cluster(["-c", sys.argv[1]], num_workers=2, '
          'timeout=600, server_args=["-c", "import time; time.sleep(600)"])')


def check_all_end_with_the_parent(parent_code, num_procs, sig):
    """Start parent_code, wait for its num_procs descendants, signal it, and
    check that every descendant is gone soon after."""
    env = dict(os.environ, PYTHONPATH=REPO)
    # A job started in the background (`make test &`) inherits SIGINT
    # ignored; the parent must get it as a user's Ctrl-C would.
    parent = subprocess.Popen(
        [sys.executable, '-c', parent_code, WORKER_WITH_CHILD], env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    procs = []
    try:
        deadline = time.monotonic() + 60
        while len(procs) < num_procs and time.monotonic() < deadline:
            time.sleep(0.1)
            procs = psutil.Process(parent.pid).children(recursive=True)
        assert len(procs) == num_procs, procs
        parent.send_signal(sig)
        parent.wait(timeout=30)
        left = wait_until_gone(procs, timeout=5)
        assert not left, f'{sig.name}: still running {left}'
    finally:
        parent.kill()
        parent.wait()
        end_all(procs)


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM,
                                 signal.SIGINT], ids=lambda sig: sig.name)
def test_the_job_ends_when_its_parent_is_killed(sig):
    # watchdog; scheduler, server and two workers, each under its reaper;
    # the workers' two children
    check_all_end_with_the_parent(PARENT, 11, sig)


# ------------------------------------------------------ torchrun-style jobs

def test_torchrun_env_numbers_ranks_over_machines():
    env = cluster.torchrun_env(29500, local_rank=2, nproc_per_node=4,
                               node_rank=1, nnodes=2, master_addr='10.0.0.1')
    assert env == {'MASTER_ADDR': '10.0.0.1', 'MASTER_PORT': '29500',
                   'RANK': '6', 'WORLD_SIZE': '8', 'LOCAL_RANK': '2',
                   'LOCAL_WORLD_SIZE': '4', 'GROUP_RANK': '1'}
    assert cluster.torchrun_env(9, 0, 1)['MASTER_ADDR'] == '127.0.0.1'


@pytest.mark.parametrize('local_rank,nproc,node_rank,nnodes',
                         [(2, 2, 0, 1), (-1, 2, 0, 1), (0, 2, 1, 1),
                          (0, 0, 0, 1)])
def test_torchrun_env_refuses_ranks_out_of_range(local_rank, nproc,
                                                 node_rank, nnodes):
    with pytest.raises(ValueError, match='local_rank'):
        cluster.torchrun_env(9, local_rank, nproc, node_rank, nnodes)


SHOW_RANK = ('import os; print(" ".join(os.environ.get(k, "-") for k in '
             '["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", '
             '"MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "EXTRA"]))')


def test_ranks_get_their_variables_and_their_output_returns_in_order(
        descendants, monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    outputs = cluster.launch_local_torchrun(['-c', SHOW_RANK], 3, timeout=60,
                                            env={'EXTRA': 'yes'})
    fields = [o.split() for o in outputs]
    assert [f[:5] for f in fields] == [
        [str(r), '3', str(r), '3', '127.0.0.1'] for r in range(3)]
    assert len({f[5] for f in fields}) == 1  # one port, rank 0's
    assert 1024 <= int(fields[0][5]) < 65536
    assert [f[6:] for f in fields] == [['1', 'yes']] * 3


def test_the_callers_thread_count_and_one_rank_keep_their_threads(
        descendants, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert cluster.launch_local_torchrun(['-c', SHOW_RANK], 2, timeout=60)[
        1].split()[6] == '3'
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert cluster.launch_local_torchrun(['-c', SHOW_RANK], 1, timeout=60)[
        0].split()[6] == '-'


def test_a_failing_rank_raises_with_its_output_and_ends_the_rest(
        descendants):
    code = ('import os, sys, time\n'
            'if os.environ["RANK"] == "1":\n'
            '    print("bad input"); sys.exit(3)\n'
            'time.sleep(600)')
    tic = time.monotonic()
    with pytest.raises(RuntimeError, match=r'rank 1 failed with exit code 3'
                       r'(.|\n)*bad input'):
        cluster.launch_local_torchrun(['-c', code], 2, timeout=60)
    assert time.monotonic() - tic < 30  # failed at once, did not time out


def test_a_torchrun_timeout_raises_and_ends_everything(descendants):
    with pytest.raises(TimeoutError, match='after 1 s'):
        cluster.launch_local_torchrun(SLEEP, 2, timeout=1)


@pytest.mark.parametrize('nproc,timeout', [(0, 10), (1, 0)])
def test_bad_torchrun_arguments_are_refused(nproc, timeout):
    with pytest.raises(ValueError):
        cluster.launch_local_torchrun(QUICK, nproc, timeout=timeout)


TORCHRUN_PARENT = ('import sys; from d2l_face import cluster; '
                   'cluster.launch_local_torchrun(["-c", sys.argv[1]], 2, '
                   'timeout=600)')


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM,
                                 signal.SIGINT], ids=lambda sig: sig.name)
def test_the_ranks_end_when_their_parent_is_killed(sig):
    # the watchdog, two ranks under their reapers, and their two children
    check_all_end_with_the_parent(TORCHRUN_PARENT, 7, sig)


# ----------------------------------------- what a process leaves behind

# A worker that starts a process in a session of its own (out of reach of
# its process group), writes that process's pid to a file, waits until the
# other worker has written its own (so that a failure of the first to finish
# cannot end the second before it wrote), and then exits with argv[2] or, for
# 'sleep', runs on until the job's timeout.
WORKER_WITH_ESCAPEE = (
    'import os, subprocess, sys, time\n'
    'p = subprocess.Popen([sys.executable, "-c", "import time; '
    'time.sleep(600)"], start_new_session=True)\n'
    'path = os.path.join(sys.argv[1], str(os.getpid()))\n'
    'open(path + ".tmp", "w").write(str(p.pid))\n'
    'os.rename(path + ".tmp", path)\n'
    'while len([f for f in os.listdir(sys.argv[1]) '
    'if not f.endswith(".tmp")]) < 2: time.sleep(0.05)\n'
    'if sys.argv[2] == "sleep": time.sleep(600)\n'
    'sys.exit(int(sys.argv[2]))')


def escapees(folder):
    """The pids the workers wrote, and those of them still running."""
    pids = [int(f.read_text()) for f in folder.iterdir()
            if not f.name.endswith('.tmp')]
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:  # gone, as it should be
            pass
    return pids, alive(procs)


def run_cluster(args, timeout):
    return cluster.launch_local_cluster(args, num_workers=2, timeout=timeout,
                                        server_args=QUICK)


def run_torchrun(args, timeout):
    return cluster.launch_local_torchrun(args, 2, timeout=timeout)


@pytest.mark.parametrize('launch', [run_cluster, run_torchrun],
                         ids=['cluster', 'torchrun'])
@pytest.mark.parametrize('ending,error', [
    ('0', None), ('1', RuntimeError), ('sleep', TimeoutError)],
    ids=['success', 'failure', 'timeout'])
def test_nothing_a_process_started_outlives_the_job(tmp_path, launch, ending,
                                                    error):
    args = ['-c', WORKER_WITH_ESCAPEE, str(tmp_path), ending]
    # Long enough for two workers to start on a busy machine; the timeout
    # case has to wait it out.
    timeout = 10 if ending == 'sleep' else 120
    if error is None:
        launch(args, timeout)
    else:
        with pytest.raises(error):
            launch(args, timeout)
    pids, running = escapees(tmp_path)
    try:
        assert len(pids) == 2
        assert not running, f'still running: {running}'
    finally:
        end_all(running)
