// ZIP directory reader for torch checkpoints. Every number in the archive is untrusted: offsets and sizes are
// checked against the buffer with overflow-safe arithmetic before anything points at them.
#define _POSIX_C_SOURCE 200809L  // strdup under -std=c11

#include "runtime/zip.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

enum {
    SIG_LOCAL = 0x04034b50,
    SIG_CENTRAL = 0x02014b50,
    SIG_EOCD = 0x06054b50,
    SIG_EOCD64 = 0x06064b50,
    SIG_EOCD64_LOCATOR = 0x07064b50,
    EOCD_SIZE = 22,
    EOCD64_SIZE = 56,
    LOCATOR_SIZE = 20,
    CENTRAL_SIZE = 46,
    LOCAL_SIZE = 30,
};

struct Zip {
    char *what;              // for messages
    const uint8_t *buf;
    size_t len;
    ZipEntry *entries;       // [n] in central directory order
    int n;
    int *by_name;            // [n] indices sorted by name (ties by index), for binary search
    uint8_t **inflated;      // [n] inflated copies of DEFLATEd entries, NULL until asked for
};

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

// [off, off + n) lies inside the buffer, without overflow.
static bool fits(const Zip *z, uint64_t off, uint64_t n) { return off <= z->len && n <= z->len - off; }

// Finds the End Of Central Directory record: the last one whose comment ends inside the buffer, searched
// over the last 64 KiB + 22 bytes (the comment is at most 65535 bytes).
static Status find_eocd(const Zip *z, size_t *pos) {
    if (z->len < EOCD_SIZE)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: only %zu bytes, too short for a zip archive; the file is "
                         "truncated", z->what, z->len);
    size_t lowest = z->len > EOCD_SIZE + 65535 ? z->len - EOCD_SIZE - 65535 : 0;
    for (size_t p = z->len - EOCD_SIZE + 1; p-- > lowest;) {
        if (rd32(z->buf + p) == SIG_EOCD && (uint64_t)rd16(z->buf + p + 20) <= z->len - p - EOCD_SIZE) {
            *pos = p;
            return AGPT_OK;
        }
    }
    return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no zip end-of-central-directory record in the last 64 KiB; the "
                     "file is truncated or not a torch checkpoint", z->what);
}

// The ZIP64 extended information extra field (id 1) holds, in this order, whichever of uncompressed size,
// compressed size and local header offset are 0xFFFFFFFF in the fixed fields.
static Status read_zip64_extra(const Zip *z, const uint8_t *extra, size_t extra_len, ZipEntry *e,
                               uint64_t *local_off, bool need_size, bool need_comp, bool need_off) {
    size_t p = 0;
    while (extra_len - p >= 4) {
        uint16_t id = rd16(extra + p), n = rd16(extra + p + 2);
        if (n > extra_len - p - 4) break;  // a short tail field: torch's padding never is; treat as absent
        if (id == 1) {
            const uint8_t *f = extra + p + 4;
            size_t need = 8 * ((size_t)need_size + need_comp + need_off);
            if (n < need)
                return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: entry '%.80s' has a ZIP64 field of %u bytes, %zu needed; "
                                 "the file is corrupt", z->what, e->name, n, need);
            if (need_size) e->size = rd64(f), f += 8;
            if (need_comp) e->comp_size = rd64(f), f += 8;
            if (need_off) *local_off = rd64(f);
            return AGPT_OK;
        }
        p += 4 + (size_t)n;
    }
    if (need_size || need_comp || need_off)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: entry '%.80s' has 32-bit sizes of 0xFFFFFFFF but no ZIP64 "
                         "field; the file is corrupt", z->what, e->name);
    return AGPT_OK;
}

// A merge sort over indices by (name, index): qsort has no context argument in C11, and ties must keep the
// directory order so that zip_find returns the first of two entries with one name.
static void merge_sort(int *v, int *tmp, int n, const ZipEntry *e) {
    if (n < 2) return;
    int h = n / 2;
    merge_sort(v, tmp, h, e);
    merge_sort(v + h, tmp, n - h, e);
    int i = 0, j = h, k = 0;
    while (i < h && j < n) {
        int c = strcmp(e[v[i]].name, e[v[j]].name);
        tmp[k++] = (c < 0 || (c == 0 && v[i] < v[j])) ? v[i++] : v[j++];
    }
    while (i < h) tmp[k++] = v[i++];
    while (j < n) tmp[k++] = v[j++];
    memcpy(v, tmp, (size_t)n * sizeof *v);
}

static Status parse_directory(Zip *z) {
    size_t eocd = 0;
    AGPT_TRY(find_eocd(z, &eocd));
    const uint8_t *r = z->buf + eocd;
    uint64_t count = rd16(r + 10), cd_size = rd32(r + 12), cd_off = rd32(r + 16);
    if (rd16(r + 4) != 0 || rd16(r + 6) != 0)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: a multi-disk (split) zip archive; join the parts first",
                         z->what);

    // ZIP64: a locator just before the EOCD points at the 64-bit record, whose fields win.
    if (eocd >= LOCATOR_SIZE && rd32(z->buf + eocd - LOCATOR_SIZE) == SIG_EOCD64_LOCATOR) {
        uint64_t off64 = rd64(z->buf + eocd - LOCATOR_SIZE + 8);
        if (!fits(z, off64, EOCD64_SIZE) || rd32(z->buf + off64) != SIG_EOCD64)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the ZIP64 locator points at offset %llu, where there is no "
                             "ZIP64 end-of-central-directory record; the file is truncated or corrupt", z->what,
                             (unsigned long long)off64);
        const uint8_t *r64 = z->buf + off64;
        count = rd64(r64 + 32);
        cd_size = rd64(r64 + 40);
        cd_off = rd64(r64 + 48);
    }
    if (!fits(z, cd_off, cd_size))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the zip central directory [%llu, +%llu) runs past the end of the "
                         "file (%zu bytes); the file is truncated", z->what, (unsigned long long)cd_off,
                         (unsigned long long)cd_size, z->len);
    if (count > cd_size / CENTRAL_SIZE)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the zip directory claims %llu entries in %llu bytes; the file is "
                         "corrupt", z->what, (unsigned long long)count, (unsigned long long)cd_size);

    z->entries = calloc((size_t)count + 1, sizeof *z->entries);
    z->by_name = calloc((size_t)count + 1, sizeof *z->by_name);
    z->inflated = calloc((size_t)count + 1, sizeof *z->inflated);
    if (!z->entries || !z->by_name || !z->inflated)
        return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory for %llu zip entries", z->what,
                         (unsigned long long)count);

    uint64_t p = cd_off, end = cd_off + cd_size;
    for (uint64_t i = 0; i < count; i++) {
        if (end - p < CENTRAL_SIZE || rd32(z->buf + p) != SIG_CENTRAL)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: zip directory entry %llu at offset %llu is not a central "
                             "directory header; the file is corrupt", z->what, (unsigned long long)i,
                             (unsigned long long)p);
        const uint8_t *c = z->buf + p;
        uint16_t flags = rd16(c + 8), name_len = rd16(c + 28), extra_len = rd16(c + 30), comment_len = rd16(c + 32);
        uint64_t total = (uint64_t)CENTRAL_SIZE + name_len + extra_len + comment_len;
        if (total > end - p)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: zip directory entry %llu runs past the directory; the file is "
                             "corrupt", z->what, (unsigned long long)i);
        ZipEntry *e = &z->entries[z->n];
        char *name = malloc((size_t)name_len + 1);
        if (!name) return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory", z->what);
        memcpy(name, c + CENTRAL_SIZE, name_len);
        name[name_len] = 0;
        e->name = name;
        z->n++;  // counted now so zip_close frees the name whatever happens next
        if (memchr(name, 0, name_len))
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: zip entry %llu has a NUL byte in its name; the file is corrupt",
                             z->what, (unsigned long long)i);
        if (flags & 1)
            return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: zip entry '%.80s' is encrypted; torch never writes "
                             "encrypted entries", z->what, name);
        e->method = rd16(c + 10);
        e->crc32 = rd32(c + 16);
        e->comp_size = rd32(c + 20);
        e->size = rd32(c + 24);
        uint64_t local = rd32(c + 42);
        AGPT_TRY(read_zip64_extra(z, c + CENTRAL_SIZE + name_len, extra_len, e, &local, e->size == 0xFFFFFFFFu,
                                  e->comp_size == 0xFFFFFFFFu, local == 0xFFFFFFFFu));
        p += total;

        if (!fits(z, local, LOCAL_SIZE) || rd32(z->buf + local) != SIG_LOCAL)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: zip entry '%.80s' points at offset %llu, where there is no "
                             "local header; the file is truncated or corrupt", z->what, name,
                             (unsigned long long)local);
        const uint8_t *l = z->buf + local;
        uint64_t data = local + LOCAL_SIZE + rd16(l + 26) + rd16(l + 28);
        if (!fits(z, data, e->comp_size))
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: zip entry '%.80s' (%llu bytes at offset %llu) runs past the "
                             "end of the file (%zu bytes); the file is truncated", z->what, name,
                             (unsigned long long)e->comp_size, (unsigned long long)data, z->len);
        if (e->method == 0 && e->comp_size != e->size)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: stored zip entry '%.80s' has %llu bytes but claims %llu "
                             "uncompressed; the file is corrupt", z->what, name,
                             (unsigned long long)e->comp_size, (unsigned long long)e->size);
        e->data_offset = data;
    }

    int *tmp = malloc(((size_t)z->n + 1) * sizeof *tmp);
    if (!tmp) return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory", z->what);
    for (int i = 0; i < z->n; i++) z->by_name[i] = i;
    merge_sort(z->by_name, tmp, z->n, z->entries);
    free(tmp);
    return AGPT_OK;
}

Status zip_open(const uint8_t *buf, size_t len, const char *what, Zip **out) {
    AGPT_CHECK_ARG(out != NULL, "zip_open: out is NULL");
    *out = NULL;
    AGPT_CHECK_ARG(buf != NULL || len == 0, "zip_open: buffer is NULL but length is %zu", len);
    Zip *z = calloc(1, sizeof *z);
    if (!z || !(z->what = strdup(what ? what : "<memory>"))) {
        free(z);
        return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory", what ? what : "<memory>");
    }
    z->buf = buf;
    z->len = len;
    Status s = parse_directory(z);
    if (s != AGPT_OK) {
        zip_close(z);
        return s;
    }
    *out = z;
    return AGPT_OK;
}

void zip_close(Zip *z) {
    if (!z) return;
    for (int i = 0; i < z->n; i++) {
        free((char *)z->entries[i].name);
        if (z->inflated) free(z->inflated[i]);
    }
    free(z->entries);
    free(z->by_name);
    free(z->inflated);
    free(z->what);
    free(z);
}

int zip_count(const Zip *z) { return z ? z->n : 0; }

const ZipEntry *zip_entry(const Zip *z, int i) { return (z && i >= 0 && i < z->n) ? &z->entries[i] : NULL; }

int zip_find(const Zip *z, const char *name) {
    if (!z || !name) return -1;
    int lo = 0, hi = z->n;  // first index whose name is >= name
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (strcmp(z->entries[z->by_name[mid]].name, name) < 0) lo = mid + 1;
        else hi = mid;
    }
    return (lo < z->n && strcmp(z->entries[z->by_name[lo]].name, name) == 0) ? z->by_name[lo] : -1;
}

static Status inflate_entry(Zip *z, const ZipEntry *e, uint8_t **out) {
    // DEFLATE expands at most ~1032:1, so a larger claim is a lie that would only make us allocate.
    if (e->size > ZIP_MAX_INFLATE || e->comp_size > ZIP_MAX_INFLATE || e->size / 1032 > e->comp_size + 1)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: compressed zip entry '%.80s' claims %llu bytes from %llu; refusing "
                         "(corrupt, or over the %llu-byte limit)", z->what, e->name, (unsigned long long)e->size,
                         (unsigned long long)e->comp_size, (unsigned long long)ZIP_MAX_INFLATE);
    uint8_t *dst = malloc((size_t)e->size + 1);
    if (!dst) return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory inflating '%.80s' (%llu bytes)", z->what,
                               e->name, (unsigned long long)e->size);
    z_stream s;
    memset(&s, 0, sizeof s);
    if (inflateInit2(&s, -MAX_WBITS) != Z_OK) {
        free(dst);
        return AGPT_FAIL(AGPT_ERR_OOM, "%s: cannot start zlib to inflate '%.80s'", z->what, e->name);
    }
    s.next_in = (Bytef *)(z->buf + e->data_offset);
    s.avail_in = (uInt)e->comp_size;
    s.next_out = dst;
    s.avail_out = (uInt)e->size + 1;  // one spare byte shows a stream longer than claimed
    int rc = inflate(&s, Z_FINISH);
    uint64_t produced = s.total_out;
    inflateEnd(&s);
    if (rc != Z_STREAM_END || produced != e->size) {
        free(dst);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: compressed zip entry '%.80s' does not inflate to its %llu bytes; "
                         "the file is corrupt", z->what, e->name, (unsigned long long)e->size);
    }
    uLong crc = crc32(0L, Z_NULL, 0);
    crc = crc32(crc, dst, (uInt)e->size);
    if ((uint32_t)crc != e->crc32) {
        free(dst);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: compressed zip entry '%.80s' fails its CRC-32 check; the file is "
                         "corrupt", z->what, e->name);
    }
    *out = dst;
    return AGPT_OK;
}

Status zip_data(Zip *z, int i, const uint8_t **data, size_t *size) {
    AGPT_CHECK_ARG(z && i >= 0 && i < z->n && data && size, "zip_data: bad arguments (entry %d)", i);
    const ZipEntry *e = &z->entries[i];
    if (e->method == 0) {
        *data = z->buf + e->data_offset;
        *size = (size_t)e->size;  // fits: it lies inside the buffer
        return AGPT_OK;
    }
    if (e->method != 8)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: zip entry '%.80s' uses compression method %u; torch writes "
                         "entries uncompressed (0), and only deflate (8) is read besides", z->what, e->name,
                         e->method);
    if (!z->inflated[i]) AGPT_TRY(inflate_entry(z, e, &z->inflated[i]));
    *data = z->inflated[i];
    *size = (size_t)e->size;
    return AGPT_OK;
}
