#define _POSIX_C_SOURCE 200809L  // open flags, mmap under -std=c11

#include "runtime/mapped_file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

Status mapped_file_open(const char *path, const char *kind, MappedFile *out) {
    AGPT_CHECK_ARG(out != NULL, "mapped_file_open: out is NULL");
    out->data = NULL;
    out->size = 0;
    AGPT_CHECK_ARG(path != NULL, "mapped_file_open: path is NULL");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return AGPT_FAIL(AGPT_ERR_IO, "cannot open %s: %s%s", path, strerror(errno),
                         errno == ENOENT ? "; check the path" : "");
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        return AGPT_FAIL(AGPT_ERR_IO, "cannot stat %s: %s", path, strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return AGPT_FAIL(AGPT_ERR_IO, "%s is not a regular file (a directory or device?); give the path of %s",
                         path, kind);
    }
    if (sb.st_size == 0) {
        close(fd);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s is empty (0 bytes); it was not written completely, or is not %s",
                         path, kind);
    }
    if ((uint64_t)sb.st_size > SIZE_MAX) {
        close(fd);
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s is too large to map in this address space", path);
    }
    size_t size = (size_t)sb.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_err = errno;
    close(fd);  // the mapping keeps the file alive
    if (map == MAP_FAILED)
        return AGPT_FAIL(AGPT_ERR_IO, "cannot map %s (%zu bytes): %s", path, size, strerror(map_err));
    out->data = map;
    out->size = size;
    return AGPT_OK;
}

void mapped_file_close(MappedFile *m) {
    if (!m || !m->data) return;
    munmap((void *)m->data, m->size);
    m->data = NULL;
    m->size = 0;
}
