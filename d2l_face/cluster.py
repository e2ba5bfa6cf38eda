"""Run a distributed training job's processes locally, orphaning none.

Two kinds of job are started on 127.0.0.1 as children of the calling
process. MXNet's ``dist_sync`` store is a parameter server from the DMLC
ps-lite library: every process learns its role and the scheduler's address
from ``DMLC_*`` environment variables (`launch_local_cluster`). PyTorch's
``torch.distributed`` has no servers: ``torchrun`` starts one process per
rank and tells each its rank and where rank 0 listens through the
environment variables ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``
(`launch_local_torchrun` sets them the same way). Either launcher collects
the workers' output and makes sure that none of the processes outlives the
job: not when a process fails, not at a timeout, not when the caller is
interrupted, and not when the caller itself is terminated or killed.

It imports no deep learning framework: the scheduler and the servers run
``python -c "import mxnet"`` (importing MXNet with ``DMLC_ROLE`` set starts
the role), and the workers run whatever arguments the caller gives.

Nothing orphaned (POSIX only): each child starts a session of its own, under
a reaper (`d2l_face.orphans`): a subreaper that, when the child ends in any
way or the reaper gets SIGTERM, kills every process the child started, in
sessions of their own too, which are re-parented to it. A small watchdog
process holds the read end of a pipe whose only write end the caller keeps.
The caller tells the watchdog the pid (and process group) of each reaper it
starts; when the caller ends the job normally it says ``done``. If the
caller dies in any way, SIGKILL included, the kernel closes the write end,
the watchdog reads the end of the file without ``done``, asks the reapers to
stop, and kills their groups if they have not within `STOP_GRACE`
seconds. (A ``preexec_fn`` that sets Linux's ``PR_SET_PDEATHSIG`` was not
used: it is not safe in a process with threads, such as a Jupyter kernel, it
fires when the *thread* that started the child ends, and it does not reach
grandchildren. A process that the caller forks without exec, with
``multiprocessing``'s fork method say, inherits the write end too, and
delays the watchdog until it ends.)
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from d2l_face import orphans

LOOPBACK = '127.0.0.1'
SERVER_ARGS = ('-c', 'import mxnet')  # the scheduler and the servers
# Seconds a reaper has to end its processes after it is asked to stop.
STOP_GRACE = 2 * orphans.KILL_DEADLINE

# Runs in its own process: argv[1] is the read end of the caller's pipe,
# argv[2] the seconds the reapers get to stop before their groups are killed.
WATCHDOG = r'''
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
fd, data = int(sys.argv[1]), b''
while True:
    chunk = os.read(fd, 4096)
    if not chunk:
        break
    data += chunk
lines = data.split()
if b'done' not in lines:
    groups = [int(g) for g in lines if g.isdigit()]
    for group in groups:  # each reaper ends what its process started
        try:
            os.kill(group, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + float(sys.argv[2])
    for group in groups:
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except OSError:
                break
            time.sleep(0.05)
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
'''


def free_port(host=LOOPBACK):
    """Return a TCP port on `host` that nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))  # port 0: the operating system picks a free one
        return s.getsockname()[1]


def cluster_env(port, num_workers, num_servers, host=LOOPBACK):
    """The DMLC_* variables of a job whose processes all listen on `host`."""
    # DMLC_NODE_HOST matters as much as the root address: without it a
    # server or worker listens on the machine's network interface.
    return {'DMLC_PS_ROOT_URI': host, 'DMLC_PS_ROOT_PORT': str(port),
            'DMLC_NUM_SERVER': str(num_servers),
            'DMLC_NUM_WORKER': str(num_workers), 'DMLC_NODE_HOST': host}


def torchrun_env(port, local_rank, nproc_per_node, node_rank=0, nnodes=1,
                 master_addr=LOOPBACK):
    """The variables torchrun gives the process `local_rank` of a node.

    The arguments are torchrun's: ``--nproc_per_node``, ``--node_rank``,
    ``--nnodes``, ``--master_addr`` and ``--master_port``; rank 0 listens
    on `master_addr`:`port` for the others to join it."""
    if not 0 <= local_rank < nproc_per_node or not 0 <= node_rank < nnodes:
        raise ValueError(f'need 0 <= local_rank < nproc_per_node and '
                         f'0 <= node_rank < nnodes, not local_rank '
                         f'{local_rank}, nproc_per_node {nproc_per_node}, '
                         f'node_rank {node_rank}, nnodes {nnodes}')
    return {'MASTER_ADDR': master_addr, 'MASTER_PORT': str(port),
            'RANK': str(node_rank * nproc_per_node + local_rank),
            'WORLD_SIZE': str(nnodes * nproc_per_node),
            'LOCAL_RANK': str(local_rank),
            'LOCAL_WORLD_SIZE': str(nproc_per_node),
            'GROUP_RANK': str(node_rank)}


class _Job:
    """The processes of one job, their output files, and the watchdog."""

    def __init__(self, env, python):
        self.env, self.python = env, python
        self.procs, self.roles, self.logs, self.awaited = [], [], [], []
        read_end, self.watch = os.pipe()  # neither end is inherited
        try:
            self.watchdog = subprocess.Popen(
                [python, '-c', WATCHDOG, str(read_end), str(STOP_GRACE)],
                pass_fds=[read_end], start_new_session=True,
                stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(self.watch)
            raise
        finally:
            os.close(read_end)

    def start(self, role, args, env, awaited):
        """Start `python *args` (under a reaper) with `env` added;
        `awaited`: a worker."""
        # A file, not a pipe: a full pipe that nobody reads blocks the child.
        self.logs.append(tempfile.TemporaryFile())
        self.roles.append(role)
        if awaited:
            self.awaited.append(len(self.procs))
        proc = subprocess.Popen(
            orphans.reaper_command(self.python, [self.python, *args]),
            env=dict(self.env, **env), stdin=subprocess.DEVNULL,
            stdout=self.logs[-1], stderr=subprocess.STDOUT,
            start_new_session=True)
        self.procs.append(proc)
        os.write(self.watch, b'%d\n' % proc.pid)  # its process group id

    def output(self, i):
        self.logs[i].seek(0)
        return self.logs[i].read().decode(errors='replace')

    def wait_for_workers(self, timeout):
        """Wait until every worker succeeded; raise when any process fails."""
        workers = self.awaited
        deadline = time.monotonic() + timeout
        while not all(self.procs[i].poll() == 0 for i in workers):
            # Any failure dooms the job: the others would wait for it forever.
            for i, proc in enumerate(self.procs):
                if proc.poll() not in (None, 0):
                    raise RuntimeError(
                        f'{self.roles[i]} failed with exit code '
                        f'{proc.returncode}:\n{self.output(i)[-3000:]}')
            if time.monotonic() > deadline:
                raise TimeoutError(f'workers still running after {timeout} s')
            time.sleep(0.1)
        return [self.output(i) for i in workers]

    def end(self, grace):
        """Give the processes `grace` seconds to stop, then end them all."""
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:  # each reaper ends what its child started
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:  # a reaper stuck: its group, at least, ends
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    proc.kill()
                proc.wait()
        try:  # nothing is left for the watchdog to do
            os.write(self.watch, b'done\n')
        except OSError:  # it is gone already
            pass
        os.close(self.watch)
        self.watchdog.wait()
        for log in self.logs:
            log.close()


def launch_local_cluster(worker_args, num_workers=2, num_servers=1,
                         timeout=300, env=None, python=None,
                         server_args=SERVER_ARGS):
    """Run a dist kvstore job on 127.0.0.1; return each worker's output.

    Every worker runs ``python *worker_args`` (``['-c', code]``, say) with
    the DMLC_* variables of the job; `env` adds or overrides variables. A
    process that fails raises `RuntimeError` with its output, and a job
    that runs past `timeout` seconds raises `TimeoutError`; either way, and
    on any interruption, every process of the job is ended.
    """
    if num_workers < 1 or num_servers < 1:
        raise ValueError(f'need at least one worker and one server, not '
                         f'{num_workers} workers and {num_servers} servers')
    if not timeout > 0:
        raise ValueError(f'timeout must be positive, not {timeout!r}')
    python = python or sys.executable
    job_env = {**os.environ, **cluster_env(free_port(), num_workers,
                                           num_servers), **(env or {})}
    job, finished = _Job(job_env, python), False
    try:
        job.start('scheduler', server_args, {'DMLC_ROLE': 'scheduler'}, False)
        for _ in range(num_servers):
            job.start('server', server_args, {'DMLC_ROLE': 'server'}, False)
        for _ in range(num_workers):
            job.start('worker', worker_args, {'DMLC_ROLE': 'worker'}, True)
        outputs = job.wait_for_workers(timeout)
        finished = True
        return outputs
    finally:
        # After a success the scheduler and the servers stop on their own.
        job.end(grace=10 if finished else 0)


def launch_local_torchrun(worker_args, nproc_per_node=2, timeout=300,
                          env=None, python=None):
    """Run `nproc_per_node` ranks on 127.0.0.1 as torchrun would start them.

    Every rank runs ``python *worker_args`` with the variables of
    `torchrun_env` for its rank, a free port for rank 0, and, as torchrun
    sets it when there are several ranks and the caller did not, one
    OpenMP thread per rank, so that the ranks do not fight over the cores;
    `env` adds or overrides variables. Returns the output of every rank, in
    rank order. A rank that fails raises `RuntimeError` with its output and
    a job that runs past `timeout` seconds raises `TimeoutError`; either
    way, and on any interruption, every process of the job is ended, as in
    `launch_local_cluster`.
    """
    if nproc_per_node < 1:
        raise ValueError(f'need at least one process, not {nproc_per_node}')
    if not timeout > 0:
        raise ValueError(f'timeout must be positive, not {timeout!r}')
    threads = {} if nproc_per_node == 1 or 'OMP_NUM_THREADS' in os.environ \
        else {'OMP_NUM_THREADS': '1'}
    job = _Job({**os.environ, **threads}, python or sys.executable)
    finished, port = False, free_port()
    try:
        for rank in range(nproc_per_node):
            job.start(f'rank {rank}', worker_args, {
                **torchrun_env(port, rank, nproc_per_node), **(env or {})},
                True)
        outputs = job.wait_for_workers(timeout)
        finished = True
        return outputs
    finally:
        job.end(grace=10 if finished else 0)
