// SPDX-License-Identifier: Apache-2.0
/*
 * guest-smoke: proves the kernel tier itself (VM, modules, VDUSE device, vhost_vdpa)
 * with a plain C client, independently of the project's TypeScript code.
 *
 * Runs inside the test VM against /dev/vhost-vdpa-0 (or $VHOST_VDPA_DEV) and the
 * vduse-daemon socket ($VDUSE_CTL). Prints one "SMOKE: <check> ok|FAIL <detail>"
 * line per check and a "SMOKE: kernel ..." line per observed kernel answer;
 * exits 1 if any check failed.
 *
 * `guest-smoke --sync` is the check init.sh runs after every step: the device can
 * be opened again (no process of the step still holds it) and, on VDUSE (VDUSE_CTL
 * set), once a new owner pushes its (empty) table, the device is left with no mapping.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vhost.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MEM_SIZE (2u << 20)
#define IOVA 0x100000ull
#define PATTERN_OFF 0x1234u

static int failures;
static const char *dev_path, *ctl_path;

static void check(int ok, const char *name, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("SMOKE: %s %s ", name, ok ? "ok" : "FAIL");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  if (!ok) failures++;
}

/* One request to vduse-daemon: send a line, read the answer line. */
static int daemon_ask(const char *req, char *ans, size_t cap) {
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", ctl_path);
  if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof(addr))) {
    snprintf(ans, cap, "err connect: %s", strerror(errno));
    if (s >= 0) close(s);
    return -1;
  }
  dprintf(s, "%s\n", req);
  size_t len = 0;
  ssize_t r;
  while (len < cap - 1 && (r = read(s, ans + len, cap - 1 - len)) > 0) len += (size_t)r;
  ans[len] = '\0';
  ans[strcspn(ans, "\n")] = '\0';
  close(s);
  return strncmp(ans, "ok", 2) ? -1 : 0;
}

static long daemon_updates(void) {
  char ans[256];
  if (daemon_ask("stats", ans, sizeof(ans))) return -1;
  const char *p = strstr(ans, "updates=");
  return p ? strtol(p + 8, NULL, 10) : -1;
}

/* Write one struct vhost_msg_v2 (72 bytes); returns 0 or errno. */
static int send_msg(int fd, uint8_t type, uint64_t iova, uint64_t size, uint64_t uaddr,
                    uint8_t perm) {
  struct vhost_msg_v2 m = {.type = VHOST_IOTLB_MSG_V2};
  m.iotlb.iova = iova;
  m.iotlb.size = size;
  m.iotlb.uaddr = uaddr;
  m.iotlb.perm = perm;
  m.iotlb.type = type;
  ssize_t n = write(fd, &m, sizeof(m));
  if (n == (ssize_t)sizeof(m)) return 0;
  return n < 0 ? errno : EIO;
}

static const char *err_name(int e) {
  switch (e) {
  case 0: return "0";
  case EBUSY: return "EBUSY";
  case EFAULT: return "EFAULT";
  case EINVAL: return "EINVAL";
  case EPERM: return "EPERM";
  case EOPNOTSUPP: return "EOPNOTSUPP";
  case EEXIST: return "EEXIST";
  default: return strerror(e);
  }
}

#define IOCTL_ERRNO(fd, req, arg) (ioctl((fd), (req), (arg)) ? errno : 0)

static const uint64_t want_features =
    (1ull << VHOST_BACKEND_F_IOTLB_MSG_V2) | (1ull << VHOST_BACKEND_F_IOTLB_BATCH);

/*
 * Opens the device, becomes its owner and pushes an empty batch. VDUSE (6.12) has no
 * .reset_map: closing the previous owner (vhost_vdpa_release()) empties the vhost
 * table but never calls set_map, so the device keeps the last table it was given
 * until a new owner's BATCH_END (or unbatched message) pushes the current one.
 */
static int sync_device(char *ans, size_t cap) {
  int fd = open(dev_path, O_RDWR);
  if (fd < 0) {
    snprintf(ans, cap, "open: %s", strerror(errno));
    return -1;
  }
  int e = IOCTL_ERRNO(fd, VHOST_SET_OWNER, NULL);
  if (!e) e = IOCTL_ERRNO(fd, VHOST_SET_BACKEND_FEATURES, &want_features);
  if (!e) e = send_msg(fd, VHOST_IOTLB_BATCH_BEGIN, 0, 0, 0, 0);
  if (!e) e = send_msg(fd, VHOST_IOTLB_BATCH_END, 0, 0, 0, 0);
  close(fd);
  if (e) {
    snprintf(ans, cap, "owner/batch: %s", strerror(e));
    return -1;
  }
  /* Parents other than VDUSE (no VDUSE_CTL) cannot show their table: free is all we learn. */
  if (!*ctl_path) {
    snprintf(ans, cap, "ok free");
    return 0;
  }
  daemon_ask("map", ans, cap);
  return strcmp(ans, "ok 0") ? -1 : 0;
}

int main(int argc, char **argv) {
  dev_path = getenv("VHOST_VDPA_DEV") ? getenv("VHOST_VDPA_DEV") : "/dev/vhost-vdpa-0";
  ctl_path = getenv("VDUSE_CTL") ? getenv("VDUSE_CTL") : "/run/vduse-daemon.sock";
  setvbuf(stdout, NULL, _IOLBF, 0);
  char ans[16384];

  if (argc == 2 && !strcmp(argv[1], "--sync")) {
    int r = sync_device(ans, sizeof(ans));
    printf("%s\n", ans);
    return r ? 1 : 0;
  }

  int fd = open(dev_path, O_RDWR);
  check(fd >= 0, "open", "%s: %s", dev_path, fd >= 0 ? "0" : strerror(errno));
  if (fd < 0) return 1;

  /* vhost_vdpa_open(): one opener at a time. */
  int fd2 = open(dev_path, O_RDWR);
  int e = fd2 < 0 ? errno : 0;
  check(fd2 < 0 && e == EBUSY, "second-open", "errno %s", err_name(e));
  if (fd2 >= 0) close(fd2);

  /* vhost_chr_write_iter() before SET_OWNER: the dev has no mm yet. */
  e = send_msg(fd, VHOST_IOTLB_UPDATE, IOVA, 4096, 0, VHOST_ACCESS_RW);
  printf("SMOKE: kernel write-before-owner errno %s\n", err_name(e));
  check(e != 0, "write-before-owner", "errno %s", err_name(e));

  e = IOCTL_ERRNO(fd, VHOST_SET_OWNER, NULL);
  check(e == 0, "set-owner", "errno %s", err_name(e));
  e = IOCTL_ERRNO(fd, VHOST_SET_OWNER, NULL);
  check(e == EBUSY, "second-set-owner", "errno %s", err_name(e));

  uint64_t features = 0;
  e = IOCTL_ERRNO(fd, VHOST_GET_BACKEND_FEATURES, &features);
  printf("SMOKE: kernel backend-features 0x%llx\n", (unsigned long long)features);
  check(e == 0 && (features & want_features) == want_features, "get-backend-features", "0x%llx errno %s",
        (unsigned long long)features, err_name(e));
  uint64_t unknown = 1ull << 63;
  e = IOCTL_ERRNO(fd, VHOST_SET_BACKEND_FEATURES, &unknown);
  check(e == EOPNOTSUPP, "set-unknown-backend-feature", "errno %s", err_name(e));
  e = IOCTL_ERRNO(fd, VHOST_SET_BACKEND_FEATURES, &want_features);
  check(e == 0, "set-backend-features", "0x%llx errno %s", (unsigned long long)want_features,
        err_name(e));

  struct vhost_vdpa_iova_range range = {0};
  e = IOCTL_ERRNO(fd, VHOST_VDPA_GET_IOVA_RANGE, &range);
  printf("SMOKE: kernel iova-range 0x%llx-0x%llx\n", (unsigned long long)range.first,
         (unsigned long long)range.last);
  check(e == 0 && range.first <= IOVA && range.last >= IOVA + MEM_SIZE - 1, "get-iova-range",
        "0x%llx-0x%llx errno %s", (unsigned long long)range.first,
        (unsigned long long)range.last, err_name(e));

  uint32_t device_id = 0;
  e = IOCTL_ERRNO(fd, VHOST_VDPA_GET_DEVICE_ID, &device_id);
  check(e == 0 && device_id == 2, "get-device-id", "%u errno %s", device_id, err_name(e));
  unsigned int as_num = 0;
  e = IOCTL_ERRNO(fd, VHOST_VDPA_GET_AS_NUM, &as_num);
  check(e == 0 && as_num >= 1, "get-as-num", "%u errno %s", as_num, err_name(e));
  uint32_t vqs = 0, groups = 0;
  IOCTL_ERRNO(fd, VHOST_VDPA_GET_VQS_COUNT, &vqs);
  IOCTL_ERRNO(fd, VHOST_VDPA_GET_GROUP_NUM, &groups);
  printf("SMOKE: kernel device-id %u as-num %u vqs %u groups %u\n", device_id, as_num, vqs, groups);

  /* VA-mode parents (VDUSE) map only MAP_SHARED file-backed memory (vhost_vdpa_va_map()). */
  int mfd = memfd_create("smoke-guest-mem", MFD_CLOEXEC);
  if (mfd < 0 || ftruncate(mfd, MEM_SIZE)) {
    check(0, "memfd", "%s", strerror(errno));
    return 1;
  }
  unsigned char *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
  if (mem == MAP_FAILED) {
    check(0, "mmap", "%s", strerror(errno));
    return 1;
  }
  static const char pattern[] = "vdpa-mapd kernel tier pattern!!";
  memcpy(mem + PATTERN_OFF, pattern, sizeof(pattern));

  /* BATCH_BEGIN..BATCH_END: set_map (one VDUSE_UPDATE_IOTLB) runs once, at END. */
  long before = daemon_updates();
  int e1 = send_msg(fd, VHOST_IOTLB_BATCH_BEGIN, 0, 0, 0, 0);
  int e2 = send_msg(fd, VHOST_IOTLB_UPDATE, IOVA, MEM_SIZE, (uint64_t)(uintptr_t)mem,
                    VHOST_ACCESS_RW);
  long inside = daemon_updates();
  int e3 = send_msg(fd, VHOST_IOTLB_BATCH_END, 0, 0, 0, 0);
  long after = daemon_updates();
  check(!e1 && !e2 && !e3, "batch-update", "errnos %s %s %s", err_name(e1), err_name(e2),
        err_name(e3));
  check(before >= 0 && inside == before && after == before + 1, "one-update-per-batch",
        "updates before %ld inside %ld after %ld", before, inside, after);

  daemon_ask("map", ans, sizeof(ans));
  check(strstr(ans, "ok 1 0x100000-0x2fffff:rw:0x0") != NULL, "device-map", "%s", ans);

  char req[128], hex[2 * sizeof(pattern) + 1];
  for (size_t i = 0; i < sizeof(pattern); i++) sprintf(hex + 2 * i, "%02x", (unsigned char)pattern[i]);
  snprintf(req, sizeof(req), "read 0x%llx %zu", IOVA + PATTERN_OFF, sizeof(pattern));
  daemon_ask(req, ans, sizeof(ans));
  check(strncmp(ans, "ok ", 3) == 0 && strcmp(ans + 3, hex) == 0, "device-reads-memory", "%s", ans);

  /* The other direction: a device write lands in the owner's shared memory. */
  snprintf(req, sizeof(req), "write 0x%llx c0ffee", IOVA + 0x2000);
  daemon_ask(req, ans, sizeof(ans));
  check(strcmp(ans, "ok 3") == 0 && mem[0x2000] == 0xc0 && mem[0x2001] == 0xff && mem[0x2002] == 0xee,
        "device-writes-memory", "%s -> %02x%02x%02x", ans, mem[0x2000], mem[0x2001], mem[0x2002]);

  /* Outside a batch every message is its own set_map. */
  before = daemon_updates();
  e = send_msg(fd, VHOST_IOTLB_UPDATE, IOVA + MEM_SIZE, 4096, (uint64_t)(uintptr_t)mem,
               VHOST_ACCESS_RO);
  check(e == 0 && daemon_updates() == before + 1, "unbatched-update", "errno %s", err_name(e));
  e = send_msg(fd, VHOST_IOTLB_UPDATE, IOVA, 4096, (uint64_t)(uintptr_t)mem, VHOST_ACCESS_RW);
  printf("SMOKE: kernel overlapping-update errno %s\n", err_name(e));
  check(e == EFAULT, "overlapping-update", "errno %s", err_name(e));
  e = send_msg(fd, VHOST_IOTLB_UPDATE, IOVA + 4 * MEM_SIZE, 0, (uint64_t)(uintptr_t)mem,
               VHOST_ACCESS_RW);
  printf("SMOKE: kernel zero-size-update errno %s\n", err_name(e));
  check(e == EINVAL, "zero-size-update", "errno %s", err_name(e));
  snprintf(req, sizeof(req), "write 0x%llx 00", IOVA + MEM_SIZE);
  daemon_ask(req, ans, sizeof(ans));
  check(strncmp(ans, "err", 3) == 0, "device-cannot-write-ro", "%s", ans);
  before = daemon_updates();
  e = send_msg(fd, VHOST_IOTLB_INVALIDATE, IOVA + MEM_SIZE, 4096, 0, 0);
  check(e == 0 && daemon_updates() == before + 1, "unbatched-invalidate", "errno %s", err_name(e));
  daemon_ask("map", ans, sizeof(ans));
  check(strncmp(ans, "ok 1 ", 5) == 0, "device-map-after-invalidate", "%s", ans);

  /* Closing the owner's fd empties the vhost table; the device is not told (see sync_device()). */
  before = daemon_updates();
  close(fd);
  daemon_ask("map", ans, sizeof(ans));
  printf("SMOKE: kernel after-close device-updates +%ld device-map '%s'\n", daemon_updates() - before,
         ans);

  /* A fresh owner has no address space until its first UPDATE or BATCH_BEGIN
   * (vhost_vdpa_find_alloc_as()): what does an INVALIDATE answer then? */
  fd = open(dev_path, O_RDWR);
  check(fd >= 0, "reopen", "%s", fd >= 0 ? "0" : strerror(errno));
  if (fd >= 0) {
    ioctl(fd, VHOST_SET_OWNER, NULL);
    ioctl(fd, VHOST_SET_BACKEND_FEATURES, &want_features);
    e = send_msg(fd, VHOST_IOTLB_INVALIDATE, 0, 4096, 0, 0);
    printf("SMOKE: kernel invalidate-on-fresh-owner errno %s\n", err_name(e));
    close(fd);
  }
  before = daemon_updates();
  int r = sync_device(ans, sizeof(ans));
  check(r == 0 && daemon_updates() == before + 1, "empty-batch-clears-device", "%s", ans);

  munmap(mem, MEM_SIZE);
  close(mfd);

  printf("SMOKE: %s (%d failed)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
