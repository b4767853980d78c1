#define _DEFAULT_SOURCE  // strdup, strcasecmp
#include "train/dataset.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "runtime/image.h"

// ---- small helpers ----------------------------------------------------------------------------------------

static bool is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static bool is_file(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static bool has_ext(const char *name, const char *const *exts) {
    const char *dot = strrchr(name, '.');
    if (!dot) return false;
    for (; *exts; exts++)
        if (!strcasecmp(dot, *exts)) return true;
    return false;
}

static const char *const PNG_ONLY[] = {".png", NULL};
static const char *const IMAGE_EXTS[] = {".png", ".jpg", ".jpeg", ".bmp", NULL};

static int cmp_cstr(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void free_names(char **names, int n) {
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
}

// The entries of dir in name order: folders (want_dirs) or files with one of exts. NULL with *n = 0 when the
// folder cannot be read or holds none.
static char **list_dir(const char *dir, bool want_dirs, const char *const *exts, int *n) {
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) return NULL;
    char **names = NULL;
    int cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path) continue;
        if (want_dirs ? !is_dir(path) : (!is_file(path) || !has_ext(e->d_name, exts))) continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 64;
            char **p = realloc(names, (size_t)cap * sizeof *p);
            if (!p) break;
            names = p;
        }
        if (!(names[*n] = strdup(e->d_name))) break;
        (*n)++;
    }
    closedir(d);
    if (*n > 1) qsort(names, (size_t)*n, sizeof *names, cmp_cstr);
    return names;
}

static char *join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", a, b);
    return p;
}

static Status add_item(Dataset *d, const char *image, const char *mask, const char *cls, const char *defect,
                       bool anomalous, DatasetSplit split) {
    if (d->n == d->cap) {
        int cap = d->cap ? 2 * d->cap : 256;
        DatasetItem *p = realloc(d->items, (size_t)cap * sizeof *p);
        if (!p) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory listing the dataset");
        d->items = p, d->cap = cap;
    }
    DatasetItem *it = &d->items[d->n];
    *it = (DatasetItem){strdup(image), mask ? strdup(mask) : NULL, strdup(cls), strdup(defect), anomalous, split};
    if (!it->image || (mask && !it->mask) || !it->class_name || !it->defect) {
        free(it->image), free(it->mask), free(it->class_name), free(it->defect);
        return AGPT_FAIL(AGPT_ERR_OOM, "out of memory listing the dataset");
    }
    d->n++;
    return AGPT_OK;
}

static Status add_class(Dataset *d, const char *name) {
    for (int i = 0; i < d->n_classes; i++)
        if (!strcmp(d->classes[i], name)) return AGPT_OK;
    char **p = realloc(d->classes, (size_t)(d->n_classes + 1) * sizeof *p);
    if (!p) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
    d->classes = p;
    if (!(p[d->n_classes] = strdup(name))) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
    d->n_classes++;
    return AGPT_OK;
}

void dataset_note(Dataset *d, DatasetProblemKind kind, const char *what) {
    int k = d->problems[kind]++;
    if (k < DATASET_NAMED) d->named[kind][k] = strdup(what ? what : "?");
}

int dataset_problem_count(const Dataset *d) {
    int n = 0;
    for (int k = 0; k < DATASET_PROBLEM_KINDS; k++) n += d->problems[k];
    return n;
}

void dataset_problems_text(const Dataset *d, char *buf, size_t cap) {
    static const char *what[DATASET_PROBLEM_KINDS][2] = {
        {"anomalous image without a mask", "anomalous images without a mask"},
        {"unreadable image", "unreadable images"},
        {"class without test images", "classes without test images"},
        {"unusable CSV row", "unusable CSV rows"}};
    size_t used = 0;
    if (cap) buf[0] = 0;
    for (int k = 0; k < DATASET_PROBLEM_KINDS; k++) {
        int n = d->problems[k];
        if (!n || used >= cap) continue;
        used += (size_t)snprintf(buf + used, cap - used, "%s%d %s (", used ? "; " : "", n, what[k][n > 1]);
        for (int j = 0; j < n && j < DATASET_NAMED && used < cap; j++)
            used += (size_t)snprintf(buf + used, cap - used, "%s%s", j ? ", " : "", d->named[k][j] ? d->named[k][j] : "?");
        if (used < cap) used += (size_t)snprintf(buf + used, cap - used, "%s)", n > DATASET_NAMED ? ", ..." : "");
    }
}

void dataset_free(Dataset *d) {
    for (int i = 0; i < d->n; i++) {
        DatasetItem *it = &d->items[i];
        free(it->image), free(it->mask), free(it->class_name), free(it->defect);
    }
    free(d->items);
    free_names(d->classes, d->n_classes);
    for (int k = 0; k < DATASET_PROBLEM_KINDS; k++)
        for (int j = 0; j < DATASET_NAMED; j++) free(d->named[k][j]);
    free(d->root);
    memset(d, 0, sizeof *d);
}

static bool wanted(const char *cls, const char *const *classes, int n_classes) {
    if (!classes || n_classes == 0) return true;
    for (int i = 0; i < n_classes; i++)
        if (!strcmp(classes[i], cls)) return true;
    return false;
}

// The classes asked for that got no test items are named; an empty result is an error.
static Status finish_read(Dataset *d, const char *const *classes, int n_classes, const char *where) {
    const char *const *names = n_classes ? classes : (const char *const *)d->classes;
    int n_names = n_classes ? n_classes : d->n_classes;
    for (int c = 0; c < n_names; c++) {
        bool any = false;
        for (int i = 0; i < d->n && !any; i++)
            any = d->items[i].split == DATASET_TEST && !strcmp(d->items[i].class_name, names[c]);
        if (!any) dataset_note(d, DATASET_EMPTY_CLASS, names[c]);
    }
    if (d->n == 0) {
        char text[1024];
        dataset_problems_text(d, text, sizeof text);
        Status s = AGPT_FAIL(AGPT_ERR_ARG, "%s: no images found%s%s", where, text[0] ? ": " : "", text);
        dataset_free(d);
        return s;
    }
    return AGPT_OK;
}

// ---- MVTec-AD ---------------------------------------------------------------------------------------------

static Status mvtec_class(Dataset *d, const char *root, const char *cls) {
    char dir[4096];
    int n_files;
    Status s = AGPT_OK;
    // train/good: the normal training images
    snprintf(dir, sizeof dir, "%s/%s/train/good", root, cls);
    char **files = list_dir(dir, false, PNG_ONLY, &n_files);
    for (int i = 0; i < n_files && s == AGPT_OK; i++) {
        char *p = join(dir, files[i]);
        s = p ? add_item(d, p, NULL, cls, "good", false, DATASET_TRAIN) : AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
        free(p);
    }
    free_names(files, n_files);
    // test/<defect>: "good" is normal; the others have ground_truth/<defect>/<stem>_mask.png
    snprintf(dir, sizeof dir, "%s/%s/test", root, cls);
    int n_defects;
    char **defects = list_dir(dir, true, NULL, &n_defects);
    for (int k = 0; k < n_defects && s == AGPT_OK; k++) {
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%s", dir, defects[k]);
        files = list_dir(sub, false, PNG_ONLY, &n_files);
        bool good = !strcmp(defects[k], "good");
        for (int i = 0; i < n_files && s == AGPT_OK; i++) {
            char image[8448], mask[12800];
            snprintf(image, sizeof image, "%s/%s", sub, files[i]);
            const char *m = NULL;
            if (!good) {
                char stem[1024];
                snprintf(stem, sizeof stem, "%s", files[i]);
                char *dot = strrchr(stem, '.');
                if (dot) *dot = 0;
                snprintf(mask, sizeof mask, "%s/%s/ground_truth/%s/%s_mask.png", root, cls, defects[k], stem);
                if (is_file(mask)) m = mask;
                else dataset_note(d, DATASET_MISSING_MASK, image);
            }
            s = add_item(d, image, m, cls, defects[k], !good, DATASET_TEST);
        }
        free_names(files, n_files);
    }
    free_names(defects, n_defects);
    return s;
}

Status dataset_read_mvtec(const char *root, const char *const *classes, int n_classes, Dataset *out) {
    memset(out, 0, sizeof *out);
    out->format = DATASET_MVTEC;
    AGPT_CHECK_ARG(root && is_dir(root), "MVTec root %s is not a folder", root ? root : "(none)");
    out->root = strdup(root);
    int n_dirs;
    char **dirs = list_dir(root, true, NULL, &n_dirs);
    Status s = AGPT_OK;
    // A class is a folder holding test/ or train/ (license files and the like are skipped).
    for (int i = 0; i < n_dirs && s == AGPT_OK; i++) {
        char p[4096], q[4096];
        snprintf(p, sizeof p, "%s/%s/test", root, dirs[i]);
        snprintf(q, sizeof q, "%s/%s/train", root, dirs[i]);
        if ((!is_dir(p) && !is_dir(q)) || !wanted(dirs[i], classes, n_classes)) continue;
        s = add_class(out, dirs[i]);
        if (s == AGPT_OK) s = mvtec_class(out, root, dirs[i]);
    }
    free_names(dirs, n_dirs);
    if (s != AGPT_OK) {
        dataset_free(out);
        return s;
    }
    return finish_read(out, classes, n_classes, root);
}

// ---- VisA -------------------------------------------------------------------------------------------------

// Splits one CSV line (no quoted commas in 1cls.csv) into at most max fields, in place.
static int csv_fields(char *line, char **f, int max) {
    int n = 0;
    line[strcspn(line, "\r\n")] = 0;
    char *p = line;
    while (n < max) {
        f[n++] = p;
        char *c = strchr(p, ',');
        if (!c) break;
        *c = 0;
        p = c + 1;
    }
    return n;
}

Status dataset_read_visa(const char *root, const char *const *classes, int n_classes, Dataset *out) {
    memset(out, 0, sizeof *out);
    out->format = DATASET_VISA;
    AGPT_CHECK_ARG(root && is_dir(root), "VisA root %s is not a folder", root ? root : "(none)");
    char csv[4096];
    snprintf(csv, sizeof csv, "%s/split_csv/1cls.csv", root);
    FILE *f = fopen(csv, "r");
    if (!f) return AGPT_FAIL(AGPT_ERR_IO, "cannot read %s (the VisA layout has split_csv/1cls.csv)", csv);
    out->root = strdup(root);
    char line[8192];
    int row = 0;
    Status s = AGPT_OK;
    while (s == AGPT_OK && fgets(line, sizeof line, f)) {
        row++;
        char *fld[6];
        int n = csv_fields(line, fld, 6);
        if (row == 1 && !strcmp(fld[0], "object")) continue;  // the header
        if (n == 1 && !fld[0][0]) continue;                    // an empty line
        char where[64];
        snprintf(where, sizeof where, "1cls.csv row %d", row);
        if (n < 4 || !fld[0][0] || !fld[3][0] || (strcmp(fld[1], "train") && strcmp(fld[1], "test"))) {
            dataset_note(out, DATASET_BAD_ROW, where);
            continue;
        }
        if (!wanted(fld[0], classes, n_classes)) continue;
        if ((s = add_class(out, fld[0]))) break;
        char image[4096];
        snprintf(image, sizeof image, "%s/%s", root, fld[3]);
        // Normal when the parent folder is "Normal" (the reference's rule); the mask path from the image path:
        // Images -> Masks, .JPG -> .png.
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", fld[3]);
        char *slash = strrchr(parent, '/');
        if (slash) *slash = 0;
        const char *pdir = strrchr(parent, '/') ? strrchr(parent, '/') + 1 : parent;
        bool anomalous = !strstr(pdir, "Normal");
        bool test = !strcmp(fld[1], "test");
        char mask[12800];
        const char *m = NULL;
        if (anomalous && test) {
            char rel[4096];
            snprintf(rel, sizeof rel, "%s", fld[3]);
            char *img = strstr(rel, "Images");
            char *dot = strrchr(rel, '.');
            if (img && dot) {
                *img = 0;
                *dot = 0;
                snprintf(mask, sizeof mask, "%s/%sMasks%s.png", root, rel, img + 6);
                if (is_file(mask)) m = mask;
            }
            if (!m) dataset_note(out, DATASET_MISSING_MASK, image);
        }
        s = add_item(out, image, m, fld[0], anomalous ? "Anomaly" : "Normal", anomalous, test ? DATASET_TEST : DATASET_TRAIN);
    }
    fclose(f);
    if (s != AGPT_OK) {
        dataset_free(out);
        return s;
    }
    return finish_read(out, classes, n_classes, csv);
}

// ---- a plain folder ---------------------------------------------------------------------------------------

static char *find_mask(const char *masks_dir, const char *file) {
    char stem[1024];
    snprintf(stem, sizeof stem, "%s", file);
    char *dot = strrchr(stem, '.');
    if (dot) *dot = 0;
    static const char *const forms[] = {"%s/%s.png", "%s/%s_mask.png", "%s/%s.jpg", "%s/%s.jpeg"};
    char p[4096];
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        snprintf(p, sizeof p, forms[i], masks_dir, stem);
        if (is_file(p)) return strdup(p);
    }
    return NULL;
}

Status dataset_read_folder(const char *normal_dir, const char *abnormal_dir, const char *masks_dir,
                           const char *class_name, Dataset *out) {
    memset(out, 0, sizeof *out);
    out->format = DATASET_FOLDER;
    AGPT_CHECK_ARG(normal_dir && is_dir(normal_dir), "--normal %s is not a folder", normal_dir ? normal_dir : "(none)");
    AGPT_CHECK_ARG(!abnormal_dir || is_dir(abnormal_dir), "--abnormal %s is not a folder", abnormal_dir);
    AGPT_CHECK_ARG(!masks_dir || is_dir(masks_dir), "--masks %s is not a folder", masks_dir);
    AGPT_CHECK_ARG(class_name && *class_name, "the folder layout needs --class NAME");
    out->root = strdup(normal_dir);
    Status s = add_class(out, class_name);
    for (int pass = 0; pass < 2 && s == AGPT_OK; pass++) {
        const char *dir = pass ? abnormal_dir : normal_dir;
        if (!dir) continue;
        int n;
        char **files = list_dir(dir, false, IMAGE_EXTS, &n);
        for (int i = 0; i < n && s == AGPT_OK; i++) {
            char *p = join(dir, files[i]), *m = pass && masks_dir ? find_mask(masks_dir, files[i]) : NULL;
            if (pass && !m && p) dataset_note(out, DATASET_MISSING_MASK, p);
            s = p ? add_item(out, p, m, class_name, pass ? "abnormal" : "normal", pass == 1, DATASET_TEST)
                  : AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
            free(p), free(m);
        }
        free_names(files, n);
    }
    if (s != AGPT_OK) {
        dataset_free(out);
        return s;
    }
    return finish_read(out, NULL, 0, normal_dir);
}

// ---- references -------------------------------------------------------------------------------------------

Status dataset_references(const Dataset *d, const char *class_name, int k, int round, const char **paths) {
    static char mvtec_paths[8][4096];
    AGPT_CHECK_ARG(k >= 0 && k <= 8 && round >= 0, "references: k = %d (0..8), round = %d", k, round);
    if (d->format == DATASET_MVTEC) {
        for (int j = 0; j < k; j++) {
            snprintf(mvtec_paths[j], sizeof mvtec_paths[j], "%s/%s/train/good/%03d.png", d->root, class_name, round * 4 + j);
            if (!is_file(mvtec_paths[j]))
                return AGPT_FAIL(AGPT_ERR_ARG, "reference %s (k %d, round %d) is missing", mvtec_paths[j], k, round);
            paths[j] = mvtec_paths[j];
        }
        return AGPT_OK;
    }
    // VisA: the class's train rows in file order; the folder layout: its normal images in name order.
    int seen = 0, got = 0;
    for (int i = 0; i < d->n && got < k; i++) {
        const DatasetItem *it = &d->items[i];
        if (strcmp(it->class_name, class_name) || it->anomalous) continue;
        if (d->format == DATASET_VISA && it->split != DATASET_TRAIN) continue;
        if (seen++ >= round * 4) paths[got++] = it->image;
    }
    if (got < k)
        return AGPT_FAIL(AGPT_ERR_ARG, "class %s has %d %s, too few for k %d at round %d (needs %d)", class_name, seen,
                         d->format == DATASET_VISA ? "train rows in 1cls.csv" : "normal images", k, round, round * 4 + k);
    return AGPT_OK;
}

// ---- masks ------------------------------------------------------------------------------------------------

// PIL's bilinear resampling of one axis: a triangle filter, widened by the scale when shrinking, normalised.
// src [n_lines][in] with stride 1 along the axis (rows) or [in][n_lines] (columns, stride n_lines).
static void resample_axis(const double *src, int in, int out_n, int lines, bool along_rows, double *dst) {
    double scale = (double)in / out_n, fs = scale > 1 ? scale : 1, support = fs;
    for (int o = 0; o < out_n; o++) {
        double center = (o + 0.5) * scale, total = 0;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in) hi = in;
        double w[4096];
        int nw = 0;
        for (int x = lo; x < hi && nw < 4096; x++) {
            double t = fabs((x - center + 0.5) / fs);
            w[nw] = t < 1 ? 1 - t : 0;
            total += w[nw++];
        }
        for (int l = 0; l < lines; l++) {
            double acc = 0;
            for (int j = 0; j < nw; j++) {
                int x = lo + j;
                acc += w[j] * (along_rows ? src[(size_t)l * in + x] : src[(size_t)x * lines + l]);
            }
            acc = total > 0 ? acc / total : 0;
            acc = floor(acc + 0.5);  // 8-bit images: PIL rounds and clips after each pass
            acc = acc < 0 ? 0 : acc > 255 ? 255 : acc;
            if (along_rows) dst[(size_t)l * out_n + o] = acc;
            else dst[(size_t)o * lines + l] = acc;
        }
    }
}

// gray [h][w] -> [oh][ow], horizontal pass first.
static Status resize_bilinear(const double *gray, int w, int h, int ow, int oh, double *out) {
    double *tmp = malloc((size_t)h * ow * sizeof *tmp);
    if (!tmp) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory resizing a mask");
    resample_axis(gray, w, ow, h, true, tmp);
    resample_axis(tmp, h, oh, ow, false, out);
    free(tmp);
    return AGPT_OK;
}

// squash: Resize((size, size)) whatever the layout (training's geometry); else the layout's own.
static Status load_mask(const char *path, DatasetFormat format, bool squash, int size, uint8_t *out) {
    AGPT_CHECK_ARG(size > 0 && size <= 4096 && out, "dataset_load_mask: size %d", size);
    Image img;
    AGPT_TRY(image_load(path, &img));
    int w = img.width, h = img.height;
    double *gray = malloc((size_t)w * h * sizeof *gray);
    int ow = size, oh = size;
    if (format != DATASET_MVTEC && !squash) {  // the shorter side to size, as torchvision's Resize(int) rounds the other down
        if (w <= h) oh = (int)((double)size * h / w);
        else ow = (int)((double)size * w / h);
    }
    double *res = malloc((size_t)ow * oh * sizeof *res);
    Status s = gray && res ? AGPT_OK : AGPT_FAIL(AGPT_ERR_OOM, "out of memory for mask %s", path);
    if (s == AGPT_OK) {
        for (int64_t i = 0; i < (int64_t)w * h; i++) {  // PIL's "L": (299 R + 587 G + 114 B) / 1000, rounded
            const uint8_t *p = img.rgb + 3 * i;
            gray[i] = (double)((p[0] * 299 + p[1] * 587 + p[2] * 114 + 500) / 1000);
        }
        s = resize_bilinear(gray, w, h, ow, oh, res);
    }
    if (s == AGPT_OK) {
        int top = (int)lround((oh - size) / 2.0), left = (int)lround((ow - size) / 2.0), max = 0;
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++) {
                int v = (int)res[(size_t)(y + top) * ow + x + left];
                if (v > max) max = v;
            }
        double cut = format == DATASET_VISA ? max / 100.0 : 0.1 * 255;  // VisA: > max/100; MVTec: ToTensor > 0.1
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++) out[y * size + x] = res[(size_t)(y + top) * ow + x + left] > cut;
    }
    free(gray), free(res);
    image_free(&img);
    return s;
}

Status dataset_load_mask(const char *path, DatasetFormat format, int size, uint8_t *out) {
    return load_mask(path, format, false, size, out);
}

Status dataset_load_mask_squashed(const char *path, DatasetFormat format, int size, uint8_t *out) {
    return load_mask(path, format, true, size, out);
}
