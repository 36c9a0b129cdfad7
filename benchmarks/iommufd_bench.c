/* The C baseline for benchmarks/iommufd_bench.py: 4 KiB DMA map+unmap pairs
 * per second with the same system calls pyvfio makes, on the same device in
 * the same guest run.
 *
 *   iommufd_bench iommufd BDF SECONDS   open /dev/iommu and the device cdev,
 *                                       VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC,
 *                                       VFIO_DEVICE_ATTACH_IOMMUFD_PT, then time
 *                                       IOMMU_IOAS_MAP (fixed IOVA) + IOMMU_IOAS_UNMAP
 *   iommufd_bench type1 BDF SECONDS     container + group, type1v2, then time
 *                                       VFIO_IOMMU_MAP_DMA + VFIO_IOMMU_UNMAP_DMA
 *
 * Prints {"map_unmap": pairs_per_second}.  The iommufd structs are spelled
 * out here (from include/uapi/linux/iommufd.h and vfio.h of 6.12) because the
 * build machine's linux-libc-dev (6.1) has neither iommufd.h nor the cdev ioctls.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define IOMMUFD_TYPE ';'
#define IOMMU_IOAS_ALLOC _IO(IOMMUFD_TYPE, 0x81)
#define IOMMU_IOAS_MAP _IO(IOMMUFD_TYPE, 0x85)
#define IOMMU_IOAS_UNMAP _IO(IOMMUFD_TYPE, 0x86)
#define IOMMU_IOAS_MAP_FIXED_IOVA (1 << 0)
#define IOMMU_IOAS_MAP_WRITEABLE (1 << 1)
#define IOMMU_IOAS_MAP_READABLE (1 << 2)
#define BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
#define ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)

struct iommu_ioas_alloc { uint32_t size, flags, out_ioas_id; };
struct iommu_ioas_map {
	uint32_t size, flags, ioas_id, __reserved;
	uint64_t user_va, length, iova;
};
struct iommu_ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };
struct bind_iommufd { uint32_t argsz, flags; int32_t iommufd; uint32_t out_devid; };
struct attach_pt { uint32_t argsz, flags, pt_id; };

#define IOVA 0x100000ULL
#define SIZE 4096ULL

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "iommufd_bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void *dma_page(void)
{
	int memfd = memfd_create("iommufd-bench", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, SIZE))
		die("memfd");
	void *p = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

static double run_iommufd(const char *bdf, double seconds)
{
	char path[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vfio-dev", bdf);
	DIR *dir = opendir(path);
	if (!dir)
		die("opendir vfio-dev (no device cdev)");
	struct dirent *e;
	char cdev[300] = "";
	while ((e = readdir(dir)))
		if (!strncmp(e->d_name, "vfio", 4))
			snprintf(cdev, sizeof(cdev), "/dev/vfio/devices/%s", e->d_name);
	closedir(dir);

	int iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	if (iommufd < 0)
		die("open /dev/iommu");
	int device = open(cdev, O_RDWR | O_CLOEXEC);
	if (device < 0)
		die("open cdev");
	struct bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = iommufd };
	if (ioctl(device, BIND_IOMMUFD, &bind))
		die("VFIO_DEVICE_BIND_IOMMUFD");
	struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc))
		die("IOMMU_IOAS_ALLOC");
	struct attach_pt attach = { .argsz = sizeof(attach), .pt_id = alloc.out_ioas_id };
	if (ioctl(device, ATTACH_IOMMUFD_PT, &attach))
		die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");

	void *page = dma_page();
	struct iommu_ioas_map map = {
		.size = sizeof(map), .ioas_id = alloc.out_ioas_id,
		.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
			 IOMMU_IOAS_MAP_WRITEABLE,
		.user_va = (uintptr_t)page, .length = SIZE, .iova = IOVA,
	};
	struct iommu_ioas_unmap unmap = {
		.size = sizeof(unmap), .ioas_id = alloc.out_ioas_id, .iova = IOVA, .length = SIZE,
	};
	long n = 0;
	double t0 = now(), t;
	do {
		for (int i = 0; i < 64; i++) {
			map.iova = IOVA;
			if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
				die("IOMMU_IOAS_MAP");
			unmap.length = SIZE;
			if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap))
				die("IOMMU_IOAS_UNMAP");
		}
		n += 64;
		t = now();
	} while (t - t0 < seconds);
	close(device);
	close(iommufd);
	return n / (t - t0);
}

static double run_type1(const char *bdf, double seconds)
{
	char path[256], link[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	ssize_t len = readlink(path, link, sizeof(link) - 1);
	if (len < 0)
		die("readlink iommu_group");
	link[len] = 0;
	snprintf(path, sizeof(path), "/dev/vfio/%s", strrchr(link, '/') + 1);

	int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
	if (container < 0)
		die("open /dev/vfio/vfio");
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

	void *page = dma_page();
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)page, .iova = IOVA, .size = SIZE,
	};
	struct vfio_iommu_type1_dma_unmap unmap = { .argsz = sizeof(unmap), .iova = IOVA, .size = SIZE };
	long n = 0;
	double t0 = now(), t;
	do {
		for (int i = 0; i < 64; i++) {
			if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map))
				die("VFIO_IOMMU_MAP_DMA");
			unmap.size = SIZE;
			if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap))
				die("VFIO_IOMMU_UNMAP_DMA");
		}
		n += 64;
		t = now();
	} while (t - t0 < seconds);
	close(device);
	close(group);
	close(container);
	return n / (t - t0);
}

int main(int argc, char **argv)
{
	if (argc != 4 || (strcmp(argv[1], "iommufd") && strcmp(argv[1], "type1"))) {
		fprintf(stderr, "usage: %s iommufd|type1 BDF SECONDS\n", argv[0]);
		return 2;
	}
	double seconds = atof(argv[3]);
	double rate = !strcmp(argv[1], "iommufd") ? run_iommufd(argv[2], seconds)
						   : run_type1(argv[2], seconds);
	printf("{\"map_unmap\": %.1f}\n", rate);
	return 0;
}
