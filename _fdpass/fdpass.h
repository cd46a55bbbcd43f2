/* Declarations shared by the cffi builder (cdef) and fdpass.c.
 * Every function is a thin syscall wrapper: it returns -1 and leaves errno
 * set on failure; Python (forkserver/_fds.py) names the result. */
#define FDP_MAX_FDS 253   /* SCM_MAX_FD in the kernel: more fds per message is EINVAL */

long fdp_send(int sock, const char *buf, size_t len, const int *fds, int nfds, int flags);
long fdp_recv(int sock, char *buf, size_t len, int *fds, int maxfds,
              int *nfds_out, int *msg_flags_out, int flags);
int fdp_fork_sibling(void);
int fdp_dup_many(int model, int *out, int n);
int fdp_close_many(const int *fds, int n);
int fdp_gettid(void);
int fdp_set_name(const char *name);
