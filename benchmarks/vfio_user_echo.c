/*
 * vfio_user_echo: the baseline vfio-user server of pyvfio's benchmarks.
 *
 * It speaks just enough of the protocol (QEMU docs/interop/vfio-user.rst) for a
 * client to connect and time REGION_READ round trips, and does no device work:
 *   VERSION               -> same major/minor, max_msg_fds 8, max_data_xfer_size 1 MiB
 *   DEVICE_GET_INFO       -> PCI|RESET, 9 regions, 5 IRQ indexes
 *   DEVICE_GET_REGION_INFO-> regions 0..5 and 7: READ|WRITE, 4 KiB (config 256 B)
 *   DEVICE_GET_IRQ_INFO   -> count 0
 *   REGION_READ           -> `count` bytes of a constant pattern (0xed per byte)
 *   REGION_WRITE          -> the access header back
 *   DEVICE_RESET          -> empty reply
 *   anything else         -> error reply ENOSYS
 * Fds that arrive (DMA_MAP, SET_IRQS) are closed.  One connection at a time;
 * the server accepts the next one when a client goes.  SIGTERM ends it.
 *
 * Usage: vfio_user_echo SOCKET_PATH
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define HDR 16
#define MAX_XFER (1u << 20)
#define MAX_MSG (HDR + 16 + MAX_XFER)
#define MAX_FDS 8

enum { VERSION = 1, GET_INFO = 4, GET_REGION_INFO = 5, GET_IRQ_INFO = 7,
       REGION_READ = 9, REGION_WRITE = 10, RESET = 13 };

struct hdr {
    uint16_t msg_id;
    uint16_t cmd;
    uint32_t size;
    uint32_t flags;
    uint32_t error;
} __attribute__((packed));

static unsigned char in[MAX_MSG];
static unsigned char out[MAX_MSG];

/* Read exactly n bytes; the first read also collects (and closes) any fds. */
static int read_full(int fd, unsigned char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        char control[CMSG_SPACE(MAX_FDS * sizeof(int))];
        struct iovec iov = { buf + got, n - got };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                              .msg_control = control, .msg_controllen = sizeof(control) };
        ssize_t r = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int *fds = (int *)CMSG_DATA(c);
                size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < nfds; i++)
                    close(fds[i]);
            }
        }
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const unsigned char *buf, size_t n)
{
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

static void serve(int conn)
{
    memset(out + HDR + 16, 0xed, MAX_XFER);  /* the "register contents" */
    for (;;) {
        struct hdr h;
        if (read_full(conn, in, HDR))
            return;
        memcpy(&h, in, HDR);
        if (h.size < HDR || h.size > MAX_MSG)
            return;  /* a malformed stream cannot be resynchronised */
        size_t len = h.size - HDR;
        if (len && read_full(conn, in + HDR, len))
            return;
        unsigned char *payload = in + HDR;
        size_t reply_len = 0;  /* payload bytes of the reply */
        uint32_t err = 0;

        switch (h.cmd) {
        case VERSION: {
            static const char caps[] =
                "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}";
            if (len < 4) { err = EINVAL; break; }
            memcpy(out + HDR, payload, 4);  /* echo major and minor */
            memcpy(out + HDR + 4, caps, sizeof(caps));  /* with the NUL */
            reply_len = 4 + sizeof(caps);
            break;
        }
        case GET_INFO:
            put32(out + HDR, 16);
            put32(out + HDR + 4, (1u << 0) | (1u << 1));  /* RESET | PCI */
            put32(out + HDR + 8, 9);
            put32(out + HDR + 12, 5);
            reply_len = 16;
            break;
        case GET_REGION_INFO: {
            uint32_t index;
            if (len < 32) { err = EINVAL; break; }
            memcpy(&index, payload + 8, 4);
            uint64_t size = index <= 5 ? 4096 : index == 7 ? 256 : 0;
            put32(out + HDR, 32);
            put32(out + HDR + 4, size ? 3 : 0);  /* READ | WRITE */
            put32(out + HDR + 8, index);
            put32(out + HDR + 12, 0);
            put64(out + HDR + 16, size);
            put64(out + HDR + 24, 0);
            reply_len = 32;
            break;
        }
        case GET_IRQ_INFO:
            if (len < 16) { err = EINVAL; break; }
            memcpy(out + HDR, payload, 16);
            put32(out + HDR, 16);
            put32(out + HDR + 4, 1);  /* EVENTFD */
            put32(out + HDR + 12, 0);
            reply_len = 16;
            break;
        case REGION_READ: {
            uint32_t count;
            if (len < 16) { err = EINVAL; break; }
            memcpy(&count, payload + 12, 4);
            if (count > MAX_XFER) { err = EINVAL; break; }
            memcpy(out + HDR, payload, 16);
            reply_len = 16 + count;  /* the data is already in place */
            break;
        }
        case REGION_WRITE:
            if (len < 16) { err = EINVAL; break; }
            memcpy(out + HDR, payload, 16);
            reply_len = 16;
            break;
        case RESET:
            break;
        default:
            err = ENOSYS;
        }
        if (h.flags & 0x10)  /* no reply wanted */
            continue;
        struct hdr r = { h.msg_id, h.cmd, (uint32_t)(HDR + (err ? 0 : reply_len)),
                         err ? (1u | 0x20u) : 1u, err };
        memcpy(out, &r, HDR);
        if (write_full(conn, out, r.size))
            return;
        if (h.cmd != REGION_READ)  /* other replies overwrite the start of the data */
            memset(out + HDR + 16, 0xed, 256);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(argv[1]) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, argv[1]);
    int lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    unlink(argv[1]);
    if (lsock < 0 || bind(lsock, (struct sockaddr *)&addr, sizeof(addr)) || listen(lsock, 4)) {
        perror("vfio_user_echo: listen");
        return 1;
    }
    for (;;) {
        int conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR)
                continue;
            perror("vfio_user_echo: accept");
            return 1;
        }
        serve(conn);
        close(conn);
    }
}
