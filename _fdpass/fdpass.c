/* forkserver._fdpass: the syscalls Python's stdlib does not give us.
 *
 * Policy lives in forkserver/_fds.py; this file only calls the kernel.
 * Each function returns -1 with errno set on failure.
 */
/* Python.h first, as the C API asks; its pyconfig.h defines _GNU_SOURCE,
 * which we need for clone flags and MSG_CMSG_CLOEXEC. */
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include "fdpass.h"

/* Control-message buffer big enough for FDP_MAX_FDS descriptors, aligned
 * as the CMSG_* macros require. */
union fdp_cmsgbuf {
    char buf[CMSG_SPACE(sizeof(int) * FDP_MAX_FDS)];
    struct cmsghdr align;
};

/* Send `len` bytes and, if nfds > 0, the descriptors as one SCM_RIGHTS
 * message.  On an AF_UNIX stream socket the kernel attaches the fds to the
 * first skb of this send only, so the caller must make this call start at
 * the byte the receiver will read the fds with.  Returns the number of bytes
 * sent (possibly short on a non-blocking socket). */
long fdp_send(int sock, const char *buf, size_t len, const int *fds, int nfds, int flags)
{
    struct iovec iov = { (void *)buf, len };
    struct msghdr msg;
    union fdp_cmsgbuf cbuf;

    if (nfds < 0 || nfds > FDP_MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        struct cmsghdr *cmsg;
        memset(&cbuf, 0, sizeof cbuf);
        msg.msg_control = cbuf.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
    }
    return (long)sendmsg(sock, &msg, flags);
}

/* Receive into what is left of the current unit, advancing its cursor.
 *
 * `cur->got` bytes of `buf` (`len` long) and `cur->nfds` descriptors of
 * `fds` have arrived already; this call reads at most `len - cur->got` more
 * bytes into `buf + cur->got` and at most `maxfds` descriptors into
 * `fds + cur->nfds`, then adds what it got to the cursor itself.  So the
 * caller never has a moment between the kernel handing over bytes or fds
 * and recording them: a Python signal handler that raises right after this
 * call (Ctrl-C) finds the cursor already up to date.  `cur->flags` gets the
 * message flags.
 *
 * MSG_CMSG_CLOEXEC is always set: a received fd must never leak into a
 * program the receiver execs before Python has wrapped it.  The control
 * buffer is sized for exactly `maxfds`; if the sender attached more, the
 * kernel closes the surplus and sets MSG_CTRUNC in cur->flags, which the
 * caller must treat as a protocol error.  The kernel also sets MSG_CTRUNC
 * when it could not install an fd because our descriptor table is full
 * (EMFILE): those fds are gone, which is why _fds.py releases reserved
 * slots before calling this.
 *
 * A received fd may legitimately be 0, 1 or 2 (if the receiver had closed
 * its stdio): the count, not the fd values, says what arrived.
 * Returns the number of bytes read; 0 means EOF. */
long fdp_recv(int sock, char *buf, size_t len, int *fds, int maxfds,
              struct fdp_cursor *cur, int flags)
{
    struct iovec iov;
    struct msghdr msg;
    union fdp_cmsgbuf cbuf;
    struct cmsghdr *cmsg;
    ssize_t n;
    int count = 0;

    if (maxfds < 0 || maxfds > FDP_MAX_FDS || cur->got < 0 || (size_t)cur->got > len) {
        errno = EINVAL;
        return -1;
    }
    iov.iov_base = buf + cur->got;
    iov.iov_len = len - (size_t)cur->got;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (maxfds > 0) {
        msg.msg_control = cbuf.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * maxfds);
    }
    n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
    if (n < 0)
        return -1;
    if (maxfds > 0) {
        int *out = fds + cur->nfds;
        for (cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
            if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
                int k = (int)((cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                int i;
                int *data = (int *)CMSG_DATA(cmsg);
                for (i = 0; i < k; i++) {
                    if (count < maxfds)
                        out[count++] = data[i];
                    else
                        close(data[i]);  /* cannot happen: the kernel truncates first */
                }
            }
        }
    }
    cur->flags = msg.msg_flags;
    cur->nfds += count;
    cur->got += n;
    return (long)n;
}

/* Create a process that is a child of our *parent* (a sibling of ours),
 * running on from this point like fork(): returns the new pid in the caller,
 * 0 in the new process, -1 with errno on failure.
 *
 * clone(CLONE_PARENT | SIGCHLD) makes the kernel give the new process our
 * parent as its parent, so the user's process (which started the template)
 * can waitpid() it and see its exact exit status.  With a NULL stack the
 * child runs on a copy-on-write copy of our stack, exactly like fork().
 *
 * cffi releases the GIL around this call, so we take it back first: the
 * interpreter's fork hooks must run with it held, as os.fork() does.
 * PyOS_BeforeFork takes the import lock and runs os.register_at_fork
 * "before" hooks; PyOS_AfterFork_Child resets the GIL, the thread states and
 * the threading module in the new process.
 *
 * Why this is safe ONLY in a single-threaded process (DESIGN.md rule 5):
 *  - A raw clone skips glibc's fork(): no pthread_atfork handlers run, and
 *    glibc does not reset its internal locks (malloc arenas, stdio, dl).
 *    If another thread held one of them at the moment of the clone, the
 *    child inherits it locked forever and deadlocks on first use (measured:
 *    a child of a template whose OpenBLAS pool was running spins forever in
 *    its first matrix product).  With one thread, no lock can be held by
 *    anyone but us, and we hold none while inside this function.
 *  - glibc caches the calling thread's kernel tid in its thread descriptor
 *    (struct pthread) and only fork() refreshes it.  In the child that cache
 *    still holds the template's tid: anything keyed on it (recursive or
 *    error-checking pthread mutex ownership, pthread_getattr_np) sees the
 *    template's tid.  Python's own locks do not use owner tids, and the
 *    template never holds such a mutex across this call.
 * The Python side (forkserver/_server) checks /proc/self/status Threads: 1
 * before every call.
 *
 * Announcing the pid: the new process is our *parent's* child, and only
 * our parent can reap it -- if it learns the pid.  So the very first thing
 * the new process does, before the interpreter's after-fork hooks (which run
 * Python code that may fail or kill it), is to write `prefix` followed by
 * its own pid (a native int32) to `announce_fd` (-1: no announcement), a
 * socket to the parent.  From then on the pid is in the parent's socket,
 * whatever happens to us or to the new process.  `prefix` is at most 16
 * bytes (a frame header, built by the caller).
 *
 * A process SIGKILLed before its first instruction writes nothing, and on a
 * busy machine a new process may wait milliseconds for a CPU.  So with
 * `ptid` non-NULL the clone also gets CLONE_PARENT_SETTID: the kernel
 * stores the new pid at `ptid` before the new process is ever woken, and
 * before this call returns to user space -- where a pending SIGKILL of ours
 * would strike.  `ptid` points into a page the parent shares with us (a
 * memfd, forkserver/_slots.py), so the parent can always read the pid,
 * even if both we and the new process die at once. */
static void announce_pid(int fd, const char *prefix, int prefix_len)
{
    char buf[32];
    int32_t pid;
    ssize_t n;

    if (fd < 0 || prefix_len < 0 || prefix_len > 16)
        return;
    pid = (int32_t)syscall(SYS_getpid);
    memcpy(buf, prefix, (size_t)prefix_len);
    memcpy(buf + prefix_len, &pid, sizeof pid);
    do
        n = send(fd, buf, (size_t)prefix_len + sizeof pid, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    /* A failure (EPIPE: the parent is gone) is left to the Python code that
     * follows, which sees the same broken socket. */
}

int fdp_fork_sibling(int announce_fd, const char *prefix, int prefix_len, int *ptid)
{
    PyGILState_STATE gil;
    long pid;
    int saved_errno;

    gil = PyGILState_Ensure();
    PyOS_BeforeFork();
    /* x86_64/aarch64 argument order: flags, stack, parent_tid, child_tid, tls.
     * (s390 swaps the first two; we support x86_64 and aarch64.) */
    pid = syscall(SYS_clone,
                  (unsigned long)(CLONE_PARENT | SIGCHLD | (ptid != NULL ? CLONE_PARENT_SETTID : 0)),
                  NULL, ptid, NULL, 0UL);
    saved_errno = errno;
    if (pid == 0) {
        announce_pid(announce_fd, prefix, prefix_len);
        PyOS_AfterFork_Child();
    } else {
        PyOS_AfterFork_Parent();
    }
    PyGILState_Release(gil);
    errno = saved_errno;
    return (int)pid;
}

/* Duplicate `model` up to n times into out[] (close-on-exec).  Returns how
 * many were made; fewer than n means the last dup failed (errno says why,
 * typically EMFILE/ENFILE: the descriptor table is full). */
int fdp_dup_many(int model, int *out, int n)
{
    int i;
    for (i = 0; i < n; i++) {
        int fd = fcntl(model, F_DUPFD_CLOEXEC, 0);
        if (fd < 0)
            break;
        out[i] = fd;
    }
    return i;
}

/* Close fds[0..n-1]; returns 0, or -1 with errno of the first failure. */
int fdp_close_many(const int *fds, int n)
{
    int i, rc = 0, err = 0;
    for (i = 0; i < n; i++) {
        if (close(fds[i]) < 0 && rc == 0) {
            rc = -1;
            err = errno;
        }
    }
    if (rc < 0)
        errno = err;
    return rc;
}

/* Map `len` bytes of `fd` shared and writable; NULL (errno set) on failure.
 * Python's mmap module keeps a dup of the fd for as long as the mapping
 * lives; this keeps none, so a template and its clones carry no extra fd. */
void *fdp_map_shared(int fd, size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* The calling thread's kernel tid (glibc < 2.30 has no gettid()). */
int fdp_gettid(void)
{
    return (int)syscall(SYS_gettid);
}

/* Name the calling thread (the main thread: the process) as ps/top show it.
 * One prctl instead of open+write+close of /proc/self/comm; the kernel
 * truncates to 15 bytes. */
int fdp_set_name(const char *name)
{
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0);
}

/* ---- spawning a program: fdp_spawn_sibling --------------------------------
 *
 * posix_spawn's technique, with CLONE_PARENT: the template creates a child
 * that shares its memory (CLONE_VM) and is suspended-for (CLONE_VFORK) until
 * the child has exec'd or exited, and the child is made a child of the
 * template's parent (CLONE_PARENT), i.e. of the user's process, which reaps
 * it.  No page tables are copied, so a spawn costs the same from a small or
 * a huge template.
 *
 * Why sharing memory is safe here:
 *  - CLONE_VFORK: the calling thread sleeps until the child's execve has
 *    replaced its memory map, or until it exits; so nothing else runs on
 *    the memory the child writes (its stack and the args struct, both in
 *    the caller's frame below).  Other threads of the caller (there are
 *    none in a template) would keep running, which is why the child writes
 *    nothing but its own stack and `a->err`/`a->stage`.
 *  - The child runs on its own stack (a buffer in the caller's frame): with
 *    a shared stack it would overwrite the frames the caller returns into.
 *    glibc's clone() wrapper switches to it and calls spawn_child there;
 *    syscall(SYS_clone) could not, since its `ret` would pop a return
 *    address from the empty new stack.
 *  - The child calls only async-signal-safe syscall wrappers: no malloc, no
 *    locks, no Python.  Their errno lands in the caller's thread-local errno
 *    (same memory, same TLS), which the caller does not read after a
 *    successful clone.
 *  - All signals are blocked around the clone: a signal delivered to the
 *    child before it has reset the handlers would run the template's
 *    handler (Python's C handler) on the template's memory.  The child
 *    first resets every caught signal to SIG_DFL (an ignored signal stays
 *    ignored, as exec keeps it, unless its bit is in `dfl_sigs`: Python
 *    ignores SIGPIPE and SIGXFSZ, templates ignore SIGINT, glibc's
 *    posix_spawn left 32 and 33 ignored), then restores the template's
 *    mask right before execve.
 *
 * Descriptors: the child shares nothing but memory; its fd table is a copy
 * (no CLONE_FILES).  It dup2()s each source fd to its target (dup2 clears
 * close-on-exec); the caller guarantees that no source number is also a
 * target, so no dup2 overwrites a source still to be placed.  Then every
 * fd >= 3 except the kept ones is marked close-on-exec in O(1) per range
 * with close_range(CLOSE_RANGE_CLOEXEC) (Linux 5.11) -- never a loop up to
 * RLIMIT_NOFILE, which costs tens of ms with a limit of 10^6 (erlexec #150).
 * Marking instead of closing also skips the close work of each file.
 *
 * Returns the child's pid, or -1 with errno if the clone failed.  A pid is
 * returned even if the child failed before or in execve: then a->err is its
 * errno and a->stage says where, and the child has _exit(127)ed -- it is a
 * child of our parent, who must reap it. */

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef SYS_close_range
#define SYS_close_range 436   /* the same number on every architecture */
#endif

#define FDP_SPAWN_STACK (32 * 1024)

struct fdp_linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static int kept(const struct fdp_spawn_args *a, int fd)
{
    int i;
    for (i = 0; i < a->nkeep; i++)
        if (a->keep[i] == fd)
            return 1;
    return 0;
}

/* Old kernels: mark every open fd >= 3 but the kept ones close-on-exec,
 * listing them in /proc/self/fd with raw getdents64 (opendir would malloc). */
static int cloexec_listed(const struct fdp_spawn_args *a)
{
    char buf[4096] __attribute__((aligned(8)));
    int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return -1;
    for (;;) {
        long n = syscall(SYS_getdents64, dir, buf, sizeof buf);
        long off;
        if (n < 0) {
            close(dir);
            return -1;
        }
        if (n == 0)
            break;
        for (off = 0; off < n;) {
            struct fdp_linux_dirent64 *d = (struct fdp_linux_dirent64 *)(buf + off);
            const char *c = d->d_name;
            int fd = 0;
            off += d->d_reclen;
            if (*c < '0' || *c > '9')
                continue;  /* "." and ".." */
            for (; *c >= '0' && *c <= '9'; c++)
                fd = fd * 10 + (*c - '0');
            if (fd > 2 && fd != dir && !kept(a, fd))
                fcntl(fd, F_SETFD, FD_CLOEXEC);  /* marking does not change the listing */
        }
    }
    close(dir);
    return 0;
}

/* close_range(lo, hi) with *flags, dropping CLOSE_RANGE_CLOEXEC for good
 * if the kernel refuses it (Linux 5.9-5.10 know close_range, not the flag). */
static int close_range_flags(unsigned int lo, unsigned int hi, unsigned int *flags)
{
    for (;;) {
        if (syscall(SYS_close_range, lo, hi, *flags) == 0)
            return 0;
        if (errno != EINVAL || *flags == 0)
            return -1;
        *flags = 0;
    }
}

/* Every fd >= 3 except a->keep[] (ascending, > 2) is closed at execve. */
static int cloexec_all_but_kept(const struct fdp_spawn_args *a)
{
    unsigned int lo = 3, flags = CLOSE_RANGE_CLOEXEC;
    int i;
    for (i = 0; i < a->nkeep; i++) {
        unsigned int k = (unsigned int)a->keep[i];
        if (k > lo && close_range_flags(lo, k - 1, &flags) < 0)
            goto failed;
        if (k >= lo)
            lo = k + 1;
    }
    if (close_range_flags(lo, ~0U, &flags) == 0)
        return 0;
failed:
    if (errno != ENOSYS)
        return -1;
    /* Linux < 5.9: no close_range */
    if (cloexec_listed(a) == 0)
        return 0;
    {
        /* No /proc either: the slow loop, as a last resort only. */
        struct rlimit rl;
        unsigned long fd, max = 65536;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
            max = rl.rlim_cur;
        for (fd = 3; fd < max; fd++)
            if (!kept(a, (int)fd))
                fcntl((int)fd, F_SETFD, FD_CLOEXEC);
    }
    return 0;
}

/* The kernel's struct sigaction (not glibc's): the same layout on x86_64 and
 * arm64, which both define SA_RESTORER. */
struct fdp_ksigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    uint64_t mask;
};

struct spawn_ctx {
    struct fdp_spawn_args *a;
    char **paths, **argv, **envp;  /* NULL-terminated, in a->ptrs */
    uint64_t mask;  /* the caller's signal mask, restored before execve */
};

/* Point out[0..n-1] at the next n strings of *s, NULL-terminate out. */
static char **slice_strings(char **s, char **out, int n)
{
    int i;
    for (i = 0; i < n; i++) {
        out[i] = *s;
        *s += strlen(*s) + 1;
    }
    out[n] = NULL;
    return out + n + 1;
}

#define FAIL(st) do { a->err = errno; a->stage = (st); goto fail; } while (0)

static int spawn_child(void *arg)
{
    struct spawn_ctx *ctx = arg;
    struct fdp_spawn_args *a = ctx->a;
    struct fdp_ksigaction dfl, old;
    int sig, i, saved = 0;

    /* First of all, the pid goes to the parent (see announce_pid): a
     * template killed from now on cannot take it with it.  Only syscalls on
     * our own stack; the announcement fd is close-on-exec. */
    if (a->announce_fd >= 0 && a->announce_len > 0 && a->announce_len <= 16) {
        char buf[32];
        int32_t pid = (int32_t)syscall(SYS_getpid);
        ssize_t n;
        memcpy(buf, a->announce, (size_t)a->announce_len);
        memcpy(buf + a->announce_len, &pid, sizeof pid);
        do
            n = write(a->announce_fd, buf, (size_t)a->announce_len + sizeof pid);
        while (n < 0 && errno == EINTR);
    }

    /* Raw rt_sigaction: glibc's sigaction() refuses its internal signals
     * 32 and 33, which a template started by posix_spawn has *ignored*
     * (glibc's spawn helper sets them to SIG_IGN, and exec keeps that). */
    memset(&dfl, 0, sizeof dfl);  /* SIG_DFL is 0 */
    for (sig = 1; sig < 65; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (syscall(SYS_rt_sigaction, sig, NULL, &old, sizeof(uint64_t)) < 0)
            continue;
        if (old.handler == SIG_DFL)
            continue;
        if (old.handler == SIG_IGN && !(a->dfl_sigs & (1ULL << (sig - 1))))
            continue;
        syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof(uint64_t));
    }

    if (a->new_session) {
        if (setsid() < 0)
            FAIL(FDP_STAGE_SESSION);
    } else if (a->pgid >= 0) {
        if (setpgid(0, a->pgid) < 0)
            FAIL(FDP_STAGE_SESSION);
    }

    /* No source is also a target (the caller sees to it), so no dup2 can
     * overwrite a source still to be placed; dup2 clears close-on-exec. */
    for (i = 0; i < a->nfd; i++) {
        if (a->src[i] < 0)
            close(a->dst[i]);  /* the caller had it closed: so does the program */
        else if (dup2(a->src[i], a->dst[i]) < 0)
            FAIL(FDP_STAGE_FDS);
    }

    if (a->cwd != NULL && chdir(a->cwd) < 0)
        FAIL(FDP_STAGE_CWD);
    if (cloexec_all_but_kept(a) < 0)
        FAIL(FDP_STAGE_FDS);

    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &ctx->mask, NULL, sizeof ctx->mask);
    /* Like execvpe over a PATH the caller expanded: go on after ENOENT or
     * ENOTDIR (not there), report the first other error (EACCES...) if the
     * program is nowhere, as CPython's _posixsubprocess does. */
    for (i = 0; ctx->paths[i] != NULL; i++) {
        execve(ctx->paths[i], ctx->argv, ctx->envp);
        if (errno != ENOENT && errno != ENOTDIR && saved == 0)
            saved = errno;
    }
    if (saved)
        errno = saved;
    FAIL(FDP_STAGE_EXEC);

fail:
    _exit(127);
    return 127;
}

int fdp_spawn_sibling(struct fdp_spawn_args *a)
{
    char stack[FDP_SPAWN_STACK] __attribute__((aligned(16)));
    struct spawn_ctx ctx;
    uint64_t all = ~(uint64_t)0;
    char *strings = a->strings, **next = a->ptrs;
    int pid, err;

    a->err = 0;
    a->stage = 0;
    ctx.a = a;
    ctx.paths = next;
    next = slice_strings(&strings, next, a->npaths);
    ctx.argv = next;
    next = slice_strings(&strings, next, a->nargv);
    ctx.envp = next;
    slice_strings(&strings, next, a->nenv);
    /* The kernel's sigset is 64 bits on x86_64/aarch64; SIGKILL/SIGSTOP
     * cannot be blocked and are silently left out. */
    if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &all, &ctx.mask, sizeof all) < 0)
        return -1;
    /* Stacks grow down on every architecture we support: pass the top. */
    /* CLONE_PARENT_SETTID: the pid is in the parent's shared page before
     * the child runs (see fdp_fork_sibling). */
    pid = clone(spawn_child, stack + sizeof stack,
                CLONE_VM | CLONE_VFORK | CLONE_PARENT | SIGCHLD
                    | (a->ptid != NULL ? CLONE_PARENT_SETTID : 0),
                &ctx, a->ptid);
    err = errno;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &ctx.mask, NULL, sizeof ctx.mask);
    errno = err;
    return pid;
}
