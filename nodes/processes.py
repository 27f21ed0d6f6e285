"""Process trees the same way on Windows, macOS and Linux: start one apart from ComfyUI, see whether any of it
is still running, kill all of it.

This is the one module with platform branches. Everything else goes through psutil, which implements each call
used here on Windows too; names only POSIX has (os.killpg, os.getpgid, os.getsid, signal.SIGKILL,
start_new_session) are reached only where `WINDOWS` is false.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import defaultdict
from typing import IO

import psutil

WINDOWS = os.name == "nt"
KILL_WAIT_S = 10.0
KILL_ROUNDS = 3
POLL_S = 0.05
# A refresh reads every process's parent pid (a few ms per hundred processes): often enough to meet a
# trainer's workers, rarely enough to cost ComfyUI nothing. kill() refreshes regardless.
REFRESH_EVERY_S = 1.0


def new_group_options() -> dict[str, object]:
    """Popen options that start the child in a group of its own, so that a Ctrl-C in ComfyUI's console does not
    hit the trainer mid-step: it is stopped through its stop file, or notices ComfyUI is gone, and saves first."""
    if WINDOWS:
        # no sessions on Windows; a new process group keeps the console's Ctrl-C/Ctrl-Break away from it
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def start(argv: list[str], log: IO[bytes], env: dict[str, str]) -> subprocess.Popen:
    """Start `argv` in a new group, stdout and stderr to `log`, no stdin."""
    return subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **new_group_options()
    )


def running(process: psutil.Process) -> bool:
    """A zombie has finished: it only waits for its parent (or init) to collect its exit status."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessTree:
    """A started process and every process it starts, remembered once seen.

    Remembered, because a process whose parent exits is re-parented (to init on POSIX; on Windows its parent pid
    points at nothing) and drops out of the root's `children(recursive=True)`: `refresh()` runs while the
    trainer is followed, so such stragglers stay known. psutil.Process compares by pid and start time, so a
    reused pid is never taken for a member.

    The root's exit status is collected (Popen.wait) only after the rest is dead: on POSIX the exited root then
    stays a zombie, so its pid, the id of the session `start_new_session` made, cannot be reused meanwhile and
    the session's members can be swept safely.
    """

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.members: set[psutil.Process] = set()
        self._refreshed = float("-inf")
        try:
            self.root: psutil.Process | None = psutil.Process(popen.pid)
            self.members.add(self.root)
        except psutil.Error:
            self.root = None  # gone already; popen has its exit status
        self.refresh()

    def refresh(self, force: bool = True) -> None:
        """Add the descendants of every running member: one scan of the process table, parent pids mapped.
        Unless `force`, at most once per REFRESH_EVERY_S."""
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_EVERY_S:
            return
        self._refreshed = now
        by_parent: dict[int, list[psutil.Process]] = defaultdict(list)
        for process in psutil.process_iter(["ppid"]):
            by_parent[process.info["ppid"]].append(process)
        stack = [p for p in self.members if running(p)]
        while stack:
            parent = stack.pop()
            for child in by_parent.get(parent.pid, []):
                if child not in self.members and started_after(child, parent):
                    self.members.add(child)
                    stack.append(child)

    def root_exited(self) -> bool:
        if WINDOWS:
            return self.popen.poll() is not None  # no zombies there, nothing to keep
        # POSIX: tell an exited root by its zombie, without collecting it (see the class docstring)
        return self.popen.returncode is not None or self.root is None or not running(self.root)

    def wait_root(self, timeout: float | None = None) -> bool:
        """Wait until the root has exited, leaving its exit status to Popen; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.root_exited():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.refresh(force=False)  # meet the root's children while they are still its children
            time.sleep(POLL_S)
        return True

    def alive(self, force: bool = True) -> list[psutil.Process]:
        """The members still running (`force`: see `refresh`)."""
        self.refresh(force)
        return [p for p in self.members if running(p) and not (p == self.root and self.root_exited())]

    def kill(self, timeout: float = KILL_WAIT_S) -> list[psutil.Process]:
        """Kill every member, wait for them, collect the root's exit status; returns those still alive after
        `timeout` (none, normally).

        All members are collected before any is killed: once a parent is dead its children can no longer be
        found through it. Several rounds, for a child started while the kill was under way.
        """
        left: list[psutil.Process] = []
        for _ in range(KILL_ROUNDS):
            if not WINDOWS:
                self.members.update(session_members(self.popen.pid, self.session_held()))
            left = self.alive()
            if not left:
                break
            for process in left:
                try:
                    process.kill()  # psutil: SIGKILL on POSIX, TerminateProcess on Windows
                except psutil.Error:
                    continue
            # the root is not waited for by psutil, which would collect its exit status and leave Popen a 0
            left = wait_gone([p for p in left if p != self.root], timeout)
            if not self.wait_root(timeout) and self.root is not None:
                left.append(self.root)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # reported in `left`
        return left

    def session_held(self) -> bool:
        """POSIX: is the session's id still ours? Yes while the root is not collected (a zombie holds its pid),
        or while any member is in the session (a live session's id is never handed out again)."""
        if self.popen.returncode is None:
            return True
        return any(running(m) and in_session(m, self.popen.pid) for m in self.members)


def wait_gone(process_list: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """psutil.wait_procs in short slices, taking a zombie for gone: psutil waits until someone collects it, and
    the init of a container need not do that soon (or ever)."""
    deadline = time.monotonic() + timeout
    left = process_list
    while left and time.monotonic() < deadline:
        _, left = psutil.wait_procs(left, timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        left = [p for p in left if running(p)]
    return left


def started_after(child: psutil.Process, parent: psutil.Process) -> bool:
    """A 'child' older than its parent has a recycled parent pid (what psutil's own children() checks too)."""
    try:
        return child.create_time() >= parent.create_time()
    except psutil.Error:
        return False


def in_session(process: psutil.Process, session_id: int) -> bool:
    getsid = getattr(os, "getsid", None)  # POSIX only
    try:
        return getsid is not None and getsid(process.pid) == session_id
    except (OSError, psutil.Error):
        return False  # gone, or not ours to look at


def session_members(session_id: int, held: bool) -> list[psutil.Process]:
    """POSIX: the processes of the session that `start_new_session` made (its id is the root's pid), `held`
    meaning the id is known to be still ours. This finds an orphan re-parented before any `refresh()` saw it."""
    if not held:
        return []
    return [p for p in psutil.process_iter() if in_session(p, session_id)]
