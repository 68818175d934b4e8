/*
 * pbs_chroot's job starter: Torque's $job_starter (mom_priv/config).
 *
 * pbs_mom execs it for every job, after the chroot and after dropping to the
 * job user, as  STARTER SHELL  (see ../../README.md, "no_new_privs").  It is
 * built twice from this file:
 *
 *   job_starter      on the host: passes through.  Jobs without an image keep
 *                    their setuid helpers (fusermount, ssh-keysign).
 *   job_starter-nnp  -DNO_NEW_PRIVS: bound over job_starter in every stage.
 *                    It sets PR_SET_NO_NEW_PRIVS (prctl(2)), so that no exec
 *                    in the job can raise privileges again: not a setuid
 *                    program of the image, and not one of the host's reached
 *                    through /proc/PID/root of a process outside the chroot
 *                    (which would load the image's ld.so, libc and PAM).
 *
 * Static, libc-only and tiny, so it runs in any image: one with no Python, no
 * dynamic loader, or a libc older than the kernel.  It reads no file, and of
 * the environment only PATH and SHELL, as below; it runs as the job's user and
 * grants nothing: the user's own text decides only what the user runs.
 *
 * pbs_mom execs it as  STARTER SHELL  for a job (TMomFinalizeChild), and as
 *  STARTER PROGRAM [ARG...]  for a TM task (start_process: pbsdsh, mpiexec),
 * where PROGRAM may be a bare name: it is looked up in PATH, as pbs_mom's
 * execvp(3) would.  A job's shell (one argument, equal to $SHELL, which
 * pbs_mom sets to it) is started as a login shell, "-NAME", as pbs_mom does
 * without a starter under its default $source_login_batch true; built with
 * -DLOGIN_SHELL=0 for a mom that sets it false.  ($SHELL is the user's own
 * text, but it only chooses argv[0] of the user's own program.)
 *
 * Both builds are installed execute-only (mode 0711): a process that execs a
 * file its user cannot read is not dumpable (execve(2), fs/exec.c
 * would_dump()), so no process of the same user can ptrace it in the moment
 * between the exec and the prctl below and make it exec a setuid program
 * before no_new_privs is set, or make it run anything while it waits for its
 * cgroup.  The exec of the job's program makes it dumpable again.
 *
 * A TM task waits for its cgroup.  pbs_mom forks a TM task outside the job's
 * process tree, and pbs_chroot's task adopter (../adopt.py) moves it into the
 * job's cgroup on that node, racing pbs_mom from the fork to the exec.  So that
 * no instruction of the user's program runs outside the job's cgroup (where
 * what it starts would escape the epilogue's kill and the accounting), a
 * process of a job on several cores or nodes (any copy of PBS_NP or
 * PBS_NUM_NODES in its environment above 1, or not a count: the jobs the
 * prologues start an adopter for) does not exec until /proc/self/cgroup puts
 * it in a cgroup of its PBS_JOBID (in_job_cgroup below).  The job's shell is
 * there already (the prologue moved it); a TM task is usually there too,
 * placed at its exec stop.  After AWAIT_PLACEMENT_MS without it (no adopter on
 * the node), or with no single PBS_JOBID, the process is refused: exit 125
 * and one line on its stderr.  Built with -DAWAIT_PLACEMENT_MS=0 for a node
 * with `cgroups = no` (pbs-chroot install does this), where no cgroup will
 * come.  Both builds are installed execute-only, so no process of the user's
 * can ptrace one while it waits (below).
 *
 * Exit codes, as a shell's: 126 not executable, 127 not found, 125 our own
 * failure (prctl, or the task never placed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#ifndef NO_NEW_PRIVS
#define NO_NEW_PRIVS 0
#endif
#ifndef LOGIN_SHELL
#define LOGIN_SHELL 1
#endif
#ifndef AWAIT_PLACEMENT_MS
#define AWAIT_PLACEMENT_MS 10000
#endif
#define STR_(x) #x
#define STR(x) STR_(x)
/* What `pbs-chroot check` reads to tell how this binary was built. */
__attribute__((used)) const char build_marker[] = "pbs-chroot-job-starter await_placement_ms=" STR(AWAIT_PLACEMENT_MS);

static void say(const char *a, const char *b, const char *c, const char *d)
{
    const char *parts[] = { "pbs-chroot job starter: ", a, b, c, d, "\n" };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if (parts[i] != NULL && write(2, parts[i], strlen(parts[i])) < 0)
            return;
}

extern char **environ;

/* What the environment says of the job: 1 if any copy of PBS_NP or
 * PBS_NUM_NODES is not a plain count of 1 or less (a user may add copies of a
 * variable, never remove pbs_mom's); *job: the one PBS_JOBID, NULL if there is
 * none, "" if there are two different ones or one with a '/'. */
static int several_cores_or_nodes(const char **job)
{
    int many = 0;
    *job = NULL;
    for (char **e = environ; *e != NULL; e++) {
        const char *v = NULL;
        if (strncmp(*e, "PBS_NP=", 7) == 0)
            v = *e + 7;
        else if (strncmp(*e, "PBS_NUM_NODES=", 14) == 0)
            v = *e + 14;
        else if (strncmp(*e, "PBS_JOBID=", 10) == 0) {
            const char *id = *e + 10;
            if (strchr(id, '/') != NULL || *id == '\0' || (*job != NULL && strcmp(*job, id) != 0))
                *job = "";
            else if (*job == NULL)
                *job = id;
            continue;
        }
        if (v == NULL)
            continue;
        size_t len = strspn(v, "0123456789");
        if (len == 0 || v[len] != '\0' || len > 6 || atol(v) > 1)
            many = 1;
    }
    return many;
}

/* Whether the text from c to end, split at sep, has a part equal to item: a
 * controller of a /proc/self/cgroup line (','), a component of its path ('/'). */
static int has_part(const char *c, const char *end, char sep, const char *item)
{
    size_t n = strlen(item);
    while (c < end) {
        const char *next = memchr(c, sep, (size_t)(end - c));
        const char *stop = next != NULL ? next : end;
        if ((size_t)(stop - c) == n && memcmp(c, item, n) == 0)
            return 1;
        c = stop + 1;
    }
    return 0;
}

/* 1 if the process is in a cgroup of job, 0 if not (yet), -1 if
 * /proc/self/cgroup can't be read.  Only the hierarchies a job's cgroup is
 * made in count, never a named one (name=systemd, which systemd may delegate
 * to the user): on cgroup v1 the lines of memory and cpuacct, both (pbs_chroot
 * moves a process into memory last; Torque's own cgroups have both), and on
 * a pure cgroup v2 the unified line ("0::"), where the kernel lets no user
 * move a process out of pbs_mom's cgroup.  A path component equal to job
 * counts: pbs_chroot's PARENT/JOBID, Torque's .../JOBID/... */
static int in_job_cgroup(const char *job)
{
    static char buf[65536];
    int fd = open("/proc/self/cgroup", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf - 1 && (n = read(fd, buf + len, sizeof buf - 1 - len)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            close(fd);
            return -1;
        }
        len += (size_t)n;
    }
    close(fd);
    if (len == sizeof buf - 1)
        return 0;  /* cut short: never judged on part of a line */
    buf[len] = '\0';
    int v1_seen = 0, v1_placed = 1, unified = 0;
    for (char *line = buf; *line != '\0';) {
        char *end = strchr(line, '\n');
        if (end == NULL)
            end = line + strlen(line);
        char *ctl = memchr(line, ':', (size_t)(end - line));
        char *path = ctl != NULL ? memchr(ctl + 1, ':', (size_t)(end - ctl - 1)) : NULL;
        if (path != NULL) {
            ctl++;
            if (has_part(ctl, path, ',', "memory") || has_part(ctl, path, ',', "cpuacct")) {
                v1_seen = 1;
                v1_placed &= has_part(path + 1, end, '/', job);
            } else if (ctl == path && line[0] == '0' && ctl == line + 2) {
                unified = has_part(path + 1, end, '/', job);
            }
        }
        line = *end != '\0' ? end + 1 : end;
    }
    return v1_seen ? v1_placed : unified;
}

/* Hold a process of a job on several cores or nodes until it is in its job's
 * cgroup (see the top of this file); 0 when it may run, else 125. */
static int await_placement(void)
{
    const char *job;
    if (AWAIT_PLACEMENT_MS <= 0 || !several_cores_or_nodes(&job))
        return 0;
    if (job == NULL || *job == '\0') {
        say("no single PBS_JOBID in the environment of a job on several cores or nodes: "
            "not run", NULL, NULL, NULL);
        return 125;
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    long pause_us = 200;
    for (;;) {
        int placed = in_job_cgroup(job);
        if (placed == 1)
            return 0;
        if (placed < 0) {
            say("job ", job, ": can't read /proc/self/cgroup: not run: ", strerror(errno));
            return 125;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        long waited = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (waited >= AWAIT_PLACEMENT_MS) {
            say("job ", job, ": not run: this process was not put in the job's cgroup in "
                "time (pbs_chroot's prologue or task adopter did not place it); tell your "
                "admin", NULL);
            return 125;
        }
        struct timespec pause = { 0, pause_us * 1000 };
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR)
            ;
        if (pause_us < 20000)
            pause_us *= 2;
    }
}

int main(int argc, char **argv)
{
    if (argc < 2 || argv[1][0] == '\0') {
        say("usage: job_starter PROGRAM [ARG...]", NULL, NULL, NULL);
        return 125;
    }
    if (NO_NEW_PRIVS) {
        /* Once set it is inherited by every child and survives execve(2):
         * setuid/setgid bits and file capabilities are ignored from now on. */
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1) {
            say("can't set no_new_privs: ", strerror(errno), NULL, NULL);
            return 125;
        }
    }
    if (await_placement() != 0)
        return 125;
    char *prog = argv[1];
    char **args = argv + 1;
    char login[4096];
    const char *shell = getenv("SHELL");
    if (LOGIN_SHELL && argc == 2 && shell != NULL && strcmp(shell, prog) == 0) {
        const char *slash = strrchr(prog, '/');
        const char *name = slash != NULL ? slash + 1 : prog;
        if (strlen(name) + 2 <= sizeof login) {
            login[0] = '-';
            strcpy(login + 1, name);
            args[0] = login;
        }
    }
    execvp(prog, args);
    int err = errno;
    say("can't run ", prog, ": ", strerror(err));
    return err == ENOENT || err == ENOTDIR ? 127 : 126;
}
