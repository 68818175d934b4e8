/*
 * pbs_chroot's hook client: mom_priv/prologue, epilogue, prologue.parallel and
 * epilogue.parallel when the config sets hook_server (README, "The hook server").
 *
 * pbs_mom runs it as root, as it would the Python hook; it asks the hook server
 * (pbs-chroot hookd, a root daemon started before pbs_mom: ../hookd.py) to run
 * the hook, and exits with the server's answer.  It sends its argv, environment,
 * umask, and fds 0, 1, 2 and its cwd (SCM_RIGHTS) on a unix socket in a root-only
 * directory, and checks that the server is root's (SO_PEERCRED).  Built static by
 * `pbs-chroot install` with the site's paths (-DSOCKET_PATH, -DHOOK_DIR,
 * -DSYSLOG_PATH, -DKICK_*) and installed root:root 0500 under the four names; the
 * Python hooks go beside it as NAME.py.  Built without them (the RPM's prebuilt
 * one, for `install --starters`), it uses the default socket and /dev/log, finds
 * NAME.py beside the path pbs_mom ran it by (absolute), and does not kick.
 *
 * Never an unchecked job:
 *   - no server (connect fails, or the listener is not root's), or the server
 *     says "F" (it did nothing: overloaded, fork failed): exec NAME.py, the
 *     Python hook, which does the whole job as before (one syslog line);
 *   - the connection breaks after the request, before an answer (the server's
 *     worker was killed): the prologue execs NAME.py --hookd-lost, a site fault
 *     (the user is told, the node taken offline, exit 2: requeue); what the
 *     worker had done is journaled, and the epilogue or the reconciler finishes
 *     it.  The epilogue is idempotent: it execs NAME.py, which runs it again.
 *   - pbs_mom takes a hook killed by a signal for a success, so this process
 *     asks the OOM killer to spare it and ignores SIGPIPE.
 * The prologue's client also starts the kernel's RCU grace period that moving
 * the job process into its cgroup waits for (kick(), below), before anything else.
 * Exit codes: the server's; 2 if even the Python hook cannot be run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SOCKET_PATH
#define SOCKET_PATH "/run/pbs_chroot/hookd/sock"
#endif
#ifndef SYSLOG_PATH
#define SYSLOG_PATH "/dev/log"
#endif
#ifndef ACK_TIMEOUT_MS
#define ACK_TIMEOUT_MS 5000  /* a worker takes a request in ~2 ms; 5 s is a stuck daemon */
#endif

/* `pbs-chroot install` recognises its own clients by this text. */
__attribute__((used)) static const char marker[] = "pbs_chroot hook client 1";

extern char **environ;

static const char *const names[] = {
    "prologue", "epilogue", "prologue.parallel", "epilogue.parallel"
};

static void say(const char *a, const char *b)
{
    const char *parts[] = { "pbs-chroot hook client: ", a, b, "\n" };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if (parts[i] != NULL && write(2, parts[i], strlen(parts[i])) < 0)
            return;
}

/* One line to syslog (daemon.warning), never blocking: for the admin. */
static void note(const char *name, const char *what, int err)
{
    char msg[1024];
    int n = snprintf(msg, sizeof msg, "<28>pbs-chroot-%s[%d]: hook server %s: %s%s%s",
                     name, (int)getpid(), SOCKET_PATH, what, err ? ": " : "",
                     err ? strerror(err) : "");
    if (n <= 0)
        return;
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    strncpy(addr.sun_path, SYSLOG_PATH, sizeof addr.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return;
    (void)sendto(s, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1,
                 MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&addr, sizeof addr);
    close(s);
}

/*
 * Moving a process between cgroups (the prologue's attach of the job process)
 * takes the kernel's cgroup_threadgroup_rwsem for writing, and the first writer
 * after a quiet spell waits for an RCU grace period (5-20 ms; writers that come
 * while it lasts, or shortly after, do not wait).  A forked child starts it now,
 * by writing itself into the cgroup it is in (KICK_MOUNT, hierarchy KICK_CTRL:
 * a move to where it is, which changes nothing), so the worker's attach a few
 * ms later finds it mostly or wholly over.  Best effort: any failure is silent.
 */
static void kick(void)
{
#ifdef KICK_MOUNT
    pid_t pid = fork();
    if (pid != 0)
        return;
    char buf[4096], path[4096], me[32];
    int fd = open("/proc/self/cgroup", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (n <= 0)
        _exit(0);
    buf[n] = '\0';
    for (char *line = strtok(buf, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        char *ctrls = strchr(line, ':'), *where = ctrls ? strchr(ctrls + 1, ':') : NULL;
        if (where == NULL || where[1] != '/')
            continue;
        *where = '\0';
        int match = KICK_CTRL[0] == '\0' ? ctrls[1] == '\0' : 0;
        char *save = NULL;
        for (char *c = strtok_r(ctrls + 1, ",", &save); !match && c != NULL;
             c = strtok_r(NULL, ",", &save))
            match = strcmp(c, KICK_CTRL) == 0;
        if (!match || strstr(where + 1, "/..") != NULL)
            continue;
        if ((size_t)snprintf(path, sizeof path, "%s%s/cgroup.procs", KICK_MOUNT,
                             strcmp(where + 1, "/") == 0 ? "" : where + 1) >= sizeof path)
            break;
        int out = open(path, O_WRONLY | O_CLOEXEC);
        if (out >= 0) {
            int len = snprintf(me, sizeof me, "%d", (int)getpid());
            (void)!write(out, me, (size_t)len);
        }
        break;
    }
    _exit(0);
#endif
}

/* The Python hook beside this one: the whole job, without the server. */
static int python_hook(const char *name, int argc, char **argv, int lost)
{
    char path[4096];
#ifdef HOOK_DIR
    const char *dir = HOOK_DIR;
    int dirlen = (int)strlen(dir);
#else
    const char *dir = argv[0], *slash = strrchr(argv[0], '/');
    int dirlen = slash != NULL ? (int)(slash - argv[0]) : -1;
    if (argv[0][0] != '/' || dirlen < 0) {
        say("not run by its absolute path: can't find the Python hook for ", name);
        return 2;
    }
#endif
    if ((size_t)snprintf(path, sizeof path, "%.*s/%s.py", dirlen, dir, name) >= sizeof path)
        return 2;
    char **args = calloc((size_t)argc + 2, sizeof *args);
    if (args == NULL)
        return 2;
    int k = 0;
    args[k++] = path;
    if (lost)
        args[k++] = "--hookd-lost";
    for (int i = 1; i < argc; i++)
        args[k++] = argv[i];
    args[k] = NULL;
    execve(path, args, environ);
    int err = errno;
    note(name, "and the Python hook can't be run either", err);
    say("can't run the Python hook ", path);
    return 2;
}

static int append(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t n = strlen(s) + 1;
    if (*len + n > *cap) {
        size_t want = (*len + n) * 2;
        char *p = realloc(*buf, want);
        if (p == NULL)
            return -1;
        *buf = p;
        *cap = want;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    return 0;
}

/* Header ("PCH1", u32 length) and body (umask, argc, argv..., envc, env...). */
static char *request(int argc, char **argv, size_t *total)
{
    size_t cap = 4096, len = 8;
    char *buf = malloc(cap), num[32];
    if (buf == NULL)
        return NULL;
    mode_t mask = umask(0);
    umask(mask);
    size_t envc = 0;
    while (environ != NULL && environ[envc] != NULL)
        envc++;
    snprintf(num, sizeof num, "%o", (unsigned)mask);
    int bad = append(&buf, &len, &cap, num);
    snprintf(num, sizeof num, "%d", argc);
    bad |= append(&buf, &len, &cap, num);
    for (int i = 0; i < argc; i++)
        bad |= append(&buf, &len, &cap, argv[i]);
    snprintf(num, sizeof num, "%zu", envc);
    bad |= append(&buf, &len, &cap, num);
    for (size_t i = 0; i < envc; i++)
        bad |= append(&buf, &len, &cap, environ[i]);
    if (bad) {
        free(buf);
        return NULL;
    }
    uint32_t body = (uint32_t)(len - 8);
    memcpy(buf, "PCH1", 4);
    memcpy(buf + 4, &body, 4);
    *total = len;
    return buf;
}

/* Send the request with fds 0, 1, 2 and cwd attached to its first bytes. */
static int send_request(int s, const char *buf, size_t len, int cwd)
{
    int fds[4] = { 0, 1, 2, cwd };
    union { struct cmsghdr h; char space[CMSG_SPACE(sizeof fds)]; } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = ctl.space, .msg_controllen = sizeof ctl.space };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    ssize_t n;
    do
        n = sendmsg(s, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -1;
    for (size_t done = (size_t)n; done < len; done += (size_t)n) {
        do
            n = send(s, buf + done, len - done, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n <= 0)
            return -1;
    }
    return 0;
}

/* One reply line ("X...\n", at most size - 1 bytes) into buf, NUL-terminated; its length
 * (what came before EOF or an error, if no newline did). */
static size_t read_line(int s, char *buf, size_t size, int flags)
{
    size_t got = 0;
    while (got < size - 1) {
        ssize_t n = recv(s, buf + got, 1, flags);  /* byte by byte: never past the line */
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
        if (buf[got - 1] == '\n')
            break;
    }
    buf[got] = '\0';
    return got;
}

int main(int argc, char **argv)
{
    /* Killed by a signal = "success" to pbs_mom (run_pelog reads WEXITSTATUS only). */
    int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (oom >= 0) {
        (void)!write(oom, "-1000", 5);
        close(oom);
    }
    signal(SIGPIPE, SIG_IGN);
    for (int fd = 0; fd < 3; fd++)  /* fds 0-2 must exist to be sent */
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
            return 2;
    const char *base = argc > 0 ? strrchr(argv[0], '/') : NULL;
    const char *name = NULL;
    for (size_t i = 0; argc > 0 && i < sizeof names / sizeof names[0]; i++)
        if (strcmp(base != NULL ? base + 1 : argv[0], names[i]) == 0)
            name = names[i];
    if (name == NULL) {
        say("installed under a name that is not a hook's: ", argc > 0 ? argv[0] : "?");
        return 2;
    }
    int lost_is_fault = strncmp(name, "prologue", 8) == 0;
    if (strcmp(name, "prologue") == 0)
        kick();

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    strncpy(addr.sun_path, SOCKET_PATH, sizeof addr.sun_path - 1);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
        note(name, "not answering, running the Python hook", errno);
        return python_hook(name, argc, argv, 0);
    }
    struct ucred cred;
    socklen_t clen = sizeof cred;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 || cred.uid != 0) {
        note(name, "is not root's, running the Python hook", 0);
        return python_hook(name, argc, argv, 0);
    }
    int cwd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    size_t len = 0;
    char *buf = request(argc, argv, &len);
    if (cwd < 0 || buf == NULL || send_request(s, buf, len, cwd) != 0) {
        /* The request did not get through whole: the server did nothing with it. */
        note(name, "request not sent, running the Python hook", errno);
        return python_hook(name, argc, argv, 0);
    }
    /* A worker says "A\n" once it holds the request, before it does anything. No word
     * within ACK_TIMEOUT_MS (a daemon stopped, or stuck with our connection queued): give
     * up; the shutdown makes a worker's later "A" fail (EPIPE), so it does nothing. An
     * "A" that got in just before the shutdown: that worker runs, unheard: lost. */
    struct pollfd p = { .fd = s, .events = POLLIN };
    int ready;
    do
        ready = poll(&p, 1, ACK_TIMEOUT_MS);
    while (ready < 0 && errno == EINTR);
    if (ready == 0)
        shutdown(s, SHUT_RDWR);
    char reply[32];
    size_t got = read_line(s, reply, sizeof reply, ready == 0 ? MSG_DONTWAIT : 0);
    if (strcmp(reply, "A\n") == 0) {
        if (ready == 0) {
            note(name, "took the request too late to be heard (worker runs unheard)", 0);
            return python_hook(name, argc, argv, lost_is_fault);
        }
        got = read_line(s, reply, sizeof reply, 0);
    } else if (strcmp(reply, "F\n") != 0) {
        /* Closed, or nothing, before a worker took the request: nothing was done. */
        note(name, ready == 0 ? "took no request in time, running the Python hook"
                              : "closed before taking the request, running the Python hook",
             0);
        return python_hook(name, argc, argv, 0);
    }
    if (got >= 3 && reply[0] == 'R' && reply[got - 1] == '\n') {
        char *end;
        long code = strtol(reply + 1, &end, 10);
        if (end == reply + got - 1 && code >= 0 && code <= 255)
            return (int)code;
    }
    if (strcmp(reply, "F\n") == 0) {
        note(name, "declined the request, running the Python hook", 0);
        return python_hook(name, argc, argv, 0);
    }
    note(name, "connection broke before the answer (worker killed?)", 0);
    return python_hook(name, argc, argv, lost_is_fault);
}
