"""Children that end with their parent: the one place that arranges it.

Two kinds of child process are started by this package, and neither may
outlive what started it.

- A process of a distributed job (`d2l_face.cluster`) may start processes of
  its own, in sessions of their own even, and may end by itself and leave
  them behind. Each such process is therefore started under a *reaper*
  (`reaper_command`): a small stdlib-only program that marks itself a child
  subreaper (Linux's ``PR_SET_CHILD_SUBREAPER``), so that every orphan below
  it is re-parented to it rather than to pid 1, runs the command, and when
  the command ends, or the reaper is asked to stop (SIGTERM, SIGINT,
  SIGHUP), kills every descendant before it exits with the command's status.
- A worker of `multiprocessing` (the stand-in's renderers) calls
  `die_with_parent` first thing: the kernel kills it when its parent dies
  (``PR_SET_PDEATHSIG``), and, everywhere, a thread watches the parent.

This module imports nothing outside the standard library: the reaper runs it
as a script in whatever Python the caller names.
"""
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long killing the descendants may take before the reaper gives up (a
# process that keeps forking faster than it is killed, say).
KILL_DEADLINE = 10.0
# Runs this file as the main program without putting its folder on sys.path.
_BOOT = ('import runpy, sys; sys.argv = sys.argv[1:]; '
         'runpy.run_path(sys.argv[0], run_name="__main__")')


def _prctl(option, value):
    """Linux's prctl(option, value); False where there is none."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children_map():
    """{parent pid: [child pids]} of every process, read from /proc.

    Empty without /proc (not Linux): there is no subreaper there either, and
    the launcher's process groups are all that ends."""
    children = {}
    names = os.listdir('/proc') if os.path.isdir('/proc') else []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f'/proc/{name}/stat', 'rb') as f:
                stat = f.read()
        except OSError:  # it ended meanwhile
            continue
        # The name in parentheses may hold spaces; the parent follows it.
        ppid = int(stat[stat.rindex(b')') + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def descendants(pid=None):
    """The pids of every process below `pid` (this process by default)."""
    children, found, todo = _children_map(), [], [pid or os.getpid()]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill_descendants(deadline=KILL_DEADLINE):
    """SIGKILL every descendant and reap them; a subreaper reaps them all.

    Killed processes' children are re-parented to this process when it is a
    subreaper, so rounds go on until none is left or `deadline` passes."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        pids = descendants()
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone already
                pass
        while True:  # reap what was ours; the rest is reaped by its parent
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.01)
    return not descendants()


class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop(signum)


def reap(command):
    """Run `command` as a subreaper; end all its descendants; return status.

    The status is the command's exit code, or minus the signal that ended
    it (or that asked the reaper to stop)."""
    for sig in STOP_SIGNALS:  # before any child exists
        signal.signal(sig, _stop)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        child = subprocess.Popen(command)
        status = child.wait()
    except _Stop as stop:
        status = -stop.args[0]
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        kill_descendants()
    return status


def exit_with(status):
    """Exit as the command did: its code, or killed by its signal."""
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status if 0 <= status < 256 else 1)


def reaper_command(python, command):
    """Arguments that run `command` under a reaper in the given `python`."""
    return [python, '-c', _BOOT, os.path.abspath(__file__), *command]


def die_with_parent(parent_pid, use_pdeathsig=True):
    """Make this (multiprocessing) process end as soon as `parent_pid` ends.

    Linux's kernel does it for us (prctl); everywhere, a thread also waits on
    the parent sentinel that multiprocessing gives a spawned child (a pipe
    the parent holds open, or its process handle on Windows) and polls
    os.getppid(). `use_pdeathsig` False leaves the kernel out (for tests).
    """
    if use_pdeathsig:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,),
                     daemon=True).start()


def _watch_parent(parent_pid):
    import multiprocessing.connection
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, 'sentinel', None)
    while True:
        if sentinel is not None:
            if multiprocessing.connection.wait([sentinel], timeout=1):
                os._exit(1)  # the pipe closed: the parent is gone
        else:
            time.sleep(1)
        if os.getppid() != parent_pid:  # re-parented: the parent is gone
            os._exit(1)


if __name__ == '__main__':
    exit_with(reap(sys.argv[1:]))
