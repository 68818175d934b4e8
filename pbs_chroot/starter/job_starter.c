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
 * The -nnp build is installed execute-only (mode 0711): a process that execs
 * a file its user cannot read is not dumpable (execve(2), fs/exec.c
 * would_dump()), so no process of the same user can ptrace it in the moment
 * between the exec and the prctl below and make it exec a setuid program
 * before no_new_privs is set.  The exec of the shell makes it dumpable again.
 *
 * Exit codes, as a shell's: 126 not executable, 127 not found, 125 our own
 * failure (prctl).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef NO_NEW_PRIVS
#define NO_NEW_PRIVS 0
#endif
#ifndef LOGIN_SHELL
#define LOGIN_SHELL 1
#endif

static void say(const char *a, const char *b, const char *c, const char *d)
{
    const char *parts[] = { "pbs-chroot job starter: ", a, b, c, d, "\n" };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if (parts[i] != NULL && write(2, parts[i], strlen(parts[i])) < 0)
            return;
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
