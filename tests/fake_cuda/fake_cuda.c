/*
 * A stand-in for the CUDA driver (libcuda.so.1) with the entry points fastckpt loads
 * (rust/core/src/cuda.rs), for tests on machines without a GPU.
 *
 * "Device memory" is host memory the test declares per device (fake_device_memory). The
 * stand-in keeps the two properties of a real device that a snapshot's correctness rests
 * on, so that code which ignores them copies wrong bytes here too:
 *   - Work queued on a device lands only when the device is synchronised: writes the test
 *     queues (fake_queue_write, standing for the training step still running) reach device
 *     memory at cuCtxSynchronize, not before.
 *   - A copy queued on a stream runs when that stream is synchronised, not when it is
 *     queued: memory read before cuStreamSynchronize has not been written yet.
 * It checks what the driver would refuse: a context made current for one device and a
 * stream or a source of another, a pop with nothing pushed, a stream used after a
 * failure. Every call is logged, one line each, for the test to read (fake_log).
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef uint64_t CUdeviceptr;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    ILLEGAL_ADDRESS = 700,
};

#define MAX_DEVICES 4
#define MAX_RANGES 4096
#define MAX_PENDING 256

struct range {
    uintptr_t start;
    size_t len;
};
struct copy {
    void *dst;
    const void *src;
    size_t len;
};
struct write {
    void *dst;
    unsigned char byte;
    size_t len;
};
struct stream {
    int device;
    struct copy queued[MAX_PENDING];
    int n;
};
struct context {
    int device;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialised;
static int device_count = 2;
static struct context contexts[MAX_DEVICES];
static struct range memory[MAX_DEVICES][MAX_RANGES];
static int memory_n[MAX_DEVICES];
static struct write pending[MAX_DEVICES][MAX_PENDING];
static int pending_n[MAX_DEVICES];
static struct range registered[MAX_RANGES];
static int registered_n;
static CUdeviceptr failing_source;
static char *log_text;
static size_t log_len, log_cap;

/* The current-context stack of the calling thread, as the driver keeps one per thread. */
static __thread struct context *stack[16];
static __thread int depth;

static void say(const char *fmt, ...) {
    char line[256];
    va_list args;
    va_start(args, fmt);
    int n = vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line)
        n = sizeof line - 1;
    if (log_len + n + 2 > log_cap) {
        log_cap = (log_len + n + 2) * 2;
        log_text = realloc(log_text, log_cap);
    }
    memcpy(log_text + log_len, line, n);
    log_len += n;
    log_text[log_len++] = '\n';
    log_text[log_len] = 0;
}

static int current_device(void) { return depth > 0 ? stack[depth - 1]->device : -1; }

static int inside(const struct range *r, int n, uintptr_t p, size_t len) {
    for (int i = 0; i < n; i++)
        if (p >= r[i].start && p + len <= r[i].start + r[i].len)
            return 1;
    return 0;
}

/* ---- the test's side ------------------------------------------------------------------ */

void fake_reset(int devices) {
    pthread_mutex_lock(&lock);
    device_count = devices;
    memset(memory_n, 0, sizeof memory_n);
    memset(pending_n, 0, sizeof pending_n);
    registered_n = 0;
    failing_source = 0;
    log_len = 0;
    if (log_text)
        log_text[0] = 0;
    pthread_mutex_unlock(&lock);
}

/* Declares [ptr, ptr + len) to be memory of `device`. */
void fake_device_memory(int device, void *ptr, size_t len) {
    pthread_mutex_lock(&lock);
    if (memory_n[device] == MAX_RANGES)
        abort();
    memory[device][memory_n[device]++] = (struct range){(uintptr_t)ptr, len};
    pthread_mutex_unlock(&lock);
}

/* Queues a write of `len` bytes `byte` at `ptr` on `device`, landing at its next sync. */
void fake_queue_write(int device, void *ptr, unsigned char byte, size_t len) {
    pthread_mutex_lock(&lock);
    if (pending_n[device] == MAX_PENDING)
        abort();
    pending[device][pending_n[device]++] = (struct write){ptr, byte, len};
    pthread_mutex_unlock(&lock);
}

/* Copies from this device address fail with CUDA_ERROR_ILLEGAL_ADDRESS. */
void fake_fail_copies_from(CUdeviceptr src) {
    pthread_mutex_lock(&lock);
    failing_source = src;
    pthread_mutex_unlock(&lock);
}

/* The calls so far, one line each, and the current thread's context depth. */
const char *fake_log(void) { return log_text ? log_text : ""; }
int fake_depth(void) { return depth; }

/* ---- the driver's side ---------------------------------------------------------------- */

CUresult cuInit(unsigned flags) {
    pthread_mutex_lock(&lock);
    const char *n = getenv("FAKE_CUDA_DEVICES");
    if (n)
        device_count = atoi(n);
    initialised = flags == 0 && device_count > 0;
    for (int i = 0; i < MAX_DEVICES; i++)
        contexts[i].device = i;
    say("cuInit");
    pthread_mutex_unlock(&lock);
    return initialised ? SUCCESS : NOT_INITIALIZED;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (!initialised)
        return NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= device_count)
        return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) {
    if (device < 0 || device >= device_count)
        return INVALID_DEVICE;
    *ctx = &contexts[device];
    pthread_mutex_lock(&lock);
    say("retain %d", device);
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    if (ctx == NULL || depth == 16)
        return INVALID_CONTEXT;
    stack[depth++] = ctx;
    return SUCCESS;
}

CUresult cuCtxPopCurrent_v2(CUcontext *ctx) {
    if (depth == 0)
        return INVALID_CONTEXT;
    depth--;
    if (ctx)
        *ctx = stack[depth];
    return SUCCESS;
}

/* Waits for the current device's work: its queued writes land. */
CUresult cuCtxSynchronize(void) {
    int device = current_device();
    if (device < 0)
        return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < pending_n[device]; i++)
        memset(pending[device][i].dst, pending[device][i].byte, pending[device][i].len);
    pending_n[device] = 0;
    say("sync device %d", device);
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuStreamCreate(CUstream *stream, unsigned flags) {
    int device = current_device();
    if (device < 0)
        return INVALID_CONTEXT;
    struct stream *s = calloc(1, sizeof *s);
    s->device = device;
    *stream = s;
    pthread_mutex_lock(&lock);
    say("stream device %d flags %u", device, flags);
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

/* Runs the stream's queued copies. */
CUresult cuStreamSynchronize(CUstream stream) {
    struct stream *s = stream;
    if (s == NULL || current_device() != s->device)
        return INVALID_HANDLE;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < s->n; i++)
        memcpy(s->queued[i].dst, s->queued[i].src, s->queued[i].len);
    say("wait device %d: %d copies", s->device, s->n);
    s->n = 0;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t len, CUstream stream) {
    struct stream *s = stream;
    int device = current_device();
    if (s == NULL || device != s->device)
        return INVALID_HANDLE;
    pthread_mutex_lock(&lock);
    CUresult r = SUCCESS;
    if (src == failing_source)
        r = ILLEGAL_ADDRESS;
    else if (!inside(memory[device], memory_n[device], (uintptr_t)src, len))
        r = INVALID_VALUE; /* not this device's memory */
    else if (s->n == MAX_PENDING)
        r = INVALID_VALUE;
    else
        s->queued[s->n++] = (struct copy){dst, (const void *)(uintptr_t)src, len};
    say("copy device %d %zu bytes %s -> %s", device, len, r == SUCCESS ? "queued" : "refused",
        inside(registered, registered_n, (uintptr_t)dst, len) ? "pinned" : "pageable");
    pthread_mutex_unlock(&lock);
    return r;
}

CUresult cuMemHostRegister_v2(void *ptr, size_t len, unsigned flags) {
    if (current_device() < 0)
        return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    if (registered_n == MAX_RANGES)
        abort();
    registered[registered_n++] = (struct range){(uintptr_t)ptr, len};
    say("register %zu bytes flags %u", len, flags);
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuMemHostUnregister(void *ptr) {
    if (current_device() < 0)
        return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    CUresult r = INVALID_VALUE;
    for (int i = 0; i < registered_n; i++)
        if (registered[i].start == (uintptr_t)ptr) {
            say("unregister %zu bytes", registered[i].len);
            registered[i] = registered[--registered_n];
            r = SUCCESS;
            break;
        }
    pthread_mutex_unlock(&lock);
    return r;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    switch (error) {
    case ILLEGAL_ADDRESS:
        *name = "CUDA_ERROR_ILLEGAL_ADDRESS";
        return SUCCESS;
    case INVALID_VALUE:
        *name = "CUDA_ERROR_INVALID_VALUE";
        return SUCCESS;
    case INVALID_HANDLE:
        *name = "CUDA_ERROR_INVALID_HANDLE";
        return SUCCESS;
    case INVALID_DEVICE:
        *name = "CUDA_ERROR_INVALID_DEVICE";
        return SUCCESS;
    default:
        return INVALID_VALUE;
    }
}
