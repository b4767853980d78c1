// libFuzzer target for the torch.save checkpoint reader (runtime/pth.c, pickle.c, zip.c). Any input must either
// be refused with a message or open into tensors whose every addressed byte lies inside the input (or an
// inflated copy); the sanitizers turn a read outside it into a crash.
// Two modes, by the input's first byte: 'P' (a zip, "PK...") goes to pth_open_memory as it is; any other first
// byte means "the rest is a pickle": it is wrapped as archive/data.pkl in a zip that also holds storages
// archive/data/0..3 of 64 bytes, so mutations reach the pickle machine without breaking the zip's offsets.
// Build and run, seeded with the goldens and their pickles:
//   cmake -S . -B /tmp/fz -DCMAKE_C_COMPILER=clang -DAGPT_FUZZ=ON && cmake --build /tmp/fz --target fuzz_pth
//   mkdir -p /tmp/fz/corpus && cp tests/data/pth/*.pt tests/data/pth/*.bin /tmp/fz/corpus/
//   python3 -c 'import zipfile as Z,glob;[open(f"/tmp/fz/corpus/{i}.pkl","wb").write(b"!"+z.read(n)) for i,f in
//     enumerate(glob.glob("tests/data/pth/*.pt")) if Z.is_zipfile(f) for z in [Z.ZipFile(f)] for n in
//     z.namelist() if n.endswith("data.pkl")]'
//   /tmp/fz/fuzz_pth -max_total_time=90 /tmp/fz/corpus
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/pth.h"

// Where touched bytes go, so the compiler cannot drop the reads.
static volatile uint8_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, v), put16(p + 2, v >> 16); }

// A STORED zip of archive/data.pkl (the pickle) and archive/data/0..3 (64 bytes each); malloc'd at its exact
// size so that the sanitizer sees any read past it.
static uint8_t *wrap_pickle(const uint8_t *pkl, size_t pkl_len, size_t *out_len) {
    static uint8_t storage[64];
    for (int i = 0; i < 64; i++) storage[i] = (uint8_t)(i * 37 + 1);
    const char *names[5] = {"archive/data.pkl", "archive/data/0", "archive/data/1", "archive/data/2",
                            "archive/data/3"};
    const uint8_t *datas[5] = {pkl, storage, storage, storage, storage};
    size_t sizes[5] = {pkl_len, 64, 64, 64, 64}, total = 22, offsets[5];
    for (int i = 0; i < 5; i++) total += 30 + strlen(names[i]) + sizes[i] + 46 + strlen(names[i]);
    uint8_t *z = malloc(total), *p = z;
    for (int i = 0; i < 5; i++) {
        size_t n = strlen(names[i]);
        offsets[i] = (size_t)(p - z);
        memset(p, 0, 30);
        put32(p, 0x04034b50), put32(p + 18, (uint32_t)sizes[i]), put32(p + 22, (uint32_t)sizes[i]);
        put16(p + 26, (uint32_t)n);
        memcpy(p + 30, names[i], n);
        if (sizes[i]) memcpy(p + 30 + n, datas[i], sizes[i]);
        p += 30 + n + sizes[i];
    }
    size_t cd = (size_t)(p - z);
    for (int i = 0; i < 5; i++) {
        size_t n = strlen(names[i]);
        memset(p, 0, 46);
        put32(p, 0x02014b50), put32(p + 20, (uint32_t)sizes[i]), put32(p + 24, (uint32_t)sizes[i]);
        put16(p + 28, (uint32_t)n), put32(p + 42, (uint32_t)offsets[i]);
        memcpy(p + 46, names[i], n);
        p += 46 + n;
    }
    memset(p, 0, 22);
    put32(p, 0x06054b50), put16(p + 8, 5), put16(p + 10, 5);
    put32(p + 12, (uint32_t)((size_t)(p - z) - cd)), put32(p + 16, (uint32_t)cd);
    *out_len = total;
    return z;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *wrapped = NULL;
    if (size > 0 && data[0] != 'P') data = wrapped = wrap_pickle(data + 1, size - 1, &size);
    PthFile *f = NULL;
    if (pth_open_memory(data, size, &f) != AGPT_OK) {
        free(wrapped);
        // A refusal without a message would leave a user with nothing to act on.
        if (agpt_last_error()[0] == 0 || f != NULL) __builtin_trap();
        return 0;
    }
    for (int i = 0; i < pth_count(f); i++) {
        const char *name = pth_name(f, i);
        int found = name ? pth_find(f, name) : -1;
        if (found < 0 || found > i || strcmp(pth_name(f, found), name) != 0) __builtin_trap();
        PthTensorInfo info;
        if (pth_info(f, i, &info) != AGPT_OK) __builtin_trap();
        if (info.span_nbytes > 0) {
            const uint8_t *p = info.data;
            sink = p[0];
            sink = p[info.span_nbytes - 1];
        }
        if (info.storage_nbytes > 0) {
            const uint8_t *p = info.storage;
            sink = p[0];
            sink = p[info.storage_nbytes - 1];
        }
        if (info.nbytes <= ((size_t)1 << 22)) {
            uint8_t *copy = malloc(info.nbytes + 1);
            if (!copy || pth_copy_contiguous(f, i, copy, info.nbytes) != AGPT_OK) __builtin_trap();
            if (info.contiguous && info.nbytes && memcmp(copy, info.data, info.nbytes) != 0) __builtin_trap();
            free(copy);
        }
        Tensor t;
        if (found == i && pth_get(f, name, &t) == AGPT_OK) {
            if (!info.supported || t.data != info.data || tensor_nbytes(&t) != info.nbytes) __builtin_trap();
        } else if (found == i && info.supported) {
            __builtin_trap();  // pth_info and pth_get disagree about whether the tensor is usable
        }
    }
    pth_close(f);
    free(wrapped);
    return 0;
}
