/* The C baseline for benchmarks/kernel_bench.py: the same syscalls pyvfio makes,
 * on the same device in the same guest run.
 *
 *   kernel_bench BDF GROUP SECONDS
 *
 * Opens the container and group, attaches type1v2, gets the device fd, then
 * times each operation for SECONDS and prints one JSON object:
 *   map_unmap  VFIO_IOMMU_MAP_DMA + VFIO_IOMMU_UNMAP_DMA of one 4 KiB memfd page
 *   pread      4-byte pread of edu's ID register through the device fd
 *   mmap       4-byte load of the ID register from the mmapped BAR0
 *   irq        edu raise (pwrite 0x60) -> MSI eventfd wakes (read) -> ack (pwrite 0x64)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "kernel_bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s BDF GROUP SECONDS\n", argv[0]);
		return 2;
	}
	const char *bdf = argv[1];
	double seconds = atof(argv[3]);
	char path[64];

	int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
	if (container < 0)
		die("open /dev/vfio/vfio");
	snprintf(path, sizeof(path), "/dev/vfio/%s", argv[2]);
	int group = open(path, O_RDWR | O_CLOEXEC);
	if (group < 0)
		die("open group");
	if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
		die("VFIO_GROUP_SET_CONTAINER");
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
		die("VFIO_SET_IOMMU");
	int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	if (device < 0)
		die("VFIO_GROUP_GET_DEVICE_FD");

	struct vfio_region_info bar0 = { .argsz = sizeof(bar0), .index = 0 };
	struct vfio_region_info cfg = { .argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &bar0) ||
	    ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &cfg))
		die("VFIO_DEVICE_GET_REGION_INFO");
	uint16_t cmd;
	if (pread(device, &cmd, 2, cfg.offset + 4) != 2)
		die("config read");
	cmd |= 0x6; /* memory + bus master */
	if (pwrite(device, &cmd, 2, cfg.offset + 4) != 2)
		die("config write");

	/* map + unmap */
	int memfd = memfd_create("bench", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, 4096))
		die("memfd");
	void *mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		die("mmap memfd");
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map), .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)mem, .iova = 0x100000, .size = 4096 };
	struct vfio_iommu_type1_dma_unmap unmap = {
		.argsz = sizeof(unmap), .iova = 0x100000, .size = 4096 };
	long n = 0;
	double t0 = now(), t;
	do {
		for (int i = 0; i < 64; i++) {
			if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map))
				die("VFIO_IOMMU_MAP_DMA");
			if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap))
				die("VFIO_IOMMU_UNMAP_DMA");
		}
		n += 64;
	} while ((t = now()) - t0 < seconds);
	double map_rate = n / (t - t0);

	/* pread */
	uint32_t v, sink = 0;
	n = 0;
	t0 = now();
	do {
		for (int i = 0; i < 256; i++) {
			if (pread(device, &v, 4, bar0.offset) != 4)
				die("pread");
			sink += v;
		}
		n += 256;
	} while ((t = now()) - t0 < seconds);
	double pread_rate = n / (t - t0);

	/* mmap */
	volatile uint32_t *regs = mmap(NULL, bar0.size, PROT_READ | PROT_WRITE, MAP_SHARED,
				       device, bar0.offset);
	if (regs == MAP_FAILED)
		die("mmap BAR0");
	n = 0;
	t0 = now();
	do {
		for (int i = 0; i < 256; i++)
			sink += regs[0];
		n += 256;
	} while ((t = now()) - t0 < seconds);
	double mmap_rate = n / (t - t0);

	/* interrupt round trip over MSI */
	int efd = eventfd(0, EFD_CLOEXEC);
	char buf[sizeof(struct vfio_irq_set) + sizeof(int)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)buf;
	set->argsz = sizeof(buf);
	set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->index = VFIO_PCI_MSI_IRQ_INDEX;
	set->start = 0;
	set->count = 1;
	memcpy(set->data, &efd, sizeof(int));
	if (ioctl(device, VFIO_DEVICE_SET_IRQS, set))
		die("VFIO_DEVICE_SET_IRQS");
	uint32_t raise = 0x40;
	uint64_t count;
	n = 0;
	t0 = now();
	do {
		for (int i = 0; i < 16; i++) {
			if (pwrite(device, &raise, 4, bar0.offset + 0x60) != 4)
				die("raise");
			struct pollfd p = { .fd = efd, .events = POLLIN };
			if (poll(&p, 1, 5000) != 1)
				die("no interrupt");
			if (read(efd, &count, 8) != 8)
				die("eventfd read");
			if (pwrite(device, &raise, 4, bar0.offset + 0x64) != 4)
				die("ack");
		}
		n += 16;
	} while ((t = now()) - t0 < seconds);
	double irq_rate = n / (t - t0);

	printf("{\"map_unmap\": %.1f, \"pread\": %.1f, \"mmap\": %.1f, \"irq\": %.1f, \"sink\": %u}\n",
	       map_rate, pread_rate, mmap_rate, irq_rate, sink);
	return 0;
}
