/* Guest-side MMIO read loop for benchmarks/vfio_user_qemu_bench.py.
 *
 * usage: mmio_read RESOURCE SECONDS EXPECT
 *   RESOURCE  /sys/bus/pci/devices/BDF/resource0 of an enabled device
 *   SECONDS   how long to read
 *   EXPECT    the 32-bit value offset 0 must read (edu: 0x010000ed)
 * Prints one JSON line: {"reads": N, "seconds": S, "per_second": R}.
 * Exit 1 on a wrong value (a read that did not reach the device), 2 on errors.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s RESOURCE SECONDS EXPECT\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[2]);
    uint32_t expect = (uint32_t)strtoul(argv[3], NULL, 0);
    int fd = open(argv[1], O_RDWR | O_SYNC);
    if (fd < 0) {
        perror(argv[1]);
        return 2;
    }
    volatile uint32_t *bar = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (bar == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    uint64_t reads = 0;
    double start = now(), end = start + seconds, t = start;
    while (t < end) {
        for (int i = 0; i < 100; i++) {
            uint32_t v = bar[0];
            if (v != expect) {
                fprintf(stderr, "read %#x, expected %#x\n", v, expect);
                return 1;
            }
        }
        reads += 100;
        t = now();
    }
    printf("{\"reads\": %llu, \"seconds\": %.3f, \"per_second\": %.1f}\n",
           (unsigned long long)reads, t - start, reads / (t - start));
    return 0;
}
