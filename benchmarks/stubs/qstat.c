/* The benchmark's stand-in for Torque's qstat: `qstat -f -x ID` prints JOBS_DIR/ID.xml,
 * fixture-shaped XML written by the harness (tests/fakes.qstat_xml). Compiled static at
 * run time with -DJOBS_DIR="..." so that its own cost (~0.2 ms) stays out of the hooks'
 * figures. Exit 153 for an unknown job, as qstat does; 2 for a bad command line. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    char path[4096], buf[65536];
    ssize_t n;
    int fd;

    if (argc != 4 || strcmp(argv[1], "-f") || strcmp(argv[2], "-x") || strchr(argv[3], '/')) {
        fputs("usage: qstat -f -x JOBID (benchmark stub)\n", stderr);
        return 2;
    }
    if (snprintf(path, sizeof path, "%s/%s.xml", JOBS_DIR, argv[3]) >= (int)sizeof path)
        return 2;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "qstat: Unknown Job Id %s\n", argv[3]);
        return 153;
    }
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        char *p = buf;
        while (n > 0) {
            ssize_t w = write(1, p, (size_t)n);
            if (w < 0)
                return 1;
            p += w;
            n -= w;
        }
    }
    return n < 0;
}
