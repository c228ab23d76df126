/* fairgpu-exec: the entrypoint of every docker and podman container the agent starts.

   fairgpu-exec [-s] [-e FILE] -- PROGRAM [ARG...]

   The agent bind-mounts it read-only into the container and makes it the container's
   --entrypoint, so it runs inside the job's image, as the job's uid with no capabilities, and
   needs nothing of the image: no shell, no libc (it is built static). In order, it
   1. with -e, adds the variables of FILE to its environment, replacing any of the same name:
      NAME=value entries, each ended by a NUL byte, on a memory filesystem mounted read-only
      (the job's own variables and secret, which the agent keeps off the runtime's disk:
      agents/containerenv.py);
   2. with -s, sets no_new_privs and enters a Landlock domain scoping abstract unix sockets and
      signals (ABI 6, Linux 6.12): the job can then neither connect to an abstract unix socket
      nor signal a process outside its container. The agent passes -s under strict isolation
      where the kernel scopes, as its sandbox scopes its other tasks; when it cannot be done
      here the task fails rather than run unscoped;
   3. execs PROGRAM, found in PATH as docker finds it: the image's ENTRYPOINT followed by the
      job's command or the image's CMD, which the agent read from the image
      (agents/imagelaunch.py).
   A step that fails prints one line on stderr and exits 126 (127: PROGRAM not found). */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* linux/landlock.h, spelled out so that the build needs no kernel headers of a given age; the
   numbers are the same on every architecture. */
#define LANDLOCK_CREATE_RULESET_NR 444
#define LANDLOCK_RESTRICT_SELF_NR 446
#define LANDLOCK_CREATE_RULESET_VERSION 1U
#define LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET 1ULL
#define LANDLOCK_SCOPE_SIGNAL 2ULL
#define LANDLOCK_SCOPE_ABI 6

/* Far above what a task may carry (protocol/limits.py): a bound on what is read, not a limit. */
#define MAX_ENV_FILE_BYTES (16L << 20)

struct ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

static int fail(int status, const char *step, const char *detail) {
    dprintf(2, "fairgpu-exec: %s: %s\n", step, detail);
    return status;
}

/* Adds FILE's entries to the environment; -1 with errno set when it cannot. The buffer is
   never freed: putenv keeps pointers into it until the exec. */
static int load_variables(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return -1;
    struct stat info;
    if (fstat(fd, &info) != 0) goto fail_closed;
    if (!S_ISREG(info.st_mode) || info.st_size > MAX_ENV_FILE_BYTES) {
        errno = EINVAL;
        goto fail_closed;
    }
    size_t size = (size_t)info.st_size, got = 0;
    char *buffer = malloc(size + 1);
    if (buffer == NULL) goto fail_closed;
    while (got < size) {
        ssize_t n = read(fd, buffer + got, size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) goto fail_closed;
        if (n == 0) break;
        got += (size_t)n;
    }
    close(fd);
    buffer[got] = '\0';
    for (char *entry = buffer; entry < buffer + got; entry += strlen(entry) + 1) {
        char *equals = strchr(entry, '=');
        if (equals == NULL || equals == entry) {
            errno = EINVAL;
            return -1;
        }
        if (putenv(entry) != 0) return -1;
    }
    return 0;
fail_closed:;
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

/* no_new_privs (Landlock needs it without CAP_SYS_ADMIN), then a domain with no rule on
   files or ports that scopes abstract unix sockets and signals. NULL, or the failed step. */
static const char *scope(void) {
    long abi = syscall(LANDLOCK_CREATE_RULESET_NR, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    if (abi < 0) return "landlock_create_ruleset(VERSION)";
    if (abi < LANDLOCK_SCOPE_ABI) {
        errno = EOPNOTSUPP;
        return "Landlock ABI 6 (scoping)";
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return "prctl(PR_SET_NO_NEW_PRIVS)";
    struct ruleset_attr attr = {
        .scoped = LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL,
    };
    long ruleset = syscall(LANDLOCK_CREATE_RULESET_NR, &attr, sizeof attr, 0);
    if (ruleset < 0) return "landlock_create_ruleset";
    long restricted = syscall(LANDLOCK_RESTRICT_SELF_NR, (int)ruleset, 0);
    int saved = errno;
    close((int)ruleset);
    errno = saved;
    return restricted == 0 ? NULL : "landlock_restrict_self";
}

int main(int argc, char **argv) {
    const char *usage = "fairgpu-exec [-s] [-e FILE] -- PROGRAM [ARG...]";
    const char *variables = NULL;
    int scoped = 0, i = 1;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (strcmp(argv[i], "-s") == 0) {
            scoped = 1;
        } else if (strcmp(argv[i], "-e") == 0 && i + 1 < argc) {
            variables = argv[++i];
        } else {
            return fail(126, "usage", usage);
        }
    }
    if (i + 1 >= argc) return fail(126, "usage", usage);
    char **program = argv + i + 1;
    if (variables != NULL && load_variables(variables) != 0) {
        return fail(126, "reading the job's variables", strerror(errno));
    }
    if (scoped) {
        const char *step = scope();
        if (step != NULL) {
            dprintf(2, "fairgpu-exec: scoping abstract sockets and signals: %s: %s\n", step,
                    strerror(errno));
            return 126;
        }
    }
    execvp(program[0], program);
    int error = errno;
    dprintf(2, "fairgpu-exec: cannot run %s: %s\n", program[0], strerror(error));
    return error == ENOENT ? 127 : 126;
}
