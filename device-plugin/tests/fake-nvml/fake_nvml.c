/*
 * A stand-in for libnvidia-ml.so.1 with two GPUs, for tests on machines without a GPU.
 * Only the NVML functions kybernate-device-plugin calls are provided, with NVML's C ABI.
 *
 * Behaviour is steered through files in CONTROL_DIR (a string macro given with -D at build time):
 *   lost-<i>  exists   -> nvmlDeviceGetMemoryInfo_v2 of GPU i fails with NVML_ERROR_GPU_IS_LOST
 *   xid-<i>   "<xid>"  -> the next nvmlEventSetWait_v2 reports critical XID <xid> on GPU i and
 *                         deletes the file
 */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef CONTROL_DIR
#error "build with -DCONTROL_DIR=\"/path\""
#endif

#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15
#define EVENT_XID_CRITICAL 8ULL
#define GIB (1024ULL * 1024ULL * 1024ULL)
#define GPU_COUNT 2

typedef struct { int index; } fake_device;
typedef struct { unsigned long long registered[GPU_COUNT]; } fake_event_set;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} memory_v2;
typedef struct {
    fake_device *device;
    unsigned long long event_type, event_data;
    unsigned int gpu_instance_id, compute_instance_id;
} event_data;

static fake_device devices[GPU_COUNT] = {{0}, {1}};
static fake_event_set the_set;
static const char *uuids[GPU_COUNT] = {
    "GPU-fa4e0000-0000-4000-8000-000000000000", "GPU-fa4e0000-0000-4000-8000-000000000001"};
static const char *names[GPU_COUNT] = {"Fake GPU 16G", "Fake GPU 8G"};
static const unsigned long long memory[GPU_COUNT] = {16 * GIB, 8 * GIB};

static int valid(const fake_device *d) { return d == &devices[0] || d == &devices[1]; }

static void control_path(char *buf, size_t len, const char *what, int index) {
    snprintf(buf, len, "%s/%s-%d", CONTROL_DIR, what, index);
}

int nvmlInit_v2(void) { return NVML_SUCCESS; }
int nvmlShutdown(void) { return NVML_SUCCESS; }

int nvmlDeviceGetCount_v2(unsigned int *count) {
    *count = GPU_COUNT;
    return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, fake_device **device) {
    if (index >= GPU_COUNT) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

int nvmlDeviceGetUUID(fake_device *d, char *uuid, unsigned int len) {
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(uuid, len, "%s", uuids[d->index]);
    return NVML_SUCCESS;
}

int nvmlDeviceGetName(fake_device *d, char *name, unsigned int len) {
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(name, len, "%s", names[d->index]);
    return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo_v2(fake_device *d, memory_v2 *info) {
    char path[4096];
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    control_path(path, sizeof path, "lost", d->index);
    if (access(path, F_OK) == 0) return NVML_ERROR_GPU_IS_LOST;
    info->total = memory[d->index];
    info->reserved = 0;
    info->free = memory[d->index];
    info->used = 0;
    return NVML_SUCCESS;
}

int nvmlDeviceGetSupportedEventTypes(fake_device *d, unsigned long long *types) {
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    *types = EVENT_XID_CRITICAL;
    return NVML_SUCCESS;
}

int nvmlEventSetCreate(fake_event_set **set) {
    memset(&the_set, 0, sizeof the_set);
    *set = &the_set;
    return NVML_SUCCESS;
}

int nvmlEventSetFree(fake_event_set *set) {
    (void)set;
    return NVML_SUCCESS;
}

int nvmlDeviceRegisterEvents(fake_device *d, unsigned long long types, fake_event_set *set) {
    if (!valid(d) || set != &the_set) return NVML_ERROR_INVALID_ARGUMENT;
    set->registered[d->index] |= types;
    return NVML_SUCCESS;
}

int nvmlEventSetWait_v2(fake_event_set *set, event_data *data, unsigned int timeout_ms) {
    char path[4096];
    for (int i = 0; i < GPU_COUNT; i++) {
        FILE *f;
        unsigned long long xid = 0;
        if (!(set->registered[i] & EVENT_XID_CRITICAL)) continue;
        control_path(path, sizeof path, "xid", i);
        f = fopen(path, "r");
        if (!f) continue;
        if (fscanf(f, "%llu", &xid) != 1) xid = 999; /* NVML's "unknown XID" */
        fclose(f);
        unlink(path);
        memset(data, 0, sizeof *data);
        data->device = &devices[i];
        data->event_type = EVENT_XID_CRITICAL;
        data->event_data = xid;
        return NVML_SUCCESS;
    }
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    return NVML_ERROR_TIMEOUT;
}
