// libFuzzer target for the safetensors reader. Any input must either be refused with a message or open into
// tensors whose every byte lies inside the input; the sanitizers turn a read outside it into a crash.
// Build and run (a seed corpus of real files helps it reach the deeper checks quickly):
//   clang -g -O1 -fsanitize=fuzzer,address,undefined -I. runtime/status.c runtime/dtype.c runtime/tensor.c \
//       runtime/memory.c runtime/safetensors.c tests/fuzz/fuzz_safetensors.c -lcjson -lm -o fuzz_safetensors
//   ./fuzz_safetensors -max_total_time=60 CORPUS_DIR
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime/safetensors.h"

// Where touched bytes go, so the compiler cannot drop the reads.
static volatile uint8_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    SafeTensors *st = NULL;
    if (st_open_memory(data, size, &st) != AGPT_OK) {
        // A refusal without a message would leave a user with nothing to act on.
        if (agpt_last_error()[0] == 0) __builtin_trap();
        return 0;
    }
    for (int i = 0; i < st_count(st); i++) {
        const char *name = st_name(st, i);
        if (!name || st_find(st, name) != i) __builtin_trap();
        StInfo info;
        if (st_info(st, i, &info) != AGPT_OK) __builtin_trap();
        if (info.nbytes > 0) {
            const uint8_t *p = info.data;
            sink = p[0];
            sink = p[info.nbytes - 1];
        }
        Tensor t;
        if (st_get(st, name, &t) == AGPT_OK) {
            size_t nbytes = tensor_nbytes(&t);
            if (nbytes != info.nbytes || t.data != info.data) __builtin_trap();
            if (nbytes > 0) {
                sink = ((const uint8_t *)t.data)[0];
                sink = ((const uint8_t *)t.data)[nbytes - 1];
            }
        } else if (info.supported) {
            __builtin_trap();  // st_info and st_get disagree about whether the tensor is usable
        }
    }
    for (int i = 0; i < st_metadata_count(st); i++) {
        const char *key = st_metadata_key(st, i);
        const char *value = st_metadata(st, key);
        if (!value) __builtin_trap();
        sink = (uint8_t)value[0];
    }
    st_close(st);
    return 0;
}
