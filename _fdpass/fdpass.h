/* Declarations shared by the cffi builder (cdef) and fdpass.c.
 * Every function is a thin syscall wrapper: it returns -1 and leaves errno
 * set on failure; Python (forkserver/_fds.py) names the result. */
#define FDP_MAX_FDS 253   /* SCM_MAX_FD in the kernel: more fds per message is EINVAL */

long fdp_send(int sock, const char *buf, size_t len, const int *fds, int nfds, int flags);
/* How much of the unit being received has arrived (fdp_recv advances it). */
struct fdp_cursor {
    long got;                /* bytes of the buffer filled */
    int nfds;                /* descriptors of the fd array filled */
    int flags;               /* out: msg_flags of the last recvmsg */
};
long fdp_recv(int sock, char *buf, size_t len, int *fds, int maxfds,
              struct fdp_cursor *cur, int flags);
int fdp_fork_sibling(int announce_fd, const char *prefix, int prefix_len, int *ptid);
int fdp_dup_many(int model, int *out, int n);
int fdp_close_many(const int *fds, int n);
void *fdp_map_shared(int fd, size_t len);
int fdp_gettid(void);
int fdp_set_name(const char *name);

/* A program for fdp_spawn_sibling (see fdpass.c). */
struct fdp_spawn_args {
    char *strings;           /* npaths + nargv + nenv NUL-terminated strings, back to back: */
    int npaths;              /*   candidate paths of the program, tried in turn */
    int nargv;               /*   argv */
    int nenv;                /*   the environment, "KEY=value" */
    char **ptrs;             /* npaths + nargv + nenv + 3 slots, filled here */
    const char *cwd;         /* NULL: stay in the template's directory */
    const int *src;          /* src[i] becomes fd dst[i]; -1: dst[i] is closed; */
    const int *dst;          /*   no src is also a dst */
    int nfd;
    const int *keep;         /* fds > 2 the program keeps, ascending */
    int nkeep;
    int new_session;         /* setsid() */
    int pgid;                /* -1: leave it, 0: a group of its own, > 0: join */
    unsigned long long dfl_sigs;  /* bit s-1: signal s to SIG_DFL even if ignored */
    int announce_fd;         /* -1, or where the child writes `announce` + its pid first */
    const char *announce;    /*   (a frame header, at most 16 bytes) */
    int announce_len;
    int *ptid;               /* NULL, or where the kernel stores the pid (CLONE_PARENT_SETTID) */
    int err;                 /* out: errno of the failed step, 0 if execve ran */
    int stage;               /* out: FDP_STAGE_* of that step */
};
#define FDP_STAGE_SESSION 1
#define FDP_STAGE_FDS 2
#define FDP_STAGE_CWD 3
#define FDP_STAGE_EXEC 4

int fdp_spawn_sibling(struct fdp_spawn_args *a);
