// PNG (libpng) and JPEG (libjpeg-turbo) decoding to RGB u8 and PNG encoding. See image.h for what is matched
// against Pillow and why.
//
// Both libraries report fatal errors by calling a handler that must not return. Ours copy the library's message
// into a state struct and longjmp back to the decoder, which returns a Status; the caller of the decoder then frees
// everything. All state that must survive the longjmp (library handles, pixel buffers, the message) lives in a
// struct owned by the caller, reached through a pointer that is never modified after setjmp, so its fields are
// well-defined after the jump (C11 7.13.2.1 only leaves non-volatile locals of the setjmp function indeterminate).
#define _POSIX_C_SOURCE 200809L  // fileno, fsync, fstat

#include "runtime/image.h"

#include <errno.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>  // after stdio.h: it uses FILE
#include <jerror.h>
#include <png.h>

#include "runtime/memory.h"

// A hostile progressive JPEG can hold thousands of tiny scans, each a full pass over the coefficient buffer
// (a CPU-time bomb). Real encoders write about 10; libjpeg-turbo's own tools suggest 500 as a limit.
#define JPEG_MAX_SCANS 500

static const char *display_name(const char *name) { return (name && name[0]) ? name : "image"; }

// Dimensions from a header, checked before any pixel memory is allocated: a 30-byte file can claim 100000x100000.
static Status check_dims(const char *name, const char *kind, long long w, long long h) {
    if (w <= 0 || h <= 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: corrupt %s (the header says %lldx%lld pixels)", name, kind, w, h);
    if (w > IMAGE_MAX_SIDE || h > IMAGE_MAX_SIDE || w * h > IMAGE_MAX_PIXELS)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED,
                         "%s: %s of %lldx%lld pixels is too large: the limit is %d pixels per side and %lld pixels "
                         "in all (a corrupt header, or an image to downscale before use)",
                         name, kind, w, h, IMAGE_MAX_SIDE, (long long)IMAGE_MAX_PIXELS);
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------------
// PNG decoding

typedef struct PngErr {
    char msg[256];  // the library's last error message
} PngErr;

typedef struct PngReadState {
    PngErr err;  // first: png_get_error_ptr gives this struct
    const uint8_t *buf;
    size_t len, pos;
    int truncated;  // the read callback ran out of bytes
    png_structp png;
    png_infop info;
    uint8_t *pixels;    // the result, [h][w][3]
    png_bytep *rows;    // row pointers into pixels, for png_read_image
} PngReadState;

static void png_on_error(png_structp png, png_const_charp msg) {
    PngErr *e = png_get_error_ptr(png);
    snprintf(e->msg, sizeof e->msg, "%s", msg);
    png_longjmp(png, 1);
}

// libpng warns about recoverable problems (bad CRC in an ancillary chunk, an odd ICC profile, palette indices past
// the palette). None changes the pixels Pillow would return, and library code must not print: ignore them.
static void png_on_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg;
}

static void png_read_from_memory(png_structp png, png_bytep dst, size_t n) {
    PngReadState *st = png_get_io_ptr(png);
    if (n > st->len - st->pos) {
        st->truncated = 1;
        png_error(png, "the data ends early");  // does not return
    }
    memcpy(dst, st->buf + st->pos, n);
    st->pos += n;
}

static Status png_decode_into(PngReadState *st, const char *name, const ImageDecodeOptions *opt, int *out_w,
                              int *out_h) {
    st->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &st->err, png_on_error, png_on_warning);
    if (st->png) st->info = png_create_info_struct(st->png);
    if (!st->png || !st->info)
        return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of memory creating the PNG decoder", name);

    if (setjmp(png_jmpbuf(st->png))) {
        if (st->truncated)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: truncated PNG (the file ends after %zu bytes; was the upload or "
                             "copy cut short?)", name, st->len);
        if (strstr(st->err.msg, "memory"))
            return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of memory decoding PNG (%s)", name, st->err.msg);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: corrupt PNG (%s)", name, st->err.msg);
    }
    png_set_read_fn(st->png, st, png_read_from_memory);
    png_read_info(st->png, st->info);

    png_uint_32 w32, h32;
    int depth, ctype;
    png_get_IHDR(st->png, st->info, &w32, &h32, &depth, &ctype, NULL, NULL, NULL);
    AGPT_TRY(check_dims(name, "PNG", w32, h32));
    size_t w = w32, h = h32;

    // Pillow opens 16-bit gray as "I;16", and I;16 -> RGB clips at 255 rather than scaling. That path is done by
    // hand below; every other variant goes through libpng's own transforms to 8-bit RGB.
    int gray16_clip = ctype == PNG_COLOR_TYPE_GRAY && depth == 16 && !(opt && opt->gray16_high_byte);
    // Palette indices past the palette's end come out black, in libpng as in Pillow.
    if (ctype == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(st->png);
    if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(st->png);  // v * 255 / (2^d - 1)
    // Drops a real alpha channel, and the one palette expansion makes from tRNS. Not png_set_expand: that would
    // turn a gray/RGB tRNS colour into alpha too, for nothing. Pillow's convert("RGB") never composites.
    png_set_strip_alpha(st->png);
    if (depth == 16 && !gray16_clip) png_set_strip_16(st->png);  // keeps the high byte, as Pillow's ";16B" unpackers
    if (!(ctype & PNG_COLOR_MASK_COLOR) && !gray16_clip) png_set_gray_to_rgb(st->png);
    // No png_set_gamma, png_set_shift (sBIT) or background: Pillow applies none of them.
    png_set_interlace_handling(st->png);  // libpng de-interlaces Adam7 into the full rows
    png_read_update_info(st->png, st->info);

    size_t stride = 3 * w;
    size_t want = gray16_clip ? 2 * w : 3 * w;
    size_t got = png_get_rowbytes(st->png, st->info);
    if (got != want)  // every colour type/depth combination is handled above, so this means a libpng surprise
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: PNG of colour type %d at %d bits decodes to %zu bytes per row, "
                         "expected %zu", name, ctype, depth, got, want);

    Status s = mem_host_alloc(stride * h, (void **)&st->pixels);
    if (s == AGPT_OK) s = mem_host_alloc(h * sizeof(png_bytep), (void **)&st->rows);
    if (s != AGPT_OK) return agpt_add_context(s, "%s: decoding a %zux%zu PNG", name, w, h);
    for (size_t y = 0; y < h; y++) st->rows[y] = st->pixels + y * stride;
    png_read_image(st->png, st->rows);
    // Reads up to IEND, so a file cut after the last image byte (IEND, the checksums) is reported as truncated.
    png_read_end(st->png, NULL);

    if (gray16_clip) {
        // Each row holds w big-endian 16-bit values in its first 2w bytes; spread them to 3w bytes in place,
        // from the right, so no value is overwritten before it is read.
        for (size_t y = 0; y < h; y++) {
            uint8_t *r = st->pixels + y * stride;
            for (size_t x = w; x-- > 0;) {
                unsigned v = ((unsigned)r[2 * x] << 8) | r[2 * x + 1];
                uint8_t g = v > 255 ? 255 : (uint8_t)v;
                r[3 * x] = r[3 * x + 1] = r[3 * x + 2] = g;
            }
        }
    }
    *out_w = (int)w;
    *out_h = (int)h;
    return AGPT_OK;
}

static Status decode_png(const uint8_t *buf, size_t len, const char *name, const ImageDecodeOptions *opt,
                         Image *out) {
    PngReadState st = {.buf = buf, .len = len};
    int w = 0, h = 0;
    Status s = png_decode_into(&st, name, opt, &w, &h);
    if (st.png) png_destroy_read_struct(&st.png, st.info ? &st.info : NULL, NULL);
    mem_host_free(st.rows);
    if (s != AGPT_OK) {
        mem_host_free(st.pixels);
        return s;
    }
    *out = (Image){.width = w, .height = h, .rgb = st.pixels};
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------------
// JPEG decoding

typedef struct JpegState {
    struct jpeg_error_mgr err;  // first: the handlers turn cinfo->err back into the JpegState
    struct jpeg_decompress_struct cinfo;
    struct jpeg_progress_mgr progress;
    jmp_buf jmp;
    int truncated;       // libjpeg warned "Premature end of JPEG file"
    int too_many_scans;  // the progress monitor stopped it
    char msg[JMSG_LENGTH_MAX];
    uint8_t *pixels;
} JpegState;

static void jpeg_on_error(j_common_ptr cinfo) {
    JpegState *st = (JpegState *)cinfo->err;
    cinfo->err->format_message(cinfo, st->msg);
    longjmp(st->jmp, 1);
}

// Warnings (level -1) and trace messages (level >= 0). A truncated stream only gets a warning from libjpeg, which
// then fills the rest of the image with gray; Pillow raises "image file is truncated" there, and so do we. Other
// warnings ("Corrupt JPEG data: N extraneous bytes before marker") are recovered from, and Pillow accepts them.
static void jpeg_on_message(j_common_ptr cinfo, int level) {
    if (level >= 0) return;
    JpegState *st = (JpegState *)cinfo->err;
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) {
        st->truncated = 1;
        cinfo->err->format_message(cinfo, st->msg);
        longjmp(st->jmp, 1);
    }
    cinfo->err->num_warnings++;
}

static void jpeg_print_nothing(j_common_ptr cinfo) { (void)cinfo; }  // library code never writes to stderr

static void jpeg_on_progress(j_common_ptr cinfo) {
    if (!cinfo->is_decompressor) return;
    j_decompress_ptr d = (j_decompress_ptr)cinfo;
    if (d->input_scan_number > JPEG_MAX_SCANS) {
        JpegState *st = (JpegState *)cinfo->err;
        st->too_many_scans = 1;
        longjmp(st->jmp, 1);
    }
}

// Pillow's MULDIV255: a * b / 255, rounded, without a division.
static inline int muldiv255(int a, int b) {
    int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
}

// Pillow reads every 4-component JPEG as "CMYK;I": it assumes Adobe's convention (Photoshop stores CMYK inverted,
// and libjpeg returns it as stored, YCCK included) and inverts all four values. Its CMYK -> RGB is then
// R = (255 - K) - C * (255 - K) / 255. With the stored (inverted) values c' = 255 - C and k' = 255 - K that is
// R ~= c' * k' / 255; the exact integer rounding below is Pillow's cmyk2rgb, so the bytes match.
static void jpeg_cmyk_to_rgb(const uint8_t *in, uint8_t *out, size_t w) {
    for (size_t x = 0; x < w; x++, in += 4, out += 3) {
        int nk = in[3];  // 255 - K, where K = 255 - in[3]
        for (int c = 0; c < 3; c++) out[c] = (uint8_t)(nk - muldiv255(255 - in[c], nk));
    }
}

static Status jpeg_decode_into(JpegState *st, const uint8_t *buf, size_t len, const char *name, int *out_w,
                               int *out_h) {
    j_decompress_ptr ci = &st->cinfo;
    ci->err = jpeg_std_error(&st->err);
    st->err.error_exit = jpeg_on_error;
    st->err.emit_message = jpeg_on_message;
    st->err.output_message = jpeg_print_nothing;

    if (setjmp(st->jmp)) {
        if (st->truncated)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: truncated JPEG (%s; the file ends after %zu bytes: was the upload "
                             "or copy cut short?)", name, st->msg, len);
        if (st->too_many_scans)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: corrupt JPEG (more than %d progressive scans)", name,
                             JPEG_MAX_SCANS);
        switch (st->err.msg_code) {
        case JERR_OUT_OF_MEMORY:
            return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of memory decoding JPEG (%s)", name, st->msg);
        case JERR_BAD_PRECISION:  // 12-bit JPEG (Pillow cannot read it either)
        case JERR_CONVERSION_NOTIMPL:
        case JERR_NOT_COMPILED:
            return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: unsupported JPEG (%s)", name, st->msg);
        default:
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: corrupt JPEG (%s)", name, st->msg);
        }
    }
    jpeg_create_decompress(ci);
    st->progress.progress_monitor = jpeg_on_progress;
    ci->progress = &st->progress;
    jpeg_mem_src(ci, buf, (unsigned long)len);
    jpeg_read_header(ci, TRUE);  // TRUE: a tables-only stream is an error, not a success without an image
    AGPT_TRY(check_dims(name, "JPEG", ci->image_width, ci->image_height));

    // Pillow picks its mode from the component count: 1 -> L, 3 -> RGB, 4 -> CMYK; libjpeg does the colour
    // conversion (YCbCr -> RGB, gray -> RGB by replication, YCCK -> CMYK).
    int cmyk = 0;
    switch (ci->num_components) {
    case 1:
    case 3: ci->out_color_space = JCS_RGB; break;
    case 4: ci->out_color_space = JCS_CMYK; cmyk = 1; break;
    default:
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: JPEG with %d colour components (only 1, 3 and 4 are supported)",
                         name, ci->num_components);
    }
    // Pillow's defaults (these are libjpeg's too, but the output depends on them: say so).
    ci->dct_method = JDCT_ISLOW;
    ci->do_fancy_upsampling = TRUE;
    jpeg_start_decompress(ci);

    size_t w = ci->output_width, h = ci->output_height;
    if (w != ci->image_width || h != ci->image_height || ci->output_components != (cmyk ? 4 : 3))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: JPEG decodes to %zux%zux%d, expected %ux%ux%d", name, w, h,
                         ci->output_components, ci->image_width, ci->image_height, cmyk ? 4 : 3);
    Status s = mem_host_alloc(3 * w * h, (void **)&st->pixels);
    if (s != AGPT_OK) return agpt_add_context(s, "%s: decoding a %zux%zu JPEG", name, w, h);
    // The CMYK row comes from libjpeg's image pool, which jpeg_destroy_decompress frees on every path.
    JSAMPARRAY cmyk_row = cmyk ? ci->mem->alloc_sarray((j_common_ptr)ci, JPOOL_IMAGE, (JDIMENSION)(4 * w), 1) : NULL;
    while (ci->output_scanline < h) {
        size_t y = ci->output_scanline;
        JSAMPROW row = cmyk ? cmyk_row[0] : st->pixels + y * 3 * w;
        if (jpeg_read_scanlines(ci, &row, 1) != 1)  // only a suspending data source returns 0; ours never does
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: JPEG decoder stopped at row %zu of %zu", name, y, h);
        if (cmyk) jpeg_cmyk_to_rgb(cmyk_row[0], st->pixels + y * 3 * w, w);
    }
    // Reads on to EOI: a file cut after the last scan's data is reported as truncated.
    jpeg_finish_decompress(ci);
    *out_w = (int)w;
    *out_h = (int)h;
    return AGPT_OK;
}

static Status decode_jpeg(const uint8_t *buf, size_t len, const char *name, Image *out) {
    // Zeroed, so jpeg_destroy_decompress is safe whether or not jpeg_create_decompress ran or finished.
    JpegState *st = calloc(1, sizeof *st);  // ~1 KB with the jmp_buf and cinfo: heap, not the caller's stack
    if (!st) return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of memory creating the JPEG decoder", name);
    int w = 0, h = 0;
    Status s = jpeg_decode_into(st, buf, len, name, &w, &h);
    jpeg_destroy_decompress(&st->cinfo);
    if (s == AGPT_OK) *out = (Image){.width = w, .height = h, .rgb = st->pixels};
    else mem_host_free(st->pixels);
    free(st);
    return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Format detection and the public decoding API

static const uint8_t PNG_MAGIC[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};

// What a non-PNG, non-JPEG file probably is, to make the message actionable.
static const char *guess_format(const uint8_t *b, size_t n) {
    if (n >= 2 && b[0] == 'B' && b[1] == 'M') return "BMP";
    if (n >= 4 && memcmp(b, "GIF8", 4) == 0) return "GIF";
    if (n >= 4 && (memcmp(b, "II*\0", 4) == 0 || memcmp(b, "MM\0*", 4) == 0)) return "TIFF";
    if (n >= 12 && memcmp(b, "RIFF", 4) == 0 && memcmp(b + 8, "WEBP", 4) == 0) return "WebP";
    if (n >= 12 && memcmp(b + 4, "ftyp", 4) == 0) return "HEIF/AVIF or MP4";
    if (n >= 4 && memcmp(b, "%PDF", 4) == 0) return "PDF";
    if (n >= 2 && b[0] == 'P' && b[1] >= '1' && b[1] <= '7') return "PNM";
    if ((n >= 6 && memcmp(b, "\0\0\0\x0cjP", 6) == 0) || (n >= 4 && memcmp(b, "\xff\x4f\xff\x51", 4) == 0))
        return "JPEG 2000";
    return NULL;
}

Status image_decode_ex(const uint8_t *buf, size_t len, const char *name_for_errors, const ImageDecodeOptions *opt,
                       Image *out) {
    const char *name = display_name(name_for_errors);
    AGPT_CHECK_ARG(out != NULL, "%s: image_decode needs an output Image", name);
    *out = (Image){0};
    AGPT_CHECK_ARG(buf != NULL || len == 0, "%s: image_decode given a NULL buffer of %zu bytes", name, len);
    if (len == 0) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: empty file (0 bytes), not an image", name);

    if (len >= 8 && memcmp(buf, PNG_MAGIC, 8) == 0) return decode_png(buf, len, name, opt, out);
    if (len >= 3 && buf[0] == 0xFF && buf[1] == 0xD8 && buf[2] == 0xFF) return decode_jpeg(buf, len, name, out);
    // A few bytes of a real signature: the start of a PNG or JPEG that was cut off.
    if (len < 8 && len >= 2 && memcmp(buf, PNG_MAGIC, len) == 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: truncated PNG (only %zu bytes)", name, len);
    if (len == 2 && buf[0] == 0xFF && buf[1] == 0xD8)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: truncated JPEG (only %zu bytes)", name, len);

    char hex[8 * 3 + 8];  // "89 50 4E ..." for at most 8 bytes
    size_t shown = len < 8 ? len : 8, o = 0;
    for (size_t i = 0; i < shown; i++) o += (size_t)snprintf(hex + o, sizeof hex - o, i ? " %02X" : "%02X", buf[i]);
    if (len > shown) snprintf(hex + o, sizeof hex - o, " ...");
    const char *kind = guess_format(buf, len);
    if (kind)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: not a PNG or JPEG file (starts with %s: looks like %s); convert "
                         "it to PNG", name, hex, kind);
    return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: not a PNG or JPEG file (starts with %s)", name, hex);
}

Status image_decode(const uint8_t *buf, size_t len, const char *name_for_errors, Image *out) {
    return image_decode_ex(buf, len, name_for_errors, NULL, out);
}

void image_free(Image *img) {
    if (!img) return;
    mem_host_free(img->rgb);
    *img = (Image){0};
}

// Reads a whole file into a malloc'd buffer; regular files in one read, pipes and devices in growing chunks.
static Status read_file(const char *path, uint8_t **out, size_t *out_len) {
    *out = NULL;
    *out_len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return AGPT_FAIL(AGPT_ERR_IO, "cannot open image %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0) {
        int e = errno;
        fclose(f);
        return AGPT_FAIL(AGPT_ERR_IO, "cannot stat image %s: %s", path, strerror(e));
    }
    if (S_ISDIR(sb.st_mode)) {
        fclose(f);
        return AGPT_FAIL(AGPT_ERR_IO, "%s is a folder, not an image file", path);
    }
    if (S_ISREG(sb.st_mode) && sb.st_size > IMAGE_MAX_FILE_BYTES) {
        fclose(f);
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: image file of %lld bytes is larger than the %lld-byte limit",
                         path, (long long)sb.st_size, (long long)IMAGE_MAX_FILE_BYTES);
    }
    // One byte more than the size, so a regular file is read (and its end seen) in a single fread.
    size_t cap = S_ISREG(sb.st_mode) ? (size_t)sb.st_size + 1 : (size_t)1 << 16;
    size_t len = 0;
    uint8_t *buf = malloc(cap);
    Status s = AGPT_OK;
    if (!buf) s = AGPT_FAIL(AGPT_ERR_OOM, "%s: out of memory reading %zu bytes", path, cap);
    while (s == AGPT_OK) {
        len += fread(buf + len, 1, cap - len, f);
        if (ferror(f)) {
            s = AGPT_FAIL(AGPT_ERR_IO, "cannot read image %s: %s", path, strerror(errno));
        } else if (feof(f)) {
            break;
        } else if (len == cap) {  // the file grew, or a pipe: make room
            if (cap >= (size_t)IMAGE_MAX_FILE_BYTES) {
                s = AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: image data longer than the %lld-byte limit", path,
                              (long long)IMAGE_MAX_FILE_BYTES);
                break;
            }
            size_t ncap = cap * 2;
            uint8_t *nb = realloc(buf, ncap);
            if (!nb) s = AGPT_FAIL(AGPT_ERR_OOM, "%s: out of memory reading %zu bytes", path, ncap);
            else buf = nb, cap = ncap;
        }
    }
    fclose(f);
    if (s != AGPT_OK) {
        free(buf);
        return s;
    }
    *out = buf;
    *out_len = len;
    return AGPT_OK;
}

Status image_load_ex(const char *path, const ImageDecodeOptions *opt, Image *out) {
    AGPT_CHECK_ARG(out != NULL, "image_load needs an output Image");
    *out = (Image){0};
    AGPT_CHECK_ARG(path != NULL && path[0], "image_load needs a file path");
    uint8_t *buf;
    size_t len;
    AGPT_TRY(read_file(path, &buf, &len));
    Status s = image_decode_ex(buf, len, path, opt, out);
    free(buf);
    return s;
}

Status image_load(const char *path, Image *out) { return image_load_ex(path, NULL, out); }

// ---------------------------------------------------------------------------------------------------------------
// PNG encoding

typedef struct PngWriteState {
    PngErr err;  // first: png_get_error_ptr gives this struct
    png_structp png;
    png_infop info;
    uint8_t *data;  // the PNG so far (malloc: the caller frees it with free())
    size_t len, cap;
    int oom;
} PngWriteState;

static void png_write_to_memory(png_structp png, png_bytep src, size_t n) {
    PngWriteState *st = png_get_io_ptr(png);
    if (n > st->cap - st->len) {
        size_t ncap = st->cap ? st->cap : 4096;
        while (ncap - st->len < n) {
            if (ncap > SIZE_MAX / 2) ncap = SIZE_MAX;
            else ncap *= 2;
        }
        uint8_t *nb = realloc(st->data, ncap);
        if (!nb) {
            st->oom = 1;
            png_error(png, "out of memory growing the PNG buffer");
        }
        st->data = nb;
        st->cap = ncap;
    }
    memcpy(st->data + st->len, src, n);
    st->len += n;
}

static void png_flush_nothing(png_structp png) { (void)png; }

static Status png_encode_into(PngWriteState *st, int width, int height, int channels, const uint8_t *pixels) {
    st->png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &st->err, png_on_error, png_on_warning);
    if (st->png) st->info = png_create_info_struct(st->png);
    if (!st->png || !st->info) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory creating the PNG encoder");
    if (setjmp(png_jmpbuf(st->png))) {
        if (st->oom)
            return AGPT_FAIL(AGPT_ERR_OOM, "out of memory encoding a %dx%d PNG (%zu bytes so far)", width, height,
                             st->len);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "libpng could not encode a %dx%dx%d PNG: %s", width, height, channels,
                         st->err.msg);
    }
    png_set_write_fn(st->png, st, png_write_to_memory, png_flush_nothing);
    int ctype = channels == 1 ? PNG_COLOR_TYPE_GRAY : channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_RGB_ALPHA;
    png_set_IHDR(st->png, st->info, (png_uint_32)width, (png_uint_32)height, 8, ctype, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(st->png, st->info);
    size_t stride = (size_t)width * (size_t)channels;
    for (int y = 0; y < height; y++) png_write_row(st->png, pixels + (size_t)y * stride);
    png_write_end(st->png, NULL);
    return AGPT_OK;
}

Status image_encode_png_memory(int width, int height, int channels, const uint8_t *pixels, uint8_t **out,
                               size_t *out_len) {
    AGPT_CHECK_ARG(out != NULL && out_len != NULL, "image_encode_png_memory needs out and out_len");
    *out = NULL;
    *out_len = 0;
    AGPT_CHECK_ARG(channels == 1 || channels == 3 || channels == 4,
                   "PNG encoding takes 1 (gray), 3 (RGB) or 4 (RGBA) channels, not %d", channels);
    AGPT_CHECK_ARG(pixels != NULL, "PNG encoding given NULL pixels");
    // The decoder's limits, so that whatever is written can be read back.
    AGPT_CHECK_ARG(width > 0 && height > 0 && width <= IMAGE_MAX_SIDE && height <= IMAGE_MAX_SIDE &&
                       (long long)width * height <= IMAGE_MAX_PIXELS,
                   "PNG encoding of %dx%d pixels: each side must be 1..%d and the total at most %lld", width, height,
                   IMAGE_MAX_SIDE, (long long)IMAGE_MAX_PIXELS);
    PngWriteState st = {0};
    Status s = png_encode_into(&st, width, height, channels, pixels);
    if (st.png) png_destroy_write_struct(&st.png, st.info ? &st.info : NULL);
    if (s != AGPT_OK) {
        free(st.data);
        return s;
    }
    *out = st.data;
    *out_len = st.len;
    return AGPT_OK;
}

Status image_save_png(const char *path, int width, int height, int channels, const uint8_t *pixels) {
    AGPT_CHECK_ARG(path != NULL && path[0], "image_save_png needs a file path");
    uint8_t *png;
    size_t len;
    AGPT_TRY(image_encode_png_memory(width, height, channels, pixels, &png, &len));

    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) {
        free(png);
        return AGPT_FAIL(AGPT_ERR_OOM, "out of memory saving %s", path);
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);

    Status s = AGPT_OK;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        s = AGPT_FAIL(AGPT_ERR_IO, "cannot create %s: %s (does the folder exist, and may we write there?)", tmp,
                      strerror(errno));
    } else {
        // fsync before rename: otherwise a power cut can leave a renamed but empty file on some file systems.
        int ok = fwrite(png, 1, len, f) == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
        int e = errno;
        if (fclose(f) != 0 && ok) ok = 0, e = errno;
        if (!ok) {
            remove(tmp);
            s = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s (%zu bytes): %s (is the disk full?)", tmp, len, strerror(e));
        } else if (rename(tmp, path) != 0) {
            e = errno;
            remove(tmp);
            s = AGPT_FAIL(AGPT_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(e));
        }
    }
    free(tmp);
    free(png);
    return s;
}
