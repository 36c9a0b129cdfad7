/*
 * vfio_user_client: the baseline vfio-user client of pyvfio's benchmarks.
 *
 * Connects to a vfio-user server, negotiates VERSION (0.1, as libvfio-user),
 * then times ITERATIONS round trips of one 4-byte VFIO_USER_REGION_READ each
 * (by default region 0, offset 0) and prints one JSON line:
 *   {"iterations": N, "seconds": S, "rate": N/S, "value": first value read}
 * Every reply is checked (message id, command, reply type, no error, size), so a
 * fast wrong server does not look like a fast server.
 *
 * Usage: vfio_user_client SOCKET_PATH ITERATIONS [REGION [OFFSET]]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HDR 16

struct hdr {
    uint16_t msg_id;
    uint16_t cmd;
    uint32_t size;
    uint32_t flags;
    uint32_t error;
} __attribute__((packed));

struct region_access {
    uint64_t offset;
    uint32_t region;
    uint32_t count;
} __attribute__((packed));

static void die(const char *what)
{
    fprintf(stderr, "vfio_user_client: %s: %s\n", what, errno ? strerror(errno) : "bad reply");
    exit(1);
}

static void read_full(int fd, void *buf, size_t n)
{
    unsigned char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = ECONNRESET;
            die("read");
        }
        p += r;
        n -= (size_t)r;
    }
}

static void write_full(int fd, const void *buf, size_t n)
{
    const unsigned char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("write");
        p += w;
        n -= (size_t)w;
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: %s SOCKET_PATH ITERATIONS [REGION [OFFSET]]\n", argv[0]);
        return 2;
    }
    long iterations = strtol(argv[2], NULL, 0);
    uint32_t region = argc > 3 ? (uint32_t)strtoul(argv[3], NULL, 0) : 0;
    uint64_t offset = argc > 4 ? strtoull(argv[4], NULL, 0) : 0;

    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(argv[1]) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, argv[1]);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof(addr)))
        die("connect");

    /* VERSION: header, major 0, minor 1, NUL-terminated JSON capabilities. */
    static const char caps[] = "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}";
    unsigned char vmsg[HDR + 4 + sizeof(caps)];
    struct hdr h = { 0, 1, sizeof(vmsg), 0, 0 };
    uint16_t version[2] = { 0, 1 };
    memcpy(vmsg, &h, HDR);
    memcpy(vmsg + HDR, version, 4);
    memcpy(vmsg + HDR + 4, caps, sizeof(caps));
    write_full(sock, vmsg, sizeof(vmsg));
    struct hdr reply;
    read_full(sock, &reply, HDR);
    errno = 0;
    if (reply.cmd != 1 || (reply.flags & 0xf) != 1 || (reply.flags & 0x20) ||
        reply.size < HDR + 4 || reply.size > 65536)
        die("VERSION");
    unsigned char *vreply = malloc(reply.size - HDR);
    read_full(sock, vreply, reply.size - HDR);
    free(vreply);

    /* The round trip: a 32-byte request, a 36-byte reply. */
    struct {
        struct hdr h;
        struct region_access a;
    } __attribute__((packed)) req = { { 0, 9, sizeof(req), 0, 0 }, { offset, region, 4 } };
    struct {
        struct hdr h;
        struct region_access a;
        uint32_t value;
    } __attribute__((packed)) rep;
    uint32_t first = 0;
    double start = 0;
    long warmup = iterations / 10 + 1;
    for (long i = -warmup; i < iterations; i++) {
        if (i == 0)
            start = now();
        req.h.msg_id = (uint16_t)i;
        write_full(sock, &req, sizeof(req));
        read_full(sock, &rep, sizeof(rep));
        if (rep.h.msg_id != req.h.msg_id || rep.h.cmd != 9 || rep.h.flags != 1 ||
            rep.h.size != sizeof(rep) || rep.a.count != 4) {
            errno = rep.h.error;
            die("REGION_READ");
        }
        if (i == -warmup)
            first = rep.value;
    }
    double seconds = now() - start;
    printf("{\"iterations\": %ld, \"seconds\": %.6f, \"rate\": %.1f, \"value\": %u}\n",
           iterations, seconds, (double)iterations / seconds, first);
    close(sock);
    return 0;
}
