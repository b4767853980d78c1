// libFuzzer target for image_decode: any bytes must give an image or an error with a message, never a crash, a
// leak, undefined behaviour or an unbounded allocation. A decoded image is also re-encoded as PNG and decoded again,
// which must give the same pixels.
//
// Build and run (seeded with the test images; the first folder collects new inputs):
//   clang -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -DIMAGE_MAX_PIXELS=4000000 -I. \
//     runtime/status.c runtime/memory.c runtime/tensor.c runtime/dtype.c runtime/image.c tests/fuzz/fuzz_image.c \
//     -lpng -ljpeg -lz -lm -o /tmp/fuzz_image
//   mkdir -p /tmp/fuzz_corpus && /tmp/fuzz_image -max_total_time=60 -rss_limit_mb=2048 -timeout=10 \
//     /tmp/fuzz_corpus tests/data/images
// IMAGE_MAX_PIXELS is lowered for fuzzing only: with the production limit (200M pixels, 600 MB) a 40-byte header
// legitimately asks for more than libFuzzer's default memory limit, which it would report as a crash.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    // The last byte picks the 16-bit gray option, so both paths get fuzzed.
    ImageDecodeOptions opt = {.gray16_high_byte = size > 0 && (data[size - 1] & 1)};
    Image im;
    agpt_clear_error();
    Status s = image_decode_ex(data, size, "fuzz", &opt, &im);
    if (s != AGPT_OK) {
        if (agpt_last_error()[0] == 0 || im.rgb != NULL) __builtin_trap();  // an error needs a message
        return 0;
    }
    if (im.width <= 0 || im.height <= 0 || !im.rgb) __builtin_trap();
    size_t n = (size_t)im.width * (size_t)im.height * 3;
    // Touch the first and last bytes: ASan checks the buffer is as large as claimed (and MSan would check that
    // every byte was written).
    volatile uint8_t sink = im.rgb[0] ^ im.rgb[n - 1];
    (void)sink;

    if (n <= 3 * 65536) {  // round trip through the encoder, for images small enough to stay fast
        uint8_t *png = NULL;
        size_t len = 0;
        if (image_encode_png_memory(im.width, im.height, 3, im.rgb, &png, &len) != AGPT_OK) __builtin_trap();
        Image back;
        if (image_decode(png, len, "fuzz-roundtrip", &back) != AGPT_OK) __builtin_trap();
        if (back.width != im.width || back.height != im.height || memcmp(back.rgb, im.rgb, n) != 0)
            __builtin_trap();
        image_free(&back);
        free(png);
    }
    image_free(&im);
    return 0;
}
