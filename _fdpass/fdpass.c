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
#include <string.h>
#include <sys/prctl.h>
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

/* Receive up to `len` bytes and up to `maxfds` descriptors.
 *
 * MSG_CMSG_CLOEXEC is always set: a received fd must never leak into a
 * program the receiver execs before Python has wrapped it.  The control
 * buffer is sized for exactly `maxfds`; if the sender attached more, the
 * kernel closes the surplus and sets MSG_CTRUNC in *msg_flags_out, which the
 * caller must treat as a protocol error.  The kernel also sets MSG_CTRUNC
 * when it could not install an fd because our descriptor table is full
 * (EMFILE): those fds are gone, which is why _fds.py releases reserved
 * slots before calling this.
 *
 * A received fd may legitimately be 0, 1 or 2 (if the receiver had closed
 * its stdio): the count in *nfds_out, not the fd values, says what arrived.
 * Returns the number of bytes read; 0 means EOF. */
long fdp_recv(int sock, char *buf, size_t len, int *fds, int maxfds,
              int *nfds_out, int *msg_flags_out, int flags)
{
    struct iovec iov = { buf, len };
    struct msghdr msg;
    union fdp_cmsgbuf cbuf;
    struct cmsghdr *cmsg;
    ssize_t n;
    int count = 0;

    *nfds_out = 0;
    *msg_flags_out = 0;
    if (maxfds < 0 || maxfds > FDP_MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
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
    *msg_flags_out = msg.msg_flags;
    if (maxfds > 0) {
        for (cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
            if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
                int k = (int)((cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                int i;
                int *data = (int *)CMSG_DATA(cmsg);
                for (i = 0; i < k; i++) {
                    if (count < maxfds)
                        fds[count++] = data[i];
                    else
                        close(data[i]);  /* cannot happen: the kernel truncates first */
                }
            }
        }
    }
    *nfds_out = count;
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
 * before every call. */
int fdp_fork_sibling(void)
{
    PyGILState_STATE gil;
    long pid;
    int saved_errno;

    gil = PyGILState_Ensure();
    PyOS_BeforeFork();
    /* x86_64/aarch64 argument order: flags, stack, parent_tid, child_tid, tls.
     * (s390 swaps the first two; we support x86_64 and aarch64.) */
    pid = syscall(SYS_clone, (unsigned long)(CLONE_PARENT | SIGCHLD), NULL, NULL, NULL, 0UL);
    saved_errno = errno;
    if (pid == 0) {
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
