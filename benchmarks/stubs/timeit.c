/* timeit PROG [ARG...]: run PROG, then print "timeit WALL_NS USER_US SYS_US STATUS" on
 * stdout. Static, so the same binary times a task on the host and inside an image (it is
 * placed in the job user's home, which the stage binds). Exit status: PROG's, 125 if it
 * could not be started or waited for. */
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec t0, t1;
    struct rusage ru;
    int status;
    pid_t pid;

    if (argc < 2) {
        fputs("usage: timeit PROG [ARG...]\n", stderr);
        return 125;
    }
    fflush(stdout);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid = fork();
    if (pid < 0)
        return 125;
    if (pid == 0) {
        execv(argv[1], argv + 1);
        perror(argv[1]);
        _exit(127);
    }
    if (wait4(pid, &status, 0, &ru) < 0)
        return 125;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("timeit %lld %ld %ld %d\n",
           (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec),
           (long)ru.ru_utime.tv_sec * 1000000L + ru.ru_utime.tv_usec,
           (long)ru.ru_stime.tv_sec * 1000000L + ru.ru_stime.tv_usec, status);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 125;
}
