"""The sandbox's first process: sets up the sandbox, starts the program and reports how it ended.

:mod:`tunesmith_rewards.sandbox` runs this file's source with ``python -I -S -c`` and one
argument, a JSON object of settings. In isolated mode it runs as pid 1 of fresh user, network,
pid, mount, IPC and UTS namespaces made by ``unshare``, as root of that user namespace, and before
starting the program it

- hides ``/tmp``, ``/var/tmp``, ``/run``, ``/home``, ``/root`` and ``$HOME`` under empty tmpfs
  mounts (bringing back only the Python interpreter where it lives there), gives the sandbox a
  ``/dev`` holding only ``null``, ``zero``, ``full``, ``random`` and ``urandom``, and makes
  ``/tmp`` a tmpfs of at most ``disk_bytes`` in which the program's working directory lives;
- remounts every other mount read-only, but for ``/proc``, of which only the parts that reach
  beyond the sandbox (``/proc/sys``, ``/proc/sysrq-trigger`` ...) are;
- caps the number of processes, also where they count as the host's root, whom ``RLIMIT_NPROC``
  does not bound: then by the namespace's ``pid_max`` (Linux 6.14+) and idle threads holding pids;
- starts the program through a second ``unshare`` into a nested user and mount namespace as an
  unprivileged user, which locks those read-only mounts: the program cannot remount them.

It then reaps orphans until the program exits and exits itself, which makes the kernel kill every
process left in the pid namespace, ``setsid`` daemons included; it also exits a little after the
timeout, in case the process that started the sandbox is gone. In unisolated mode only the
resource limits apply. It writes ``ready``, then ``exit N`` or ``signal N``, or ``error MESSAGE``
when it could not set up, to ``status_fd``, which the program never sees. Standard library only:
``-S`` leaves out site-packages.
"""

import _thread
import ctypes
import json
import os
import re
import resource
import signal
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC = 0x20, 0x1000, 0x4000
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 0x400, 0x800, 0x200000
# statvfs flags of a mount that an unprivileged remount must keep, and their mount(2) flags
KEPT_FLAGS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}
OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
HIDDEN = ["/var/tmp", "/run", "/home", "/root"]
DEVICES = ["null", "zero", "full", "random", "urandom"]
# /proc stays writable, for the nested unshare to write its uid_map; these are the parts of it that
# reach beyond the sandbox (sysctls, the magic SysRq key, interrupts, buses), made read-only as
# bubblewrap does. /proc then counts as not fully visible, so the program cannot mount a new one.
PROC_READ_ONLY = ["sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "scsi", "driver"]
# the smallest pid_max the kernel accepts (RESERVED_PIDS + 1)
MIN_PID_MAX = 301
THREAD_STACK_BYTES = 32 * 1024

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """The sandbox could not be set up; the message says which step failed."""


def mount(source, target, fstype, flags, data=None):
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        error = ctypes.get_errno()
        raise SetupError(f"mount {source or fstype} on {target}: {os.strerror(error)}")


def mount_points():
    """The mount points in this mount namespace, in mount order."""
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            field = line.split()[4]  # mountinfo writes a space as \040
            points.append(OCTAL_ESCAPE.sub(lambda match: chr(int(match[1], 8)), field))
    return points


def within(path, directory):
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def hide(directory, keep, options="size=1m,mode=755"):
    """Cover ``directory`` with an empty tmpfs, then bind back the paths of ``keep`` under it."""
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in keep if within(path, directory)}
    mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, fd in kept.items():
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)


def make_dev():
    """Replace /dev with a tmpfs holding only harmless devices (no GPUs, no disks, no kmsg)."""
    devices = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES}
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name, fd in devices.items():
        open(f"/dev/{name}", "w").close()
        mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    os.symlink("/proc/self/fd", "/dev/fd")
    for fd, name in enumerate(["stdin", "stdout", "stderr"]):
        os.symlink(f"/proc/self/fd/{fd}", f"/dev/{name}")
    os.mkdir("/dev/shm")


def remount_read_only(writable):
    """Remount every mount but those of ``writable`` read-only, then check that each one is."""
    for name in PROC_READ_ONLY:
        if os.path.exists(f"/proc/{name}"):
            mount(f"/proc/{name}", f"/proc/{name}", None, MS_BIND | MS_REC)
    for point in mount_points():
        if point in writable or not os.path.exists(point):
            continue
        kept = os.statvfs(point).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for statvfs_flag, mount_flag in KEPT_FLAGS.items():
            if kept & statvfs_flag:
                flags |= mount_flag
        try:
            mount(None, point, None, flags)
        except SetupError:
            pass  # a mount covered by a later one: its path is now inside another mount, remounted in turn
    for point in mount_points():
        if point not in writable and os.path.exists(point) and not os.statvfs(point).f_flag & os.ST_RDONLY:
            raise SetupError(f"{point} is still writable after remounting it read-only")


def runs_as_host_root():
    """Whether this user namespace's root is the host's root, whom RLIMIT_NPROC does not bound."""
    with open("/proc/self/uid_map") as uid_map:
        inside, outside, _count = uid_map.readline().split()
    return outside == "0"


def cap_pids(max_processes):
    """Cap the processes (and threads) of the pid namespace below this one at ``max_processes``.

    ``RLIMIT_NPROC`` does that, but not for processes that count as the host's root. For those,
    the namespace gets the smallest ``pid_max`` (Linux 6.14+), and idle threads of this process
    hold every pid number beyond ``max_processes``.
    """
    try:
        with open("/proc/sys/kernel/pid_max", "w") as pid_max:
            pid_max.write(str(max(MIN_PID_MAX, max_processes + 1)))
    except OSError as error:
        if runs_as_host_root():
            raise SetupError(
                "cannot bound the number of processes: RLIMIT_NPROC does not apply to root and this "
                f"kernel does not let a pid namespace set its own pid_max (Linux 6.14+): {error}"
            ) from None
        return
    if runs_as_host_root():
        _thread.stack_size(THREAD_STACK_BYTES)
        never = _thread.allocate_lock()
        never.acquire()
        # _thread rather than threading, whose start() waits until each new thread runs: far slower
        for _ in range(MIN_PID_MAX - 2 - max_processes):  # pids 1 .. MIN_PID_MAX - 1, one is this process
            _thread.start_new_thread(never.acquire, ())


def isolate(settings):
    """Set up the filesystem and pid limits; returns the program's working directory."""
    files = {}
    for name in os.listdir(settings["workdir"]):
        with open(os.path.join(settings["workdir"], name), "rb") as f:
            files[name] = f.read()
    keep = [os.path.realpath(path) for path in settings["keep"]]
    make_dev()
    for directory in dict.fromkeys(HIDDEN + [settings["home"]]):
        if os.path.isdir(directory) and not os.path.islink(directory) and directory not in ("/", "/tmp"):
            hide(directory, keep)
    hide("/tmp", keep, f"size={settings['disk_bytes']},mode=1777")
    workdir = os.path.join("/tmp", os.path.basename(settings["workdir"]))
    os.mkdir(workdir)
    for name, content in files.items():
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(content)
    cap_pids(settings["max_processes"])
    remount_read_only(writable=["/tmp", "/proc"])
    return workdir


def limit_resources(settings, isolated):
    limits = {
        resource.RLIMIT_AS: settings["memory_bytes"],
        resource.RLIMIT_CPU: settings["cpu_seconds"],
        resource.RLIMIT_FSIZE: settings["disk_bytes"],
        resource.RLIMIT_NOFILE: settings["max_open_files"],
        resource.RLIMIT_CORE: 0,
    }
    if isolated:  # outside a user namespace RLIMIT_NPROC counts every process of the user on the host
        limits[resource.RLIMIT_NPROC] = settings["max_processes"]
    for which, limit in limits.items():
        resource.setrlimit(which, (limit, limit))


def wait_for(program, deadline):
    """Reap children, orphans included, until ``program`` exits; its wait status, or ``None`` at the
    deadline. Waits for SIGCHLD, blocked, rather than handling it: pid 1 of a pid namespace gets
    only the signals it handles, so this leaves the program no signal that could stop it."""
    while True:
        while True:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid == program:
                return wait_status
        remaining = deadline - time.monotonic()
        if remaining <= 0 or signal.sigtimedwait([signal.SIGCHLD], remaining) is None:
            return None


def main():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # before any thread starts, for wait_for
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # unhandled, so that the program cannot signal it
    settings = json.loads(sys.argv[1])
    status = settings["status_fd"]
    os.set_inheritable(status, False)
    isolated = settings["unshare"] is not None
    try:
        workdir = isolate(settings) if isolated else settings["workdir"]
        limit_resources(settings, isolated)
    except (OSError, SetupError) as error:
        os.write(status, f"error {error}\n".encode())
        sys.exit(1)
    command = [settings["python"], "-I", "-S", "main.py"]
    if isolated:
        user = ["--user", "--mount", "--map-user=1000", "--map-group=1000", "--"]
        command = [settings["unshare"], *user, *command]
    env = dict(settings["env"], HOME=workdir, TMPDIR=workdir)
    os.write(status, b"ready\n")
    os.chdir(workdir)
    program = os.posix_spawn(command[0], command, env, setsigmask=[])
    # the host kills the sandbox at its timeout; this ends it too, should the host have died
    wait_status = wait_for(program, deadline=time.monotonic() + settings["cpu_seconds"] + 1)
    if wait_status is None:
        os._exit(1)
    if os.WIFSIGNALED(wait_status):
        os.write(status, f"signal {os.WTERMSIG(wait_status)}\n".encode())
    else:
        os.write(status, f"exit {os.waitstatus_to_exitcode(wait_status)}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    main()
