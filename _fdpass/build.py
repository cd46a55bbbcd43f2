"""cffi builder for ``forkserver._fdpass`` (used at build time only).

API mode, compiled against the full CPython API (not ``Py_LIMITED_API``):
``fdp_fork_sibling`` calls the interpreter's fork hooks; ``fdp_spawn_sibling``
uses glibc's ``clone()`` wrapper.
"""
import os

from cffi import FFI

_here = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define FDP_MAX_FDS 253
    long fdp_send(int sock, const char *buf, size_t len, const int *fds, int nfds, int flags);
    struct fdp_cursor {
        long got;
        int nfds;
        int flags;
    };
    long fdp_recv(int sock, char *buf, size_t len, int *fds, int maxfds,
                  struct fdp_cursor *cur, int flags);
    int fdp_fork_sibling(int announce_fd, const char *prefix, int prefix_len, int *ptid);
    int fdp_dup_many(int model, int *out, int n);
    int fdp_close_many(const int *fds, int n);
    void *fdp_map_shared(int fd, size_t len);
    int fdp_gettid(void);
    int fdp_set_name(const char *name);

    struct fdp_spawn_args {
        char *strings;
        int npaths;
        int nargv;
        int nenv;
        char **ptrs;
        const char *cwd;
        const int *src;
        const int *dst;
        int nfd;
        const int *keep;
        int nkeep;
        int new_session;
        int pgid;
        unsigned long long dfl_sigs;
        int announce_fd;
        const char *announce;
        int announce_len;
        int *ptid;
        int err;
        int stage;
    };
    #define FDP_STAGE_SESSION 1
    #define FDP_STAGE_FDS 2
    #define FDP_STAGE_CWD 3
    #define FDP_STAGE_EXEC 4
    int fdp_spawn_sibling(struct fdp_spawn_args *a);
    """
)
ffibuilder.set_source(
    "forkserver._fdpass",
    '#include "fdpass.h"',
    # Relative to the project root, where setup.py runs the build.
    sources=[os.path.join("_fdpass", "fdpass.c")],
    include_dirs=[_here],
    py_limited_api=False,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
