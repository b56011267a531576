// SPDX-License-Identifier: Apache-2.0
/*
 * vduse-daemon: the smallest VDUSE device the kernel test tier needs.
 *
 * It creates a virtio-blk device through VDUSE (drivers/vdpa/vdpa_user/vduse_dev.c)
 * so that `vdpa dev add ... mgmtdev vduse` can bind it to vhost_vdpa and tests get
 * a real /dev/vhost-vdpa-N. The device has no data path of its own: it only
 *   - answers the kernel's control requests read from /dev/vduse/<name>
 *     (VDUSE_GET_VQ_STATE, VDUSE_SET_STATUS, VDUSE_UPDATE_IOTLB) with
 *     VDUSE_REQ_RESULT_OK, counting each kind;
 *   - serves a line protocol on a unix socket so tests can look at the IOTLB
 *     the way a device would (VDUSE_IOTLB_GET_FD + mmap/pwrite).
 *
 * Socket protocol: one request line per connection, one answer line, then close.
 *   stats               -> ok updates=<n> set_status=<n> get_vq_state=<n> status=0x<s>
 *   map                 -> ok <count> [0x<start>-0x<last>:<perm>:0x<offset> ...]
 *                          (perm ro|wo|rw, or 0x<byte> for any other value the kernel stored)
 *   read <iova> <len>   -> ok <hex bytes>     (device reads memory: RO/RW entries, len <= 4096)
 *   write <iova> <hex>  -> ok <len>           (device writes memory: WO/RW entries, like DMA)
 *   poke <iova> <hex>   -> ok <len>           (like write, without the daemon's perm check: shows
 *                                              what the VDUSE_IOTLB_GET_FD fd itself allows)
 * Errors answer "err <reason>". Numbers accept 0x prefixes (strtoull base 0).
 *
 * Usage: vduse-daemon <device-name> <socket-path>
 * Returns once the device is created and set up (the parent exits 0), while a
 * forked child keeps serving: callers can run `vdpa dev add` right after.
 * Client mode, for shell scripts: vduse-daemon --ask <socket-path> <request line>
 * prints the answer and exits 0 if it starts with "ok".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vduse.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/*
 * 0: the kernel waits for each answer without a time limit (vduse_dev_msg_sync()), so a guest
 * slowed down by a loaded host never breaks the device; a daemon that stopped answering shows
 * as a step that never ends, which the tier's budget catches. (Kernel default: 30 s.)
 */
#define MSG_TIMEOUT_SECONDS "0"
#define MAX_IO 4096
#define MAX_LINE (2 * MAX_IO + 64)

static int dev_fd = -1;

/* Counters read by the socket thread while the main thread serves the kernel. */
static uint64_t n_update_iotlb, n_set_status, n_get_vq_state;
static uint8_t dev_status;

static void die(const char *what) {
  fprintf(stderr, "vduse-daemon: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void write_sysfs(const char *path, const char *value) {
  int fd = open(path, O_WRONLY);
  if (fd < 0) return; /* attribute absent on this kernel: keep the default */
  if (write(fd, value, strlen(value)) < 0)
    fprintf(stderr, "vduse-daemon: %s: %s\n", path, strerror(errno));
  close(fd);
}

/* VDUSE_CREATE_DEV on /dev/vduse/control, then VDUSE_VQ_SETUP on the new device. */
static void create_device(const char *name) {
  int ctl = open("/dev/vduse/control", O_RDWR);
  if (ctl < 0) die("open /dev/vduse/control");

  uint64_t version = VDUSE_API_VERSION;
  if (ioctl(ctl, VDUSE_SET_API_VERSION, &version)) die("VDUSE_SET_API_VERSION");

  struct virtio_blk_config blk = {.capacity = 2048 /* 512-byte sectors */};
  struct vduse_dev_config *cfg = calloc(1, sizeof(*cfg) + sizeof(blk));
  if (!cfg) die("calloc");
  snprintf(cfg->name, sizeof(cfg->name), "%s", name);
  cfg->device_id = VIRTIO_ID_BLOCK; /* vduse allows only block (allowed_device_id[]) */
  /* VIRTIO_F_ACCESS_PLATFORM is mandatory (features_is_valid()). */
  cfg->features = (1ULL << VIRTIO_F_VERSION_1) | (1ULL << VIRTIO_F_ACCESS_PLATFORM);
  cfg->vq_num = 1;
  cfg->vq_align = 4096; /* must be <= PAGE_SIZE (vduse_validate_config()) */
  cfg->config_size = sizeof(blk);
  memcpy(cfg->config, &blk, sizeof(blk));
  if (ioctl(ctl, VDUSE_CREATE_DEV, cfg)) die("VDUSE_CREATE_DEV");
  free(cfg);
  close(ctl);

  /* A stuck request would block the vhost writer for msg_timeout, then break the device. */
  char path[512];
  snprintf(path, sizeof(path), "/sys/class/vduse/%s/msg_timeout", name);
  write_sysfs(path, MSG_TIMEOUT_SECONDS);

  snprintf(path, sizeof(path), "/dev/vduse/%s", name);
  dev_fd = open(path, O_RDWR);
  if (dev_fd < 0) die(path);

  /* vdpa_dev_add() refuses the device until every vq has a max size (vduse_dev_is_ready()). */
  struct vduse_vq_config vq = {.index = 0, .max_size = 256};
  if (ioctl(dev_fd, VDUSE_VQ_SETUP, &vq)) die("VDUSE_VQ_SETUP");
}

/* Serve the kernel's requests (vduse_dev_msg_sync() waits for each answer). */
static void serve_kernel(void) {
  for (;;) {
    struct vduse_dev_request req;
    ssize_t n = read(dev_fd, &req, sizeof(req));
    if (n < 0 && errno == EINTR) continue;
    if (n != sizeof(req)) die("read /dev/vduse request");

    struct vduse_dev_response resp = {.request_id = req.request_id,
                                      .result = VDUSE_REQ_RESULT_OK};
    switch (req.type) {
    case VDUSE_GET_VQ_STATE:
      /* Nothing ever ran on the ring: report avail index 0. */
      resp.vq_state.index = req.vq_state.index;
      __atomic_add_fetch(&n_get_vq_state, 1, __ATOMIC_SEQ_CST);
      break;
    case VDUSE_SET_STATUS:
      __atomic_store_n(&dev_status, req.s.status, __ATOMIC_SEQ_CST);
      __atomic_add_fetch(&n_set_status, 1, __ATOMIC_SEQ_CST);
      break;
    case VDUSE_UPDATE_IOTLB:
      /* Sent by vduse_vdpa_set_map() for [0, ULLONG_MAX] after each table push.
       * Counted before answering, so the writer sees the count once its write returns. */
      __atomic_add_fetch(&n_update_iotlb, 1, __ATOMIC_SEQ_CST);
      break;
    default:
      resp.result = VDUSE_REQ_RESULT_FAILED;
    }
    if (write(dev_fd, &resp, sizeof(resp)) != sizeof(resp)) die("write /dev/vduse response");
  }
}

/* VDUSE_IOTLB_GET_FD: the first entry overlapping [start, last], with an fd on its backing file. */
static int iotlb_entry(uint64_t start, uint64_t last, struct vduse_iotlb_entry *e) {
  memset(e, 0, sizeof(*e));
  e->start = start;
  e->last = last;
  return ioctl(dev_fd, VDUSE_IOTLB_GET_FD, e); /* -1/EINVAL: nothing mapped there */
}

static const char *perm_name(uint8_t perm) {
  switch (perm) {
  case VDUSE_ACCESS_RO: return "ro";
  case VDUSE_ACCESS_WO: return "wo";
  case VDUSE_ACCESS_RW: return "rw";
  default: return "?";
  }
}

static int cmd_map(char *out, size_t cap) {
  size_t len = 0;
  unsigned count = 0;
  char entries[MAX_LINE] = "";
  uint64_t cur = 0;
  for (;;) {
    struct vduse_iotlb_entry e;
    int fd = iotlb_entry(cur, UINT64_MAX, &e);
    if (fd < 0) break;
    close(fd);
    count++;
    /* The kernel stores any perm byte (nobody validates it): show unknown ones as hex. */
    char perm[8];
    snprintf(perm, sizeof(perm), "%s", perm_name(e.perm));
    if (perm[0] == '?') snprintf(perm, sizeof(perm), "0x%x", e.perm);
    len += snprintf(entries + len, sizeof(entries) - len, " 0x%llx-0x%llx:%s:0x%llx",
                    (unsigned long long)e.start, (unsigned long long)e.last, perm,
                    (unsigned long long)e.offset);
    if (len >= sizeof(entries) || e.last == UINT64_MAX) break;
    cur = e.last + 1;
  }
  return snprintf(out, cap, "ok %u%s\n", count, entries);
}

/*
 * The fd from VDUSE_IOTLB_GET_FD is the owner's own file: receive_fd() gets
 * perm_to_file_flags() as fd flags, not as an access mode, so nothing stops a write
 * to an RO entry. Like a device behind an IOMMU, the daemon honours entry.perm itself.
 */

/* Device-side read: map the backing file and copy, entry by entry. */
static int cmd_read(uint64_t iova, uint64_t size, char *out, size_t cap) {
  if (size == 0 || size > MAX_IO) return snprintf(out, cap, "err length must be 1..%d\n", MAX_IO);
  size_t len = snprintf(out, cap, "ok ");
  long page = sysconf(_SC_PAGESIZE);
  while (size > 0) {
    struct vduse_iotlb_entry e;
    int fd = iotlb_entry(iova, iova, &e);
    if (fd < 0) return snprintf(out, cap, "err unmapped iova 0x%llx\n", (unsigned long long)iova);
    if (!(e.perm & VDUSE_ACCESS_RO)) {
      close(fd);
      return snprintf(out, cap, "err iova 0x%llx is write-only\n", (unsigned long long)iova);
    }
    uint64_t chunk = e.last - iova + 1;
    if (chunk > size || chunk == 0 /* whole 2^64 space */) chunk = size;
    uint64_t foff = e.offset + (iova - e.start);
    uint64_t aligned = foff & ~(uint64_t)(page - 1);
    size_t span = (size_t)(foff - aligned + chunk);
    void *p = mmap(NULL, span, PROT_READ, MAP_SHARED, fd, (off_t)aligned);
    int saved = errno;
    close(fd);
    if (p == MAP_FAILED)
      return snprintf(out, cap, "err mmap iova 0x%llx: %s\n", (unsigned long long)iova,
                      strerror(saved));
    const unsigned char *bytes = (const unsigned char *)p + (foff - aligned);
    for (uint64_t i = 0; i < chunk; i++) len += snprintf(out + len, cap - len, "%02x", bytes[i]);
    munmap(p, span);
    iova += chunk;
    size -= chunk;
  }
  return (int)(len + snprintf(out + len, cap - len, "\n"));
}

static int hex_nibble(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/*
 * Device-side write into WO/RW entries (pwrite on the backing file, like a DMA write).
 * With honour_perm 0 (poke) the entry's perm is ignored: whatever the fd allows happens.
 */
static int cmd_write(uint64_t iova, const char *hex, int honour_perm, char *out, size_t cap) {
  unsigned char data[MAX_IO];
  size_t n = strlen(hex);
  if (n == 0 || n % 2 || n / 2 > MAX_IO) return snprintf(out, cap, "err bad hex data\n");
  for (size_t i = 0; i < n / 2; i++) {
    int hi = hex_nibble(hex[2 * i]), lo = hex_nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return snprintf(out, cap, "err bad hex data\n");
    data[i] = (unsigned char)(hi << 4 | lo);
  }
  size_t done = 0;
  while (done < n / 2) {
    struct vduse_iotlb_entry e;
    int fd = iotlb_entry(iova, iova, &e);
    if (fd < 0) return snprintf(out, cap, "err unmapped iova 0x%llx\n", (unsigned long long)iova);
    if (honour_perm && !(e.perm & VDUSE_ACCESS_WO)) {
      close(fd);
      return snprintf(out, cap, "err iova 0x%llx is read-only\n", (unsigned long long)iova);
    }
    uint64_t chunk = e.last - iova + 1;
    if (chunk > n / 2 - done || chunk == 0) chunk = n / 2 - done;
    ssize_t w = pwrite(fd, data + done, chunk, (off_t)(e.offset + (iova - e.start)));
    int saved = errno;
    close(fd);
    if (w != (ssize_t)chunk)
      return snprintf(out, cap, "err write iova 0x%llx: %s\n", (unsigned long long)iova,
                      w < 0 ? strerror(saved) : "short write");
    done += chunk;
    iova += chunk;
  }
  return snprintf(out, cap, "ok %zu\n", done);
}

static void handle_client(int c) {
  /* A silent client must not stall the others for long. */
  struct timeval tv = {.tv_sec = 2};
  setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));

  char line[MAX_LINE];
  size_t len = 0;
  while (len < sizeof(line) - 1) {
    ssize_t r = read(c, line + len, sizeof(line) - 1 - len);
    if (r <= 0) break;
    len += (size_t)r;
    if (memchr(line, '\n', len)) break;
  }
  line[len] = '\0';
  line[strcspn(line, "\r\n")] = '\0';

  static char out[MAX_LINE];
  int n;
  char *args = line;
  char *cmd = strsep(&args, " ");
  if (!strcmp(cmd, "stats")) {
    n = snprintf(out, sizeof(out), "ok updates=%llu set_status=%llu get_vq_state=%llu status=0x%02x\n",
                 (unsigned long long)__atomic_load_n(&n_update_iotlb, __ATOMIC_SEQ_CST),
                 (unsigned long long)__atomic_load_n(&n_set_status, __ATOMIC_SEQ_CST),
                 (unsigned long long)__atomic_load_n(&n_get_vq_state, __ATOMIC_SEQ_CST),
                 __atomic_load_n(&dev_status, __ATOMIC_SEQ_CST));
  } else if (!strcmp(cmd, "map")) {
    n = cmd_map(out, sizeof(out));
  } else if (!strcmp(cmd, "read") || !strcmp(cmd, "write") || !strcmp(cmd, "poke")) {
    char *a = strsep(&args, " "), *b = strsep(&args, " ");
    if (!a || !b) {
      n = snprintf(out, sizeof(out), "err usage: %s <iova> <%s>\n", cmd,
                   cmd[0] == 'r' ? "len" : "hex");
    } else {
      uint64_t iova = strtoull(a, NULL, 0);
      n = cmd[0] == 'r' ? cmd_read(iova, strtoull(b, NULL, 0), out, sizeof(out))
                        : cmd_write(iova, b, cmd[0] == 'w', out, sizeof(out));
    }
  } else {
    n = snprintf(out, sizeof(out), "err unknown command\n");
  }
  if (n > (int)sizeof(out)) n = sizeof(out);
  if (write(c, out, (size_t)n) < 0) { /* client went away: nothing to do */ }
  close(c);
}

static void *serve_socket(void *arg) {
  int s = *(int *)arg;
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) {
      if (errno == EINTR) continue;
      die("accept");
    }
    handle_client(c);
  }
  return NULL;
}

static int ask(const char *path, const char *request) {
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path);
  if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof(addr))) die(path);
  dprintf(s, "%s\n", request);
  static char ans[MAX_LINE];
  size_t len = 0;
  ssize_t r;
  while (len < sizeof(ans) - 1 && (r = read(s, ans + len, sizeof(ans) - 1 - len)) > 0)
    len += (size_t)r;
  ans[len] = '\0';
  fputs(ans, stdout);
  return strncmp(ans, "ok", 2) ? 1 : 0;
}

int main(int argc, char **argv) {
  if (argc == 4 && !strcmp(argv[1], "--ask")) return ask(argv[2], argv[3]);
  if (argc != 3) {
    fprintf(stderr, "usage: %s <device-name> <socket-path> | --ask <socket-path> <request>\n",
            argv[0]);
    return 2;
  }
  create_device(argv[1]);

  static int s;
  s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) die("socket");
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", argv[2]);
  unlink(argv[2]);
  if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) || listen(s, 16)) die("bind/listen");

  /* Everything the kernel checks at `vdpa dev add` is in place: let the caller go on. */
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid > 0) {
    printf("vduse-daemon: device %s ready, pid %d, socket %s\n", argv[1], pid, argv[2]);
    return 0;
  }
  setsid();
  pthread_t t;
  if (pthread_create(&t, NULL, serve_socket, &s)) die("pthread_create");
  serve_kernel();
  return 0;
}
