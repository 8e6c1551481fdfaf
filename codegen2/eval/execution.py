"""The sandbox that runs model-written programs: one fresh process per sample, contained and cleaned up.

``Sandbox`` keeps one *zygote* per worker: a small ``python -I`` process, started once, that never runs untrusted
code. For each sample the zygote forks a child which enters its namespaces, sets its limits, drops to an
unprivileged uid and ``exec``s the program. Every sample is thus a fresh process (a copy of a pristine
interpreter) and nothing it does reaches the next one; forking instead of starting an interpreter is what makes
this fast (benchmarks/eval_exec.py). The program runs as the official harnesses (human-eval, EvalPlus,
bigcode-evaluation-harness) run it: ``exec`` in an empty namespace, so ``__name__`` is not ``"__main__"`` and an
``if __name__ == "__main__":`` block does not run.

Guarantees in ``namespaces`` mode (needs root or CAP_SYS_ADMIN; CI and the tests run so):
- wall-clock limit, enforced from outside by the zygote; CPU-time limit (RLIMIT_CPU); memory (RLIMIT_AS); file
  size (RLIMIT_FSIZE); open files; no core dumps; no privilege gain (PR_SET_NO_NEW_PRIVS, no capabilities);
- a process limit that binds for root too: the sample runs as uid ``UID_BASE + worker``, so RLIMIT_NPROC applies;
- PID 1 of its own PID namespace: when it ends or is killed, the kernel kills every process it started (double
  forks and daemons included); it cannot see or signal anything outside, the harness included;
- its own network namespace (one per worker) with no interface up: no network, not even loopback;
- a private mount namespace with fresh, size-limited tmpfs on /tmp (its working directory is /tmp/work),
  /var/tmp, /dev/shm and /run/lock, gone with the sample; elsewhere it can change only what the world may change.
  Directories of the interpreter under a private directory (e.g. /root/.pyenv) are made reachable, the rest of it
  stays hidden; an interpreter that lives under /tmp (a venv there) is bound back into the sample's /tmp;
- a scrubbed environment; stdin from /dev/null (or a file the harness names); what it prints through
  ``sys.stdout`` and ``sys.stderr`` is dropped on the spot (the official harnesses swallow it into a string);
  its file descriptor 1 is /dev/null and 2 a pipe read to its end (the last 4 KB kept for the error text): however
  much a sample prints it never blocks or slows down, so output never changes a verdict;
- a pass needs the program to run to its end and the harness to say so: ``sys.exit(0)`` or ``os._exit(0)``
  before the asserts is a failure.

Not guaranteed: it is no security boundary against code written to attack this harness (a program can read its
own memory, so it could forge the success report), nor against reads of world-readable files, CPU contention or
kernel exploits; total memory is bounded only by nproc x RLIMIT_AS + tmpfs sizes (no cgroup). Killed processes
finish dying a few milliseconds after ``run`` returns. Use a VM or gVisor for hostile code.

Fallback ``process-group`` mode (no root, or namespaces refused): the same rlimits, a fresh temporary directory
removed afterwards, the sample's session killed at the end; but no network isolation, files outside can be
written, a process that leaves the session survives, and RLIMIT_NPROC does not bind for root. ``Sandbox.mode``
says which mode is active.
"""

from __future__ import annotations

import ctypes  # all imported at the top: the zygote imports them once, so that samples do not pay for them
import io
import json
import os
import queue
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

UID_BASE = 2_000_000_000  # far above real users' uids; one uid per worker so RLIMIT_NPROC counts are separate
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONHASHSEED": "0",
       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # the world-writable places, each gets a fresh tmpfs
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 2, 4, 0x1000, 0x4000, 0x40000, 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
STATUSES = ("passed", "failed", "timeout", "crashed")
STDERR_TAIL = 4096  # bytes of a sample's stderr kept for the error text; the rest is read and dropped


@dataclass
class Limits:
    timeout: float = 3.0  # wall-clock seconds per sample
    memory_mb: int = 2048  # RLIMIT_AS of each process
    file_mb: int = 16  # RLIMIT_FSIZE
    tmpfs_mb: int = 64  # size of the private /tmp (others get 1 MB)
    nproc: int = 16  # processes + threads per sample (namespaces mode: per sample uid)
    nofile: int = 256


@dataclass
class Result:
    status: str  # one of STATUSES
    error: str = ""  # exception text, signal or reason; empty for a pass

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class Sandbox:
    """Runs programs concurrently on ``workers`` zygotes; ``run`` is thread-safe. Use as a context manager."""

    def __init__(self, workers: int | None = None, limits: Limits | None = None, preload: tuple[str, ...] = ()
                 ) -> None:
        """``preload``: modules the zygotes import once (e.g. numpy for tests that use it), so that samples start
        with them already imported."""
        self.limits = limits or Limits()
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._all = [_Zygote(slot, self.limits, list(preload)) for slot in range(self.workers)]
        self._free: queue.SimpleQueue[_Zygote] = queue.SimpleQueue()
        for zygote in self._all:
            self._free.put(zygote)
        self.mode = self._all[0].mode

    def run(self, program: str, timeout: float | None = None, stdin: str | None = None) -> Result:
        """``stdin``: a file the sample reads as its standard input (opened before it drops its privileges);
        default /dev/null."""
        zygote = self._free.get()  # blocks while all workers are busy
        try:
            return zygote.run(program, timeout or self.limits.timeout, stdin)
        finally:
            self._free.put(zygote)

    def close(self) -> None:
        for zygote in self._all:
            zygote.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Zygote:
    """Harness side of one zygote: JSON lines over its stdin/stdout, restarted if it ever stops answering. A
    sample's stdin file is opened here and its descriptor passed over a socket: the zygote's own view of the file
    system hides /tmp and private directories, and the file need not be visible to the sample at all."""

    def __init__(self, slot: int, limits: Limits, preload: list[str]) -> None:
        self.config = {"slot": slot, "limits": asdict(limits), "preload": preload}
        self._start()

    def _start(self) -> None:
        self.fds, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        config = json.dumps(self.config | {"fds": theirs.fileno()})
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), config],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, cwd="/",
                                     start_new_session=True, pass_fds=[theirs.fileno()])
        theirs.close()
        self._buf = b""
        hello = self._read_line(60.0)
        if hello is None:
            self.close()
            raise RuntimeError("the sandbox zygote did not start")
        self.mode = json.loads(hello)["mode"]

    def _read_line(self, seconds: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            if not select.select([fd], [], [], seconds)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def run(self, program: str, timeout: float, stdin: str | None) -> Result:
        fd = os.open(stdin, os.O_RDONLY) if stdin else -1  # a missing file raises here, in the caller
        try:
            if fd >= 0:  # sent before the request that uses it
                socket.send_fds(self.fds, [b"f"], [fd])
            request = {"program": program, "timeout": timeout, "stdin": fd >= 0}
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            line = self._read_line(timeout + 30.0)  # the zygote enforces `timeout`; this guards the zygote
        except OSError:
            line = None
        finally:
            if fd >= 0:
                os.close(fd)
        if line is None:  # a dead or stuck zygote: kill it (its sample dies with it, PDEATHSIG) and restart
            self.close()
            self._start()
            return Result("crashed", "the sandbox did not answer")
        return Result(**json.loads(line))

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.fds.close()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


# --- inside the zygote (run as ``python -I execution.py CONFIG``) ---------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _libc_call(name: str, *args) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _zygote_main(config: dict) -> None:
    limits, slot, fds = Limits(**config["limits"]), config["slot"], socket.socket(fileno=config["fds"])
    isolated, own_pid_ns = os.geteuid() == 0, -1
    if isolated:
        try:  # once per zygote: no network for any sample it forks, and a mount tree they may see
            _libc_call("unshare", CLONE_NEWNS | CLONE_NEWNET)
            _libc_call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates to the host
            _hold_scratch_paths([sys.prefix, sys.base_prefix, *sys.path])
            _libc_call("mount", b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0700")
            _rebind_scratch_paths()
            _expose([sys.prefix, sys.base_prefix, *sys.path])
            own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
            probe = _run({"program": "import os, json", "timeout": 30}, limits, slot, own_pid_ns)
            if probe["status"] != "passed":
                raise OSError(0, probe["error"])
        except OSError as e:
            print(f"codegen2 sandbox: namespaces unavailable ({e}); falling back to process groups", file=sys.stderr)
            isolated, own_pid_ns = False, -1
    for name in config["preload"]:
        try:
            __import__(name)
        except Exception:
            pass
    out = sys.stdout.buffer
    out.write(json.dumps({"mode": "namespaces" if isolated else "process-group"}).encode() + b"\n")
    out.flush()
    for line in _requests():  # EOF (the harness went away) ends the zygote
        try:
            request = json.loads(line)
            stdin = socket.recv_fds(fds, 1, 1)[1][0] if request.get("stdin") else -1
            try:
                reply = _run(request | {"stdin": stdin}, limits, slot, own_pid_ns)
            finally:
                if stdin >= 0:
                    os.close(stdin)
        except Exception as e:
            reply = {"status": "crashed", "error": f"the sandbox failed: {e!r}"}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


_scratch_held: list[tuple[str, str]] = []  # (interpreter path inside a scratch dir, where it is staged)


def _hold_scratch_paths(paths: list[str]) -> None:
    """An interpreter (e.g. a venv) may live under /tmp, which the sandbox covers with a fresh tmpfs. Before it
    is covered, bind each such path into a staging tmpfs (over an unused top-level directory, in our own mount
    namespace only) so that it can be bound back at its own place afterwards."""
    hidden = [p for p in sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)}, key=len)
              if any(p == d or p.startswith(d + "/") for d in SCRATCH_DIRS)]
    if not hidden:
        return
    stage = next(d for d in ("/srv", "/media", "/mnt", "/opt") if os.path.isdir(d))
    _libc_call("mount", b"tmpfs", stage.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755")
    for i, path in enumerate(hidden):
        target = os.path.join(stage, str(i))
        os.mkdir(target)
        _libc_call("mount", path.encode(), target.encode(), None, MS_BIND | MS_REC, None)
        _scratch_held.append((path, target))


def _rebind_scratch_paths() -> None:
    """After a scratch dir was covered: bind the staged interpreter paths back at their own place."""
    for path, staged in _scratch_held:
        os.makedirs(path, mode=0o755, exist_ok=True)
        _libc_call("mount", staged.encode(), path.encode(), None, MS_BIND | MS_REC, None)


def _expose(paths: list[str]) -> None:
    """Let the unprivileged sample reach the interpreter's files even when they sit under a private directory
    (e.g. ~/.pyenv under /root, mode 0700): in our own mount namespace, each such directory is covered by a tmpfs
    holding only bind mounts of the children on the needed paths; everything else in it stays hidden."""
    needed: dict[str, set[str]] = {}
    for path in {os.path.realpath(p) for p in paths if p and os.path.exists(p)}:
        parts = path.split("/")[1:]
        for i in range(len(parts)):
            parent = "/" + "/".join(parts[:i])
            if any(parent == d or parent.startswith(d + "/") for d in SCRATCH_DIRS):
                continue  # each sample gets these as its own tmpfs, with the held paths bound back in
            if not os.stat(parent).st_mode & 0o001:  # others may not traverse it
                needed.setdefault(parent, set()).add(parts[i])
    for parent in sorted(needed, key=len):  # outermost first, so nested private directories work too
        stage = tempfile.mkdtemp(dir="/tmp")
        _libc_call("mount", parent.encode(), stage.encode(), None, MS_BIND | MS_REC, None)
        _libc_call("mount", b"tmpfs", parent.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755")
        for child in needed[parent]:
            source, target = os.path.join(stage, child), os.path.join(parent, child)
            os.mkdir(target) if os.path.isdir(source) else open(target, "w").close()
            _libc_call("mount", source.encode(), target.encode(), None, MS_BIND | MS_REC, None)
        _libc_call("umount2", stage.encode(), MNT_DETACH)


_detached: set[int] = set()  # samples that reported and were killed, but not yet reaped


def _requests():
    """Request lines from stdin. Samples that reported are killed without waiting for them (their namespaces
    take milliseconds to tear down), so while any is unreaped, stdin is polled with a short timeout and they are
    collected in between. Not a SIGCHLD handler: a signal landing just before the blocking read() is lost until
    the next request, and the zombie stays behind (it counts against RLIMIT_NPROC too)."""
    buf = bytearray()
    while True:
        _reap()
        end = buf.find(b"\n")
        if end >= 0:
            line = bytes(buf[:end])
            del buf[:end + 1]
            yield line
            continue
        if select.select([0], [], [], 0.02 if _detached else None)[0]:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return
            buf += chunk


def _reap() -> None:
    for pid in list(_detached):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                _detached.discard(pid)
        except ChildProcessError:
            _detached.discard(pid)


def _run(request: dict, limits: Limits, slot: int, own_pid_ns: int) -> dict:
    """Run one sample: fork it (as PID 1 of a new PID namespace when isolated), watch it, report."""
    isolated = own_pid_ns >= 0
    if isolated:  # reset our children's PID namespace to ours, then ask for a fresh one for the next child
        _libc_call("setns", own_pid_ns, CLONE_NEWPID)
        _libc_call("unshare", CLONE_NEWPID)
    # /tmp/work inside the sample's own /tmp tmpfs: /tmp itself may hold an interpreter bound back in.
    workdir = "/tmp/work" if isolated else tempfile.mkdtemp(prefix="codegen2-eval-")
    res_r, res_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _sample(request, limits, slot, isolated, workdir, res_w, err_w)
    os.close(res_w)
    os.close(err_w)
    try:
        status, error = _watch(pid, request["timeout"], res_r, err_r, isolated)
    finally:
        os.close(res_r)
        os.close(err_r)
        if not isolated:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"status": status, "error": error[-2000:]}


def _watch(pid: int, timeout: float, res_r: int, err_r: int, isolated: bool) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    pidfd = os.pidfd_open(pid)
    report, stderr = b"", b""
    open_fds, timed_out, exited = [res_r, err_r], False, False
    while not exited and not report.endswith(b"\n"):  # until it exits or reports
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for fd in select.select(open_fds + [pidfd], [], [], left)[0]:
            if fd == pidfd:
                exited = True
                continue
            chunk = os.read(fd, 65536)
            if fd == err_r:  # read to its end, keeping a tail: a pipe left full would block the sample (a timeout)
                stderr = (stderr + chunk)[-STDERR_TAIL:]
            else:
                report += chunk
            if not chunk or len(report) > 65536:  # EOF, or more than the one short report line we expect
                open_fds.remove(fd)
    os.close(pidfd)
    # As PID 1 of its namespace the sample takes every process it started with it; otherwise kill its group.
    _kill(pid, isolated)
    if report.endswith(b"\n") and not timed_out:  # it reported: no need to wait for its exit status
        _detached.add(pid)
        _reap()
        result = json.loads(report.decode(errors="replace").splitlines()[0])
        return result["status"], result.get("error", "")
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    _kill(pid, isolated)
    if timed_out or code == -signal.SIGXCPU:
        return "timeout", f"timed out after {timeout:g} s" + (" (CPU limit)" if not timed_out else "")
    if err_r in open_fds:  # what it wrote to stderr before the end, still in the pipe
        os.set_blocking(err_r, False)
        for _ in range(64):  # bounded: a process that escaped the kill may still be writing
            try:
                if not (chunk := os.read(err_r, 65536)):
                    break
            except BlockingIOError:
                break
            stderr = (stderr + chunk)[-STDERR_TAIL:]
    text = stderr.decode(errors="replace").strip()[-500:]
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals.__members__.values() else str(-code)
        return "crashed", f"killed by {name}" + (f": {text}" if text else "")
    return "failed", f"exited with status {code} before the tests finished" + (f": {text}" if text else "")


def _kill(pid: int, isolated: bool) -> None:
    try:
        os.kill(pid, signal.SIGKILL) if isolated else os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sample(request: dict, limits: Limits, slot: int, isolated: bool, workdir: str, res_w: int, err_w: int) -> None:
    """The sample process: namespaces, limits, privileges, then the program. Never returns."""
    write, exit_, describe = os.write, os._exit, _describe  # held before the program runs
    program, timeout = request["program"], request["timeout"]
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote dies -> so does the sample
        os.setsid()  # its own group: kill(0, ...) and killpg(...) reach only the sample's processes
        null = os.open(os.devnull, os.O_RDWR)
        stdin = request.get("stdin", -1)  # a descriptor the harness passed, else /dev/null; moved to 0 first,
        os.dup2(stdin if stdin >= 0 else null, 0)  # before the dup2s below could overwrite its number
        os.dup2(null, 1), os.dup2(err_w, 2), os.dup2(res_w, 3)
        if isolated:  # a private copy of the zygote's mount tree with fresh scratch space; gone when we are
            uid = UID_BASE + slot
            _libc_call("unshare", CLONE_NEWNS)
            for d in SCRATCH_DIRS:
                if os.path.isdir(d):
                    size, mode = (limits.tmpfs_mb, "0700") if d == "/tmp" else (1, "1777")
                    _libc_call("mount", b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                               f"size={size}m,mode={mode},uid={uid},gid={uid}".encode())
            _rebind_scratch_paths()
            os.mkdir(workdir, 0o700)
            os.chown(workdir, uid, uid)
        os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # the zygote's pipes among them
        mb = 1 << 20
        for which, value in [(resource.RLIMIT_AS, limits.memory_mb * mb), (resource.RLIMIT_FSIZE, limits.file_mb * mb),
                             (resource.RLIMIT_CPU, int(timeout) + 1), (resource.RLIMIT_NPROC, limits.nproc),
                             (resource.RLIMIT_NOFILE, limits.nofile), (resource.RLIMIT_CORE, 0)]:
            resource.setrlimit(which, (value, value))
        os.chdir(workdir)
        if isolated:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        sys.argv, sys.stdin, sys.stdout, sys.stderr = ["<sample>"], open(0, closefd=False), _Drop(), _Drop()
    except BaseException as e:
        try:
            write(3, json.dumps({"status": "crashed", "error": f"sandbox setup failed: {e!r}"}).encode() + b"\n")
        finally:
            exit_(1)  # never return into the zygote's loop
    try:
        exec(compile(program, "<sample>", "exec"), {})
    except BaseException as e:  # SystemExit included: leaving before the tests end is not a pass
        try:
            text = describe(e, program)
        except BaseException:
            text = "an exception that cannot be described"
        write(3, json.dumps({"status": "failed", "error": text}).encode() + b"\n")
        exit_(1)
    write(3, b'{"status": "passed"}\n')
    exit_(0)


class _Drop(io.TextIOBase):
    """A sample's sys.stdout and sys.stderr: text in, nothing kept; like the official harnesses' StringIO, it has no
    ``buffer`` or ``fileno``. Writing a gigabyte through it costs nothing, where encoding it for a file takes
    seconds (HumanEval/63's recursion printing 200 KB per call timed out so)."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        return len(text)


def _describe(e: BaseException, program: str) -> str:
    """``ExcType: message (line N: source)`` for the innermost line of the program; cheap even for a
    million-frame RecursionError (traceback.format_exception takes minutes on those)."""
    tb, line = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<sample>":
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None and isinstance(e, SyntaxError):
        line = e.lineno
    text = "".join(traceback.format_exception_only(type(e), e)).strip()[-1000:]
    lines = program.splitlines()
    if line and 0 < line <= len(lines):
        text += f" (line {line}: {lines[line - 1].strip()[:200]})"
    return text


if __name__ == "__main__":

    _zygote_main(json.loads(sys.argv[1]))
