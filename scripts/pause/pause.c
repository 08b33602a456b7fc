/*
 * Pod sandbox process for mnist-mlops' locally built pause image.
 *
 * The runtime starts this as PID 1 of the pod so the pod's namespaces outlive its app containers.
 * PID 1 gets no default signal actions, so stopping needs explicit SIGINT/SIGTERM handlers; with a
 * shared PID namespace orphans are re-parented here and would linger as zombies unless reaped.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signo) {
    (void)signo;
    _exit(EXIT_SUCCESS);
}

static void reap(int signo) {
    (void)signo;
    /* waitpid may clobber errno, which the interrupted code could still be reading. */
    int kept = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = kept;
}

static int install(int signo, void (*handler)(int), int flags) {
    struct sigaction action = {0};
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    return sigaction(signo, &action, NULL);
}

int main(void) {
    if (install(SIGINT, stop, 0) != 0 || install(SIGTERM, stop, 0) != 0 ||
        install(SIGCHLD, reap, SA_NOCLDSTOP | SA_RESTART) != 0) {
        return EXIT_FAILURE;
    }
    for (;;) {
        pause();
    }
}
