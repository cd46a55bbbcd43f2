"""Runs INSIDE the zygote's template and in each forked run (worker side).

The daemon preloads this module into every zygote template, so its imports
(``runpy`` and what it pulls in: no ``threading``) are paid once, there.

``main`` is the run's target: it becomes the client's process as
``python script.py`` would have made it -- the client's fds 0-2 as stdio
(with fresh ``sys.std*`` objects: line buffering follows ``isatty()`` of the
*client's* streams), its environment, cwd, umask and ignored signals, a
process group of its own, ``sys.argv``/``sys.path[0]``/``__main__`` set as
CPython's command line sets them -- then runs the script and ends as the
interpreter would: non-daemon threads joined, ``atexit``, stdio flushed (a
failed flush is status 120), the script's modules released so that their
objects are finalised (a file left open is flushed and closed), then
``os._exit``; an uncaught ``KeyboardInterrupt`` ends it by SIGINT.  The
modules preloaded in the zygote are not torn down: that is what makes the
exit cheap.

``report`` is the fingerprint worker: it tells the daemon which files the
template's modules came from, so that an edit is noticed before a run.
"""
import builtins
import gc
import io
import os
import pickle
import runpy
import signal
import sys
import types
import zipimport
from importlib.machinery import BuiltinImporter, PathFinder, SourceFileLoader

_SIGNALS = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)  # what CPython itself sets at start-up


# -- where modules come from (the template's report; the daemon's check of a run) ----------


def origin_of(spec):
    """A comparable description of where ``spec`` loads a module from."""
    if spec is None:
        return None
    if spec.origin is None and spec.submodule_search_locations is not None:
        return "namespace:" + os.pathsep.join(spec.submodule_search_locations)
    return str(spec.origin)


def find_origin(name, path):
    """Where ``import name`` (top level) would load it from with ``sys.path`` = ``path``.

    The finders of ``sys.meta_path`` in order, ``path`` given to the path
    finder, as the import system itself would ask them.
    """
    for finder in sys.meta_path:
        try:
            if finder is PathFinder:
                spec = PathFinder.find_spec(name, path)
            else:
                spec = finder.find_spec(name, None)
        except (ImportError, AttributeError, TypeError, ValueError):
            continue
        if spec is not None:
            return origin_of(spec)
    return None


def path0(mode, target, cwd, safe_path):
    """``sys.path[0]`` for this command line, as CPython computes it (None with -P)."""
    if safe_path:
        return None
    if mode == "code":
        return ""
    if mode == "module":
        return cwd
    full = target if target.startswith("/") else os.path.join(cwd, target)
    if _importer_path(full):
        return full
    return os.path.dirname(os.path.realpath(full))


def _importer_path(path):
    """Whether ``python path`` runs ``path/__main__.py`` (a directory or a zip file)."""
    if os.path.isdir(path):
        return True
    try:
        zipimport.zipimporter(path)
    except (zipimport.ZipImportError, OSError):
        return False
    return True


def report(control, preload):
    """Fingerprint worker: send the daemon the template's module files and preload origins."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__dict__", {}).get("__file__")
        if isinstance(path, str) and path not in files:
            try:
                st = os.stat(path)
                files[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                files[path] = None
    origins = {}
    for name in preload:
        top = name.partition(".")[0]
        module = sys.modules.get(top)
        origins[top] = origin_of(getattr(module, "__spec__", None))
    data = pickle.dumps({"files": files, "origins": origins, "modules": len(sys.modules)})
    control.sendall(len(data).to_bytes(8, "little") + data)
    control.close()


# -- the run -----------------------------------------------------------------------------


def main(control, spec, *fds):
    """The run: become the client's script, run it, end as the interpreter would."""
    control.close()
    status_fd = fds[-1]
    try:
        os.setpgid(0, 0)  # its own group, for the client's signals (the daemon sets it too)
        _stdio(spec["stdio"], fds[:-1])
        _environ(spec["env"])
        os.chdir(spec["cwd"])
        os.umask(spec["umask"])
        _signals(spec["ignored"])
        _reseed()
    except BaseException:  # a bug of ours, or a cwd gone: say so where the user looks
        import traceback

        os.write(2, b"forkserver: the run could not be set up:\n"
                 + traceback.format_exc().encode(errors="replace"))
        os._exit(1)
    before = set(sys.modules)
    code, killed_by = _execute(spec)
    _finish(code, killed_by, status_fd, before)


def _stdio(targets, fds):
    """The client's fds as 0-2 and new ``sys.std*`` objects over them (as CPython makes them)."""
    for target, fd in zip(targets, fds):
        os.dup2(fd, target)  # the copy is inheritable, as stdio must be
        os.close(fd)
    for target in {0, 1, 2} - set(targets):
        try:
            os.close(target)  # closed in the client: closed here (sys.std* is None)
        except OSError:
            pass
    names = ("stdin", "stdout", "stderr")
    for fd, name in enumerate(names):
        old = getattr(sys, name)
        new = _stream(fd, old, name) if fd in targets else None
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)


def _stream(fd, old, name):
    write = fd != 0
    # -u / PYTHONUNBUFFERED (part of the zygote's key, so the template has it as the run would)
    buffered = not write or not getattr(old, "write_through", False)  # stdin: always buffered
    buf = io.open(fd, "wb" if write else "rb", buffering=-1 if buffered else 0, closefd=False)
    raw = buf.raw if buffered else buf
    raw.name = f"<{name}>"
    encoding = getattr(old, "encoding", None)
    errors = getattr(old, "errors", None) or ("backslashreplace" if fd == 2 else "strict")
    text = io.TextIOWrapper(buf, encoding, errors, newline="\n",
                            line_buffering=buffered and write and (fd == 2 or raw.isatty()),
                            write_through=not buffered)
    text.mode = "w" if write else "r"
    return text


def _environ(env):
    """Make ``os.environ`` the client's: change only what differs (typically a few names).

    ``os.environ._data`` is the bytes mapping behind both ``os.environ`` and
    ``os.environb`` (as ``forkserver.spawn`` uses it): a tenth of the cost of
    ``clear()`` and ``update()`` through the mapping.
    """
    data = os.environ._data
    for key in [k for k in data if k not in env]:
        os.unsetenv(key)
        del data[key]
    for key, value in env.items():
        if data.get(key) != value:
            os.putenv(key, value)
            data[key] = value


def _signals(ignored):
    """Dispositions as ``python`` would start with under the client's (its ignored ones kept)."""
    ignored = set(ignored)
    for n in _SIGNALS:
        if n in ignored or n in _PYTHON_IGNORES:
            want = signal.SIG_IGN
        elif n == signal.SIGINT:
            want = signal.default_int_handler
        else:
            want = signal.SIG_DFL
        if signal.getsignal(n) is not want:
            try:
                signal.signal(n, want)
            except (OSError, ValueError):
                pass  # e.g. a signal reserved by the C library
    if signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _reseed():
    """Fresh seeds where a preloaded library seeded a global generator at import.

    CPython's ``random`` reseeds itself after a fork; numpy's legacy global
    ``RandomState`` does not: every run would draw the same numbers.
    """
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        try:
            np_random.seed()
        except Exception:
            pass


def _execute(spec):
    """Run the script as ``__main__``; (exit code, signal to die of or None)."""
    main_module = types.ModuleType("__main__")
    main_module.__builtins__ = builtins
    main_module.__annotations__ = {}
    sys.modules["__main__"] = main_module
    mode, target, args = spec["mode"], spec["target"], spec["args"]
    if spec["path0"] is not None:
        sys.path[0] = spec["path0"]
    if hasattr(sys, "orig_argv"):
        head = {"path": [], "module": ["-m"], "code": ["-c"]}[mode]
        sys.orig_argv = [sys.executable] + head + [target] + args
    try:
        if mode == "code":
            sys.argv = ["-c"] + args
            main_module.__loader__ = BuiltinImporter
            exec(compile(target, "<string>", "exec"), main_module.__dict__)
        elif mode == "module":
            sys.argv = ["-m"] + args
            runpy._run_module_as_main(target, alter_argv=True)
        else:
            sys.argv = [target] + args
            _run_path(target, main_module)
    except SystemExit as exc:
        return _exit_code(exc), None
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # our frames: CPython's own tracebacks start at the script
        interrupted = isinstance(exc, KeyboardInterrupt)
        exc.__traceback__ = tb  # what the default hook prints, whatever tb it is given
        try:
            sys.excepthook(type(exc), exc, tb)
        except BaseException:
            pass
        del exc, tb
        return 1, (signal.SIGINT if interrupted else None)
    return 0, None


def _run_path(target, main_module):
    full = target if target.startswith("/") else os.path.join(os.getcwd(), target)
    if _importer_path(full):  # a directory or zip with __main__.py
        runpy._run_module_as_main("__main__", alter_argv=False)
        return
    try:
        with open(full, "rb") as f:
            source = f.read()
    except OSError as exc:
        sys.stderr.write(f"{sys.executable}: can't open file {full!r}: "
                         f"[Errno {exc.errno}] {exc.strerror}\n")
        raise SystemExit(2) from None
    main_module.__file__ = full
    main_module.__cached__ = None
    main_module.__loader__ = SourceFileLoader("__main__", full)
    code = compile(source, full, "exec", dont_inherit=True)
    exec(code, main_module.__dict__)


def _exit_code(exc):
    """The status ``sys.exit(arg)`` gives at top level (a message: printed, status 1)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def _finish(code, killed_by, status_fd, before):
    """End as ``Py_FinalizeEx`` would, without tearing down the preloaded modules."""
    threading = sys.modules.get("threading")
    try:
        if threading is not None:
            threading._shutdown()
    except BaseException:
        pass
    import atexit

    atexit._run_exitfuncs()
    if not _flush():
        code = 120  # CPython's status when stdout cannot be flushed at exit
    # Release what the script created: modules it imported, __main__.  Their
    # objects are finalised now (files flushed and closed, __del__ run).
    for name in [n for n in sys.modules if n not in before] + ["__main__"]:
        sys.modules.pop(name, None)
    gc.collect()
    _flush()
    status = b"s%d" % killed_by if killed_by else b"c%d" % code
    try:
        os.write(status_fd, status)  # read by the client only if the zygote died
    except OSError:
        pass
    if killed_by:
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    os._exit(code)


def _flush():
    ok = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except Exception:
            ok = ok and stream is not sys.stdout
    return ok
