"""``forkserver run``: the zygote's client (lean: stdlib C modules only, no forkserver).

It connects to the zygote for its preload set (starting it on first use),
checks that the zygote runs as the same user, and sends one request: argv,
environment, working directory, umask, the signals it found ignored, and --
as SCM_RIGHTS -- its own fds 0, 1 and 2 and the write end of a status pipe.
The zygote forks the run with those as its stdio, so a terminal stays a
terminal and pipes and redirections behave as with ``python script.py``.

Then the client only waits: it forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT,
SIGWINCH, SIGUSR1/2 and SIGTSTP/SIGCONT to the run's process group, and ends
the way the run ended: the same exit code, or killed by the same signal.
If the zygote dies meanwhile, the run goes on; the client then takes the
status the run writes to the status pipe as it exits (a run killed by a
signal writes nothing: the client says so and exits 1).

Importable as ``forkserver._zygote._client`` (the console script) and as a
top-level ``_client`` (the launcher: ``python -IS``, no ``site``, no package
import; see ``forkserver launcher``).  ``python -X importtime`` of either
shows only ``_socket`` and this room's two modules.

Size (~470 lines): the client runs under ``python -IS`` and imports nothing of the
package beyond ``_wire``, so it cannot share the helpers the rest of forkserver uses.
"""
import _signal
import posix
import sys

try:
    from . import _wire as W
except ImportError:  # the launcher: this directory is sys.path[0]
    import _wire as W  # type: ignore[no-redef,import-not-found]

USAGE = """\
usage: forkserver run [--preload MOD,...] [--socket PATH] [--no-start] [--detach]
                      [--idle-timeout S] (script.py | -m module | -c code) [args ...]

Run a Python script, module or code in a fork of a warm zygote that has MOD,...
imported (default: $FORKSERVER_PRELOAD), with this process's stdin/stdout/stderr,
environment, working directory and umask; exit as it exits.  The zygote is
started on first use (unless --no-start) and stops after S seconds idle.
  --preload MOD,...  modules the zygote imports once, for every run
  --socket PATH      the zygote's socket (default: one per preload set and
                     interpreter in $XDG_RUNTIME_DIR/forkserver or /tmp/forkserver-$UID)
  --no-start         fail instead of starting a zygote that is not running
  --detach           print the run's pid and exit at once; the run goes on
  --idle-timeout S   for a zygote started now: stop after S seconds without runs (900)
"""
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGWINCH,
             _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGTSTP, _signal.SIGCONT)
CORE_SIGNALS = (_signal.SIGQUIT, _signal.SIGILL, _signal.SIGTRAP, _signal.SIGABRT, _signal.SIGBUS,
                _signal.SIGFPE, _signal.SIGSEGV, _signal.SIGXCPU, _signal.SIGXFSZ, _signal.SIGSYS)
START_TIMEOUT = 60.0  # seconds a zygote may take to listen after it was started
# seconds a zygote may take to start a run (a first preload included); then plain python
REPLY_TIMEOUT = float(posix.environ.get(b"FORKSERVER_REPLY_TIMEOUT", b"300"))
BOOT = ("import sys; del sys.path[0]; from forkserver._zygote._serve import daemon_main; "
        "sys.exit(daemon_main(sys.argv[1:]))")


class StartFailed(W.Unusable):
    """No zygote could be started: the run falls back to plain python."""


class UsageError(Exception):
    """Bad command line: the message says what, USAGE says how."""


class Options:
    """A parsed ``forkserver run`` command line."""

    def __init__(self):
        environ = posix.environ
        self.preload = W.split_preload(W.fsdecode(environ.get(b"FORKSERVER_PRELOAD", b"")))
        self.socket = None  # bytes
        self.start = True
        self.detach = False
        self.idle_timeout = None
        self.mode = None  # b"path", b"module", b"code"
        self.target = None  # str
        self.args = []

    def python_argv(self):
        """The same run as a plain ``python`` command line."""
        head = {b"path": [], b"module": ["-m"], b"code": ["-c"]}[self.mode]
        return [sys.executable] + head + [self.target] + self.args


def parse(argv):
    """Options from ``forkserver run``'s arguments (everything after ``run``)."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            raise UsageError("")
        if name in ("--preload", "--socket", "--idle-timeout"):
            if not eq:
                i += 1
                if i == len(argv):
                    raise UsageError(f"{name} needs a value")
                value = argv[i]
            if name == "--preload":
                opts.preload = W.split_preload(value)
            elif name == "--socket":
                path = W.fsencode(value)  # absolute: the zygote it starts works from /
                opts.socket = path if path.startswith(b"/") else posix.getcwdb() + b"/" + path
            else:
                opts.idle_timeout = _seconds(value)
        elif arg == "--no-start":
            opts.start = False
        elif arg == "--detach":
            opts.detach = True
        elif arg in ("-m", "-c") or arg[:2] in ("-m", "-c") and not arg.startswith("--"):
            value = arg[2:]
            if not value:
                i += 1
                if i == len(argv):
                    raise UsageError(f"{arg} needs an argument")
                value = argv[i]
            opts.mode = b"module" if arg[1] == "m" else b"code"
            opts.target, opts.args = value, argv[i + 1:]
            return opts
        elif arg == "--":
            i += 1
            break
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg!r} (python's own options are not taken: set "
                             "PYTHONUNBUFFERED, PYTHONWARNINGS, ... in the environment instead)")
        else:
            break
        i += 1
    if i >= len(argv):
        raise UsageError("no script, -m module or -c code given")
    opts.mode, opts.target, opts.args = b"path", argv[i], argv[i + 1:]
    return opts


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise UsageError(f"--idle-timeout wants seconds (0: never), not {text!r}")
    return value


# -- the request -------------------------------------------------------------------


def request(opts, ident, stdio):
    """The run request's bytes (records; see ``_wire``)."""
    rec = W.record
    parts = [W.MAGIC, rec(W.KEY, ident), rec(W.PRELOAD, ",".join(opts.preload).encode()),
             rec(W.OP, b"run"), rec(W.MODE, opts.mode), rec(W.TARGET, W.fsencode(opts.target))]
    parts += [rec(W.ARG, W.fsencode(a)) for a in opts.args]
    parts += [rec(W.ENV, k + b"=" + v) for k, v in posix.environ.items()]
    mask = posix.umask(0o22)
    posix.umask(mask)
    parts += [rec(W.CWD, posix.getcwdb()), rec(W.UMASK, b"%o" % mask),
              rec(W.IGNORED, b",".join(b"%d" % n for n in ignored_signals())),
              rec(W.STDIO, b"".join(b"%d" % fd for fd in stdio))]
    if opts.detach:
        parts.append(rec(W.DETACH))
    parts.append(rec(W.END))
    return b"".join(parts)


def ignored_signals():
    """Signals ignored here (inherited, as under ``nohup``): the run ignores them too."""
    out = []
    for n in range(1, 65):
        try:
            if _signal.getsignal(n) == _signal.SIG_IGN:
                out.append(n)
        except (ValueError, OSError):
            continue
    return out


def open_stdio():
    """Which of fds 0, 1, 2 are open (a closed one stays closed in the run)."""
    out = []
    for fd in (0, 1, 2):
        try:
            posix.fstat(fd)
        except OSError:
            continue
        out.append(fd)
    return out


# -- finding or starting the zygote ----------------------------------------------------


def socket_path(opts, ident):
    if opts.socket is not None:
        return opts.socket
    return W.runtime_dir() + b"/" + W.zygote_name(ident, opts.preload) + b".sock"


def stem(path):
    return path[:-5] if path.endswith(b".sock") else path


def obtain(path, opts):
    """A socket connected to the zygote at ``path``, started first if need be."""
    try:
        return W.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        if not opts.start:
            raise W.Unusable(f"no zygote listens on {W.fsdecode(path)} (--no-start)") from None
    import fcntl  # the slow path only: a zygote starts

    # One starter at a time: the others wait here, then find it listening.
    lock = posix.open(stem(path) + b".lock", posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return W.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        start_daemon(path, lock, opts)
        return W.connect(path)
    finally:
        posix.close(lock)


def start_daemon(path, lock, opts):
    """posix_spawn ``forkserver serve --foreground`` in a new session; wait until it listens.

    The daemon gets our lock (fd ``lock``, held: it binds under it) and a
    pipe on which it says "ok" once it listens, or why it cannot.
    """
    import select

    log = stem(path) + b".log"
    ready_r, ready_w = posix.pipe2(posix.O_CLOEXEC)
    try:
        posix.set_inheritable(lock, True)
        posix.set_inheritable(ready_w, True)
        argv = [sys.executable, "-c", BOOT, "--socket", W.fsdecode(path),
                "--preload", ",".join(opts.preload), "--lock-fd", str(lock),
                "--ready-fd", str(ready_w)]
        if opts.idle_timeout is not None:
            argv += ["--idle-timeout", repr(opts.idle_timeout)]
        actions = [(posix.POSIX_SPAWN_OPEN, 0, "/dev/null", posix.O_RDONLY, 0),
                   (posix.POSIX_SPAWN_OPEN, 1, log,
                    posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT, 0o600),
                   (posix.POSIX_SPAWN_DUP2, 1, 2)]
        posix.posix_spawn(sys.executable, argv, posix.environ, file_actions=actions, setsid=True)
    except OSError as exc:
        posix.close(ready_r)
        raise StartFailed(f"the zygote could not be started: {exc}") from None
    finally:
        posix.set_inheritable(lock, False)
        posix.close(ready_w)
    # The daemon is not our child for long: it stays in its own session, and
    # is reparented once we exit.  (A zombie meanwhile is harmless.)
    try:
        said = b""
        while True:
            if not select.select([ready_r], [], [], START_TIMEOUT)[0]:
                raise StartFailed(f"the zygote did not start within {START_TIMEOUT:g} s; "
                                 f"see {W.fsdecode(log)}")
            chunk = posix.read(ready_r, 4096)
            if not chunk:
                break
            said += chunk
    finally:
        posix.close(ready_r)
    if not said.startswith(b"ok"):
        why = W.fsdecode(said.strip()) or f"it exited at once; see {W.fsdecode(log)}"
        raise StartFailed(f"the zygote could not start: {why}")


# -- the run -----------------------------------------------------------------------


class Run:
    """One run's state while the client waits (the signal handlers' view of it).

    The handlers are installed before the request is sent (the run may
    start, and be signalled, before its STARTED reply is read); a signal
    that comes while the request is on its way waits in ``pending``.
    """

    def __init__(self):
        self.sock = None  # the zygote's connection once the request is sent; None if it died
        self.pid = None
        self.pidfd = None
        self.pending = []  # signals received before the request was sent
        self.early = []  # signals sent before the run was known to have started

    def sent(self, sock):
        """The request is out: signals from now on go to ``sock``."""
        self.sock = sock
        pending, self.pending = self.pending, []
        for signo in pending:
            self.send(signo)

    def forward(self, signo, frame=None):
        """Signal handler: pass ``signo`` on to the run; on SIGTSTP stop ourselves too."""
        self.send(signo)
        if signo == _signal.SIGTSTP:
            # The run stops (its process group is not orphaned: the zygote
            # daemon is its parent, in the same session).  Now stop as the
            # shell expects; once continued, continue the run.  If our own
            # group is orphaned the kernel discards this SIGTSTP (POSIX), and
            # the run is continued at once: it must not stay stopped either.
            _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
            posix.kill(posix.getpid(), _signal.SIGTSTP)
            _signal.signal(_signal.SIGTSTP, self.forward)
            self.send(_signal.SIGCONT)

    def send(self, signo):
        if self.sock is None and self.pidfd is None:
            self.pending.append(signo)
            return
        if self.pid is None:
            self.early.append(signo)
        if self.sock is not None:
            try:
                self.sock.sendall(W.record(W.SIGNAL, b"%d" % signo))
                return
            except OSError:
                self.sock = None  # the zygote is gone: signal the run directly
        if self.pidfd is not None:
            try:
                _signal.pidfd_send_signal(self.pidfd, signo)
            except OSError:
                pass  # it has exited

    def not_started(self):
        """The attempt did not start a run: signals meant for it apply to us instead."""
        self.sock = None
        early = self.pending + self.early
        self.pending, self.early = [], []
        for signo in early:
            if signo in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT):
                _signal.signal(signo, _signal.SIG_DFL)
                posix.kill(posix.getpid(), signo)


def run(opts):
    """Run ``opts`` in the zygote; returns an exit code (or ends this process by a signal)."""
    ident = W.identity(posix.environ)
    path = socket_path(opts, ident)
    stdio = open_stdio()
    status_r, status_w = posix.pipe2(posix.O_CLOEXEC)
    data = request(opts, ident, stdio)
    state = Run()
    reader = None
    for attempt in (1, 2):
        try:
            sock = obtain(path, opts)
        except StartFailed as exc:
            return plain_python(opts, str(exc))
        W.check_server(sock, path)
        if attempt == 1:  # now, not later: the run may be signalled as soon as it starts
            for signo in FORWARDED:
                if _signal.getsignal(signo) != _signal.SIG_IGN:
                    _signal.signal(signo, state.forward)
        W.send_fds(sock, data, stdio + [status_w])
        state.sent(sock)
        reader = W.RecordReader(sock)
        sock.settimeout(REPLY_TIMEOUT)  # a hung zygote must not hang us (Spring #265)
        try:
            reply = reader.next()
        except W.Timeout:
            reply = (W.FALLBACK, b"the zygote at %s did not answer within %g s (see its log; "
                     b"`forkserver stop` ends it)" % (path, REPLY_TIMEOUT))
        sock.settimeout(None)
        tag = reply[0] if reply else None
        if tag == W.STARTED:
            break
        state.not_started()
        sock.close()
        for fd in reader.fds:
            posix.close(fd)
        if tag == W.FALLBACK:
            return plain_python(opts, W.fsdecode(reply[1]))
        if attempt == 2:
            why = W.fsdecode(reply[1]) if reply else "it closed the connection"
            return plain_python(opts, f"the zygote at {W.fsdecode(path)} cannot run this ({why})")
        # REPLACE (it retired and left the path to a new zygote) or EOF (it died): once more
    posix.close(status_w)
    pid = int(reply[1])
    state.pid, state.pidfd, state.early = pid, (reader.fds[0] if reader.fds else None), []
    if opts.detach:
        posix.write(1, b"%d\n" % pid)
        return 0
    while True:
        reply = reader.next()
        if reply is None:
            state.sock = None
            return orphaned(state, status_r)
        if reply[0] == W.EXITED:
            return end_as(reply[1])


def orphaned(state, status_r):
    """The zygote died during the run: wait for the run's own report on the status pipe."""
    # One read: the run writes its status in one write (atomic in a pipe), and
    # a process it forked may hold the pipe open for long after.
    said = posix.read(status_r, 64)
    if said[:1] in (b"c", b"s"):
        return end_as(said.strip())
    posix.write(2, b"forkserver: the zygote died during the run; the script (pid %d) ended "
                b"without reporting its status (killed by a signal?)\n" % state.pid)
    return 1


def end_as(status):
    """Exit code for b"c<code>"; for b"s<n>" kill ourselves with signal n (128+n if we live)."""
    value = int(status[1:])
    if status[:1] == b"c":
        return value
    for signo in FORWARDED:
        _signal.signal(signo, _signal.SIG_DFL)
    if value not in (_signal.SIGKILL, _signal.SIGSTOP):
        _signal.signal(value, _signal.SIG_DFL)
    if value in CORE_SIGNALS:
        import resource  # no core dump of ours next to the run's

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [value])
    posix.kill(posix.getpid(), value)
    return 128 + value


def plain_python(opts, why):
    """Run it with a plain interpreter instead, after saying why, in one line."""
    for signo in FORWARDED:
        if _signal.getsignal(signo) not in (_signal.SIG_IGN, _signal.SIG_DFL):
            _signal.signal(signo, _signal.SIG_DFL)  # exec would reset them too
    posix.write(2, W.fsencode(f"forkserver: {why}; running plain python\n"))
    argv = opts.python_argv()
    posix.execv(sys.executable, argv)


def main(argv=None):
    """``forkserver run ARGS``: returns the exit status (or never returns)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = parse(argv)
    except UsageError as exc:
        text = f"forkserver run: {exc}\n" if str(exc) else ""
        posix.write(2 if text else 1, W.fsencode(text + USAGE))
        return 2 if text else 0
    try:
        return run(opts)
    except W.Unusable as exc:
        posix.write(2, W.fsencode(f"forkserver run: {exc}\n"))
        return 1
    except KeyboardInterrupt:  # before the run started (no handler yet)
        return 130


def exit_now(code):
    """Leave without interpreter finalisation (nothing of ours needs it)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    posix._exit(code)


def launch(options):
    """The launcher's entry: ``forkserver run OPTIONS <its own arguments>``."""
    exit_now(main(list(options) + sys.argv[1:]))
