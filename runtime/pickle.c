// The torch-pickle machine: opcodes build values on a stack (dicts, lists, tuples, strings, numbers, and
// tags for the whitelisted globals); REDUCE of a whitelisted global builds the value it would return;
// BINPERSID asks the caller for a storage's bytes. Nothing is imported, looked up or called. Every opcode
// argument, memo index, tuple arity and tensor geometry is checked.
#define _POSIX_C_SOURCE 200809L  // strdup under -std=c11

#include "runtime/pickle.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/text.h"

// ---------------------------------------------------------------------------------------------------------
// What a persistent id and GLOBAL may name.

const PthStorageType pth_storage_types[] = {
    {"FloatStorage", 4, DT_F32},  {"HalfStorage", 2, DT_F16},  {"BFloat16Storage", 2, DT_BF16},
    {"IntStorage", 4, DT_I32},    {"ByteStorage", 1, DT_U8},   {"LongStorage", 8, -1},
    {"DoubleStorage", 8, -1},     {"BoolStorage", 1, -1},      {"ShortStorage", 2, -1},
    {"CharStorage", 1, -1},
};
enum { N_STORAGE_TYPES = sizeof pth_storage_types / sizeof pth_storage_types[0] };

// The callables a state dict needs; anything else named by GLOBAL is refused on sight.
typedef enum Global {
    G_ORDERED_DICT = 0,
    G_REBUILD_TENSOR_V2,
    G_REBUILD_PARAMETER,
    G_REBUILD_PARAMETER_WITH_STATE,
    G_REBUILD_FROM_TYPE_V2,          // torch._tensor._rebuild_from_type_v2: a tensor with Python attributes
    G_TENSOR_TYPE,                   // torch.Tensor, only as _rebuild_from_type_v2's new_type
    G_STORAGE_BASE,  // + storage type index
} Global;

// ---------------------------------------------------------------------------------------------------------
// Pickle values. They live only while the pickle is read; the tensors found are copied out by the walk.

typedef enum Kind {
    V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_BYTES, V_TUPLE, V_LIST, V_DICT, V_GLOBAL, V_STORAGE, V_TENSOR,
} Kind;

static const char *kind_name(Kind k) {
    static const char *names[] = {"None", "bool", "int", "float", "str", "bytes", "tuple", "list", "dict",
                                  "global", "storage", "tensor"};
    return names[k];
}

typedef struct Value Value;
struct Value {
    Kind kind;
    bool walked;                     // dicts: already walked for tensors
    int64_t i;                       // V_BOOL, V_INT; V_GLOBAL: Global; V_TENSOR: index into Machine.tensors
    double f;                        // V_FLOAT
    char *s;                         // V_STR, V_BYTES: NUL-terminated copy
    size_t len;                      // V_STR, V_BYTES: bytes; V_TUPLE, V_LIST: items; V_DICT: pairs
    size_t cap;
    Value **items;                   // V_TUPLE, V_LIST: [len]; V_DICT: [2*len] key, value, key, value...
    const uint8_t *data;             // V_STORAGE: the storage's bytes
    size_t nbytes;                   // V_STORAGE
    int type;                        // V_STORAGE: index into pth_storage_types
};

typedef struct Machine {
    const char *what;                // names the pickle in messages
    PthStorageLoader load;
    void *ctx;
    PthTensor *out;                  // named tensors found by the walk
    int n_out, cap_out;
    size_t name_bytes;               // all names together, bounded by PTH_MAX_NAME_BYTES_TOTAL
    const uint8_t *p;                // the pickle
    size_t n, pos, op_pos;           // length, read position, start of the current opcode (for messages)
    Value **values;                  // every Value allocated, to free them all at the end
    size_t n_values, cap_values;
    Value **stack;
    size_t depth, cap_stack;
    size_t *marks;
    size_t n_marks, cap_marks;
    Value **memo;
    size_t cap_memo, memo_count;
    PthTensor *tensors;              // tensors built by REDUCE, not yet named
    size_t n_tensors, cap_tensors;
} Machine;

static Status oom(const Machine *m, const char *what) {
    return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory while reading %s", m->what, what);
}

#define PICKLE_FAIL(m, code, ...) \
    pickle_fail((m), (code), __FILE__, __LINE__, __VA_ARGS__)

static Status pickle_fail(const Machine *m, Status code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static Status pickle_fail(const Machine *m, Status code, const char *file, int line, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return agpt_fail_at(code, file, line, "%s byte %zu (opcode 0x%02x): %s", m->what, m->op_pos,
                        m->op_pos < m->n ? m->p[m->op_pos] : 0, msg);
}

// Grows *arr (of elem-sized items, capacity *cap) to hold at least need items.
static bool grow(void *arr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t c = *cap ? *cap : 8;
    while (c < need) {
        if (c > SIZE_MAX / 2 / elem) return false;
        c *= 2;
    }
    void *p = realloc(*(void **)arr, c * elem);
    if (!p) return false;
    *(void **)arr = p;
    *cap = c;
    return true;
}

static Value *new_value(Machine *m, Kind kind) {
    if (!grow(&m->values, &m->cap_values, m->n_values + 1, sizeof *m->values)) return NULL;
    Value *v = calloc(1, sizeof *v);
    if (!v) return NULL;
    v->kind = kind;
    m->values[m->n_values++] = v;
    return v;
}

static void free_machine(Machine *m) {
    for (size_t i = 0; i < m->n_values; i++) {
        free(m->values[i]->s);
        free(m->values[i]->items);
        free(m->values[i]);
    }
    free(m->values);
    free(m->stack);
    free(m->marks);
    free(m->memo);
    free(m->tensors);
}

static Status push(Machine *m, Value *v) {
    if (!v) return oom(m, "the pickle");
    if (!grow(&m->stack, &m->cap_stack, m->depth + 1, sizeof *m->stack)) return oom(m, "the pickle");
    m->stack[m->depth++] = v;
    return AGPT_OK;
}

static Status pop(Machine *m, Value **out) {
    size_t floor = m->n_marks ? m->marks[m->n_marks - 1] : 0;
    if (m->depth <= floor)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "the stack is empty%s; the file is corrupt",
                           m->n_marks ? " above the mark" : "");
    *out = m->stack[--m->depth];
    return AGPT_OK;
}

static Status top(Machine *m, Value **out) {
    size_t floor = m->n_marks ? m->marks[m->n_marks - 1] : 0;
    if (m->depth <= floor)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "the stack is empty; the file is corrupt");
    *out = m->stack[m->depth - 1];
    return AGPT_OK;
}

// Pops everything above the last MARK, and the mark: items [*first, depth_before) of the stack.
static Status pop_mark(Machine *m, size_t *first) {
    if (!m->n_marks) return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "no MARK to pop to; the file is corrupt");
    *first = m->marks[--m->n_marks];
    return AGPT_OK;
}

static Status need(Machine *m, size_t k) {
    if (k > m->n - m->pos)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "the opcode needs %zu more bytes but the pickle ends; the file is "
                           "truncated or corrupt", k);
    return AGPT_OK;
}

static uint64_t read_le(Machine *m, int k) {
    uint64_t v = 0;
    for (int i = k - 1; i >= 0; i--) v = v << 8 | m->p[m->pos + (size_t)i];
    m->pos += (size_t)k;
    return v;
}

static Status make_tuple(Machine *m, size_t first, Value **out) {
    Value *t = new_value(m, V_TUPLE);
    if (!t) return oom(m, "the pickle");
    size_t k = m->depth - first;
    if (k) {
        t->items = malloc(k * sizeof *t->items);
        if (!t->items) return oom(m, "the pickle");
        memcpy(t->items, m->stack + first, k * sizeof *t->items);
    }
    t->len = t->cap = k;
    m->depth = first;
    *out = t;
    return AGPT_OK;
}

static Status string_value(Machine *m, Kind kind, uint64_t len) {
    AGPT_TRY(need(m, len > SIZE_MAX ? SIZE_MAX : (size_t)len));
    Value *v = new_value(m, kind);
    if (!v || !(v->s = malloc((size_t)len + 1))) return oom(m, "the pickle");
    memcpy(v->s, m->p + m->pos, (size_t)len);
    v->s[len] = 0;
    v->len = (size_t)len;
    m->pos += (size_t)len;
    return push(m, v);
}

static Status int_value(Machine *m, int64_t i) {
    Value *v = new_value(m, V_INT);
    if (v) v->i = i;
    return push(m, v);
}

static Status dict_add(Machine *m, Value *d, Value *key, Value *val) {
    if (!grow(&d->items, &d->cap, 2 * d->len + 2, sizeof *d->items)) return oom(m, "the pickle");
    d->items[2 * d->len] = key;
    d->items[2 * d->len + 1] = val;
    d->len++;
    return AGPT_OK;
}

static Status list_add(Machine *m, Value *l, Value *val) {
    if (!grow(&l->items, &l->cap, l->len + 1, sizeof *l->items)) return oom(m, "the pickle");
    l->items[l->len++] = val;
    return AGPT_OK;
}

// GLOBAL / STACK_GLOBAL: the whitelist. Nothing is imported or looked up; the name only selects a tag.
static Status global_value(Machine *m, const char *module, const char *name) {
    int g = -1;
    if (strcmp(module, "collections") == 0 && strcmp(name, "OrderedDict") == 0) g = G_ORDERED_DICT;
    else if (strcmp(module, "torch._utils") == 0 && strcmp(name, "_rebuild_tensor_v2") == 0) g = G_REBUILD_TENSOR_V2;
    else if (strcmp(module, "torch._utils") == 0 && strcmp(name, "_rebuild_parameter") == 0) g = G_REBUILD_PARAMETER;
    else if (strcmp(module, "torch._utils") == 0 && strcmp(name, "_rebuild_parameter_with_state") == 0)
        g = G_REBUILD_PARAMETER_WITH_STATE;
    else if (strcmp(module, "torch._tensor") == 0 && strcmp(name, "_rebuild_from_type_v2") == 0)
        g = G_REBUILD_FROM_TYPE_V2;
    else if ((strcmp(module, "torch") == 0 || strcmp(module, "torch._tensor") == 0) && strcmp(name, "Tensor") == 0)
        g = G_TENSOR_TYPE;
    else if (strcmp(module, "torch") == 0)
        for (int t = 0; t < N_STORAGE_TYPES; t++)
            if (strcmp(name, pth_storage_types[t].name) == 0) g = G_STORAGE_BASE + t;
    if (g < 0) {
        char mb[SHOWN_MAX], nb[SHOWN_MAX];
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "the pickle asks for the global '%s.%s', which a state dict of "
                           "tensors never uses; refusing the file (this reader executes nothing; if the file is "
                           "trusted, convert it to safetensors with Python)", shown(module, mb), shown(name, nb));
    }
    Value *v = new_value(m, V_GLOBAL);
    if (v) v->i = g;
    return push(m, v);
}

// BINPERSID ('storage', torch.<T>Storage, key, location, numel): the bytes come from the caller.
static Status persistent_load(Machine *m, Value *pid) {
    if (pid->kind != V_TUPLE || pid->len != 5 || pid->items[0]->kind != V_STR ||
        strcmp(pid->items[0]->s, "storage") != 0)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "a persistent id is a %s of %zu items, not ('storage', type, key, "
                           "location, numel); the file is corrupt or not a torch checkpoint", kind_name(pid->kind),
                           pid->kind == V_TUPLE ? pid->len : 0);
    Value *type = pid->items[1], *key = pid->items[2], *numel = pid->items[4];
    if (type->kind != V_GLOBAL || type->i < G_STORAGE_BASE || key->kind != V_STR || numel->kind != V_INT ||
        numel->i < 0)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "a storage id has a %s type, a %s key and a %s size; expected a "
                           "torch storage class, a string and a count >= 0; the file is corrupt",
                           kind_name(type->kind), kind_name(key->kind), kind_name(numel->kind));
    int t = (int)(type->i - G_STORAGE_BASE);
    char kb[SHOWN_MAX];
    const uint8_t *data;
    size_t size;
    AGPT_TRY(m->load(m->ctx, key->s, &data, &size));
    uint64_t es = (uint64_t)pth_storage_types[t].elem_size;
    if ((uint64_t)numel->i > size / es)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "storage '%s' of %lld %s elements needs %llu bytes, but its entry "
                           "holds %zu; the file is truncated or corrupt", shown(key->s, kb), (long long)numel->i,
                           pth_storage_types[t].name, (unsigned long long)((uint64_t)numel->i * es), size);
    Value *v = new_value(m, V_STORAGE);
    if (!v) return oom(m, "the pickle");
    v->data = data;
    v->nbytes = (size_t)((uint64_t)numel->i * es);
    v->type = t;
    return push(m, v);
}

// Reads a tuple of ints into out[] (at most PTH_MAX_DIMS); what names it in messages.
static Status int_tuple(Machine *m, const Value *v, const char *what, int64_t *out, int *n) {
    if (v->kind != V_TUPLE)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "a tensor's %s is a %s, not a tuple; the file is corrupt", what,
                           kind_name(v->kind));
    if (v->len > PTH_MAX_DIMS)
        return PICKLE_FAIL(m, AGPT_ERR_UNSUPPORTED, "a tensor has %zu dims; at most %d are supported", v->len,
                           PTH_MAX_DIMS);
    for (size_t i = 0; i < v->len; i++) {
        if (v->items[i]->kind != V_INT || v->items[i]->i < 0)
            return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "a tensor's %s holds a %s%s; sizes and strides are ints >= "
                               "0; the file is corrupt", what, kind_name(v->items[i]->kind),
                               v->items[i]->kind == V_INT ? " < 0" : "");
        out[i] = v->items[i]->i;
    }
    *n = (int)v->len;
    return AGPT_OK;
}

// _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]).
static Status rebuild_tensor(Machine *m, const Value *args, Value **out) {
    if (args->len != 6 && args->len != 7)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "_rebuild_tensor_v2 gets %zu arguments, not 6 or 7; the file is "
                           "corrupt", args->len);
    const Value *storage = args->items[0], *offset = args->items[1];
    if (storage->kind != V_STORAGE || offset->kind != V_INT || offset->i < 0)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "_rebuild_tensor_v2 gets a %s storage and a %s offset; expected a "
                           "persistent storage and an int >= 0; the file is corrupt", kind_name(storage->kind),
                           kind_name(offset->kind));
    PthTensor t = {.type = storage->type, .offset = offset->i, .storage = storage->data,
                   .storage_nbytes = storage->nbytes};
    int nstride = 0;
    AGPT_TRY(int_tuple(m, args->items[2], "size", t.shape, &t.ndim));
    AGPT_TRY(int_tuple(m, args->items[3], "stride", t.stride, &nstride));
    if (nstride != t.ndim)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "a tensor has %d sizes but %d strides; the file is corrupt",
                           t.ndim, nstride);

    // numel, and the last element addressed: offset + sum((size-1)*stride), all overflow-checked.
    uint64_t es = (uint64_t)pth_storage_types[t.type].elem_size, storage_numel = storage->nbytes / es;
    uint64_t numel = 1, last = (uint64_t)t.offset;
    bool overflow = false, empty = false;
    for (int d = 0; d < t.ndim; d++) {
        uint64_t s = (uint64_t)t.shape[d];
        if (s == 0) empty = true;
        else if (__builtin_mul_overflow(numel, s, &numel)) overflow = true;
        uint64_t reach;
        if (s && (__builtin_mul_overflow(s - 1, (uint64_t)t.stride[d], &reach) ||
                  __builtin_add_overflow(last, reach, &last)))
            overflow = true;
    }
    if (empty) numel = 0;
    if (!empty && (overflow || numel > (uint64_t)INT64_MAX / es))
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "a %s tensor with %d dims has sizes and strides whose products "
                           "overflow 64 bits; the file is corrupt", pth_storage_types[t.type].name, t.ndim);
    if (!empty && last >= storage_numel)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "a %s tensor with %d dims addresses element %llu of a storage of "
                           "%llu elements; the file is corrupt", pth_storage_types[t.type].name, t.ndim,
                           (unsigned long long)last, (unsigned long long)storage_numel);
    if (empty && t.offset > (int64_t)storage_numel)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "an empty tensor starts at element %lld of a storage of %llu; the "
                           "file is corrupt", (long long)t.offset, (unsigned long long)storage_numel);
    t.numel = (int64_t)numel;
    t.span_nbytes = empty ? 0 : (size_t)((last - (uint64_t)t.offset + 1) * es);
    t.contiguous = true;  // an empty tensor is, whatever its strides
    int64_t expect = 1;
    for (int d = t.ndim - 1; d >= 0 && !empty; d--) {
        if (t.shape[d] != 1 && t.stride[d] != expect) t.contiguous = false;
        expect *= t.shape[d];  // no overflow: numel fits
    }

    if (!grow(&m->tensors, &m->cap_tensors, m->n_tensors + 1, sizeof *m->tensors)) return oom(m, "the pickle");
    m->tensors[m->n_tensors] = t;
    Value *v = new_value(m, V_TENSOR);
    if (!v) return oom(m, "the pickle");
    v->i = (int64_t)m->n_tensors++;
    *out = v;
    return AGPT_OK;
}

// callable(*args) for the whitelisted callables only, by building the value they would return.
static Status call_global(Machine *m, const Value *fn, const Value *args, Value **out) {
    Value *result = NULL;
    if (fn->kind != V_GLOBAL)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "REDUCE calls a %s; only whitelisted globals can be called; the "
                           "file is corrupt", kind_name(fn->kind));
    if (args->kind != V_TUPLE)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "REDUCE gets its arguments as a %s, not a tuple; the file is corrupt",
                           kind_name(args->kind));
    switch (fn->i) {
    case G_ORDERED_DICT:
        if (args->len != 0)
            return PICKLE_FAIL(m, AGPT_ERR_UNSUPPORTED, "OrderedDict is built from %zu arguments; only OrderedDict() "
                               "is supported", args->len);
        result = new_value(m, V_DICT);
        break;
    case G_REBUILD_TENSOR_V2:
        AGPT_TRY(rebuild_tensor(m, args, &result));
        break;
    case G_REBUILD_PARAMETER:
    case G_REBUILD_PARAMETER_WITH_STATE: {
        size_t want = fn->i == G_REBUILD_PARAMETER ? 3 : 4;
        if (args->len != want || args->items[0]->kind != V_TENSOR)
            return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "%s gets %zu arguments starting with a %s; expected %zu, "
                               "starting with a tensor; the file is corrupt",
                               fn->i == G_REBUILD_PARAMETER ? "_rebuild_parameter" : "_rebuild_parameter_with_state",
                               args->len, args->len ? kind_name(args->items[0]->kind) : "nothing", want);
        if (!grow(&m->tensors, &m->cap_tensors, m->n_tensors + 1, sizeof *m->tensors)) return oom(m, "the pickle");
        m->tensors[m->n_tensors] = m->tensors[args->items[0]->i];
        m->tensors[m->n_tensors].parameter = true;
        result = new_value(m, V_TENSOR);
        if (result) result->i = (int64_t)m->n_tensors++;
        break;
    }
    case G_REBUILD_FROM_TYPE_V2:  // (func, new_type, args, state): func(*args); state holds attributes only
        if (args->len != 4 || args->items[0]->kind != V_GLOBAL || args->items[0]->i == G_REBUILD_FROM_TYPE_V2 ||
            args->items[1]->kind != V_GLOBAL || args->items[1]->i != G_TENSOR_TYPE)
            return PICKLE_FAIL(m, AGPT_ERR_UNSUPPORTED, "_rebuild_from_type_v2 with %zu arguments, or a tensor "
                               "subclass other than torch.Tensor; not supported", args->len);
        AGPT_TRY(call_global(m, args->items[0], args->items[2], &result));
        break;
    case G_TENSOR_TYPE:
        return PICKLE_FAIL(m, AGPT_ERR_UNSUPPORTED, "REDUCE calls torch.Tensor; not supported");
    default:
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "REDUCE calls torch.%s, which a checkpoint never calls; the file "
                           "is corrupt", pth_storage_types[fn->i - G_STORAGE_BASE].name);
    }
    if (!result) return oom(m, "the pickle");
    *out = result;
    return AGPT_OK;
}

static Status reduce(Machine *m) {
    Value *args = NULL, *fn = NULL, *result = NULL;
    AGPT_TRY(pop(m, &args));
    AGPT_TRY(pop(m, &fn));
    AGPT_TRY(call_global(m, fn, args, &result));
    return push(m, result);
}

static Status memo_put(Machine *m, uint64_t idx) {
    Value *v = NULL;
    AGPT_TRY(top(m, &v));
    // Real memo indices count up from 0, one per PUT of at least 2 bytes: a larger one is corrupt.
    if (idx > m->n)
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "memo index %llu is beyond anything a %zu-byte pickle can hold; "
                           "the file is corrupt", (unsigned long long)idx, m->n);
    if (idx >= m->cap_memo) {
        size_t old = m->cap_memo;
        if (!grow(&m->memo, &m->cap_memo, (size_t)idx + 1, sizeof *m->memo)) return oom(m, "the pickle");
        memset(m->memo + old, 0, (m->cap_memo - old) * sizeof *m->memo);
    }
    if (!m->memo[idx]) m->memo_count++;
    m->memo[idx] = v;
    return AGPT_OK;
}

static Status memo_get(Machine *m, uint64_t idx) {
    if (idx >= m->cap_memo || !m->memo[idx])
        return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "memo entry %llu was never stored; the file is corrupt",
                           (unsigned long long)idx);
    return push(m, m->memo[idx]);
}

// A newline-terminated string of GLOBAL, copied NUL-terminated.
static Status read_line(Machine *m, char **out) {
    const uint8_t *nl = memchr(m->p + m->pos, '\n', m->n - m->pos);
    if (!nl) return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "GLOBAL's name has no end of line; the file is truncated");
    size_t len = (size_t)(nl - (m->p + m->pos));
    char *s = malloc(len + 1);
    if (!s) return oom(m, "the pickle");
    memcpy(s, m->p + m->pos, len);
    s[len] = 0;
    m->pos += len + 1;
    *out = s;
    return AGPT_OK;
}

// Runs the pickle up to STOP; *root is the value it returns.
static Status run_pickle(Machine *m, Value **root) {
    Value *a = NULL, *b = NULL, *c = NULL;
    size_t first = 0;
    while (m->pos < m->n) {
        m->op_pos = m->pos;
        uint8_t op = m->p[m->pos++];
        switch (op) {
        case 0x80:  // PROTO
            AGPT_TRY(need(m, 1));
            if (m->p[m->pos] > 5)
                return PICKLE_FAIL(m, AGPT_ERR_UNSUPPORTED, "pickle protocol %u; protocols up to 5 are read",
                                   m->p[m->pos]);
            m->pos++;
            break;
        case 0x95:  // FRAME: a length hint for buffered readers; the whole pickle is in memory
            AGPT_TRY(need(m, 8));
            m->pos += 8;
            break;
        case '}': AGPT_TRY(push(m, new_value(m, V_DICT))); break;
        case ']': AGPT_TRY(push(m, new_value(m, V_LIST))); break;
        case ')': AGPT_TRY(push(m, new_value(m, V_TUPLE))); break;
        case '(':  // MARK
            if (!grow(&m->marks, &m->cap_marks, m->n_marks + 1, sizeof *m->marks)) return oom(m, "the pickle");
            m->marks[m->n_marks++] = m->depth;
            break;
        case 't':  // TUPLE
            AGPT_TRY(pop_mark(m, &first));
            AGPT_TRY(make_tuple(m, first, &a));
            AGPT_TRY(push(m, a));
            break;
        case 0x85: case 0x86: case 0x87: {  // TUPLE1..3
            size_t k = (size_t)(op - 0x84), floor = m->n_marks ? m->marks[m->n_marks - 1] : 0;
            if (m->depth - floor < k)
                return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "TUPLE%zu with fewer items on the stack; the file is "
                                   "corrupt", k);
            AGPT_TRY(make_tuple(m, m->depth - k, &a));
            AGPT_TRY(push(m, a));
            break;
        }
        case 'X': AGPT_TRY(need(m, 4)); AGPT_TRY(string_value(m, V_STR, read_le(m, 4))); break;
        case 0x8c: AGPT_TRY(need(m, 1)); AGPT_TRY(string_value(m, V_STR, read_le(m, 1))); break;
        case 0x8d: AGPT_TRY(need(m, 8)); AGPT_TRY(string_value(m, V_STR, read_le(m, 8))); break;
        case 'B': AGPT_TRY(need(m, 4)); AGPT_TRY(string_value(m, V_BYTES, read_le(m, 4))); break;
        case 'C': AGPT_TRY(need(m, 1)); AGPT_TRY(string_value(m, V_BYTES, read_le(m, 1))); break;
        case 0x8e: AGPT_TRY(need(m, 8)); AGPT_TRY(string_value(m, V_BYTES, read_le(m, 8))); break;
        case 'J': AGPT_TRY(need(m, 4)); AGPT_TRY(int_value(m, (int32_t)(uint32_t)read_le(m, 4))); break;
        case 'K': AGPT_TRY(need(m, 1)); AGPT_TRY(int_value(m, (int64_t)read_le(m, 1))); break;
        case 'M': AGPT_TRY(need(m, 2)); AGPT_TRY(int_value(m, (int64_t)read_le(m, 2))); break;
        case 0x8a: {  // LONG1: n bytes, little-endian two's complement
            AGPT_TRY(need(m, 1));
            int k = m->p[m->pos++];
            if (k > 8)
                return PICKLE_FAIL(m, AGPT_ERR_UNSUPPORTED, "an integer of %d bytes; at most 8 are supported", k);
            AGPT_TRY(need(m, (size_t)k));
            uint64_t u = read_le(m, k);
            if (k > 0 && k < 8 && (u >> (8 * k - 1)) & 1) u |= ~(uint64_t)0 << (8 * k);  // sign-extend
            AGPT_TRY(int_value(m, (int64_t)u));
            break;
        }
        case 'G': {  // BINFLOAT: big-endian double
            AGPT_TRY(need(m, 8));
            uint64_t u = 0;
            for (int i = 0; i < 8; i++) u = u << 8 | m->p[m->pos + (size_t)i];
            m->pos += 8;
            Value *v = new_value(m, V_FLOAT);
            if (v) memcpy(&v->f, &u, sizeof v->f);
            AGPT_TRY(push(m, v));
            break;
        }
        case 0x88: case 0x89: {  // NEWTRUE, NEWFALSE
            Value *v = new_value(m, V_BOOL);
            if (v) v->i = op == 0x88;
            AGPT_TRY(push(m, v));
            break;
        }
        case 'N': AGPT_TRY(push(m, new_value(m, V_NONE))); break;
        case 'q': AGPT_TRY(need(m, 1)); AGPT_TRY(memo_put(m, read_le(m, 1))); break;
        case 'r': AGPT_TRY(need(m, 4)); AGPT_TRY(memo_put(m, read_le(m, 4))); break;
        case 0x94: AGPT_TRY(memo_put(m, m->memo_count)); break;  // MEMOIZE
        case 'h': AGPT_TRY(need(m, 1)); AGPT_TRY(memo_get(m, read_le(m, 1))); break;
        case 'j': AGPT_TRY(need(m, 4)); AGPT_TRY(memo_get(m, read_le(m, 4))); break;
        case 's':  // SETITEM
            AGPT_TRY(pop(m, &c));
            AGPT_TRY(pop(m, &b));
            AGPT_TRY(top(m, &a));
            if (a->kind != V_DICT)
                return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "SETITEM on a %s, not a dict; the file is corrupt",
                                   kind_name(a->kind));
            AGPT_TRY(dict_add(m, a, b, c));
            break;
        case 'u':  // SETITEMS
            AGPT_TRY(pop_mark(m, &first));
            if (first == 0 || m->stack[first - 1]->kind != V_DICT || (m->depth - first) % 2)
                return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "SETITEMS on a %s with %zu items; expected a dict and key, "
                                   "value pairs; the file is corrupt",
                                   first ? kind_name(m->stack[first - 1]->kind) : "nothing", m->depth - first);
            for (size_t i = first; i < m->depth; i += 2)
                AGPT_TRY(dict_add(m, m->stack[first - 1], m->stack[i], m->stack[i + 1]));
            m->depth = first;
            break;
        case 'a':  // APPEND
            AGPT_TRY(pop(m, &b));
            AGPT_TRY(top(m, &a));
            if (a->kind != V_LIST)
                return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "APPEND to a %s, not a list; the file is corrupt",
                                   kind_name(a->kind));
            AGPT_TRY(list_add(m, a, b));
            break;
        case 'e':  // APPENDS
            AGPT_TRY(pop_mark(m, &first));
            if (first == 0 || m->stack[first - 1]->kind != V_LIST)
                return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "APPENDS to a %s, not a list; the file is corrupt",
                                   first ? kind_name(m->stack[first - 1]->kind) : "nothing");
            for (size_t i = first; i < m->depth; i++) AGPT_TRY(list_add(m, m->stack[first - 1], m->stack[i]));
            m->depth = first;
            break;
        case 'c': {  // GLOBAL "module\nname\n"
            char *module = NULL, *name = NULL;
            Status s = read_line(m, &module);
            if (s == AGPT_OK) s = read_line(m, &name);
            if (s == AGPT_OK) s = global_value(m, module, name);
            free(module);
            free(name);
            AGPT_TRY(s);
            break;
        }
        case 0x93:  // STACK_GLOBAL
            AGPT_TRY(pop(m, &b));
            AGPT_TRY(pop(m, &a));
            if (a->kind != V_STR || b->kind != V_STR)
                return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "STACK_GLOBAL with a %s module and a %s name; the file is "
                                   "corrupt", kind_name(a->kind), kind_name(b->kind));
            AGPT_TRY(global_value(m, a->s, b->s));
            break;
        case 'R': AGPT_TRY(reduce(m)); break;
        case 'b':  // BUILD: object state (a state_dict's _metadata, a Parameter's attributes) changes no tensor
            AGPT_TRY(pop(m, &b));
            AGPT_TRY(top(m, &a));
            if (a->kind != V_DICT && a->kind != V_TENSOR)
                return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "BUILD on a %s; the file is corrupt", kind_name(a->kind));
            break;
        case 'Q':  // BINPERSID
            AGPT_TRY(pop(m, &a));
            AGPT_TRY(persistent_load(m, a));
            break;
        case '.':  // STOP
            AGPT_TRY(pop(m, root));
            return AGPT_OK;
        default:
            return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "opcode 0x%02x ('%c') is not one a torch state dict uses; "
                               "refusing the file (this reader executes nothing; if the file is trusted, convert "
                               "it to safetensors with Python)", op, op >= 0x20 && op < 0x7f ? op : '?');
        }
    }
    m->op_pos = m->n;
    return PICKLE_FAIL(m, AGPT_ERR_FORMAT, "the pickle ends without STOP; the file is truncated or corrupt");
}

// From the root dict to named tensors.

enum { MAX_NESTING = 64 };

static Status add_tensor(Machine *m, const PthTensor *t, const char *name) {
    if (m->n_out == m->cap_out) {
        size_t cap = (size_t)m->cap_out;
        if (m->n_out >= INT32_MAX / 2 || !grow(&m->out, &cap, (size_t)m->n_out + 1, sizeof *m->out))
            return oom(m, "the tensor list");
        m->cap_out = (int)cap;
    }
    PthTensor *dst = &m->out[m->n_out];
    *dst = *t;
    if (!(dst->name = strdup(name))) return oom(m, "the tensor list");
    m->n_out++;
    return AGPT_OK;
}

static Status walk(Machine *m, Value *dict, const char *prefix, int depth) {
    if (depth > MAX_NESTING)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: dicts nested more than %d deep; not a state dict",
                         m->what, MAX_NESTING);
    dict->walked = true;
    for (size_t i = 0; i < dict->len; i++) {
        Value *key = dict->items[2 * i], *val = dict->items[2 * i + 1];
        if (val->kind != V_TENSOR && !(val->kind == V_DICT && !val->walked)) continue;
        char num[24];
        const char *k;
        if (key->kind == V_STR) k = key->s;
        else if (key->kind == V_INT) snprintf(num, sizeof num, "%lld", (long long)key->i), k = num;
        else continue;
        size_t len = strlen(prefix) + strlen(k) + 2;
        // Keys shared through the memo could otherwise build names far longer than the pickle.
        if (len > PTH_MAX_NAME_BYTES || m->name_bytes + len > PTH_MAX_NAME_BYTES_TOTAL)
            return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: a tensor name of %zu bytes (or %zu bytes of names in "
                             "all) is over the limit of %d (%d in all); not a state dict, or corrupt", m->what,
                             len - 1, m->name_bytes + len, PTH_MAX_NAME_BYTES, PTH_MAX_NAME_BYTES_TOTAL);
        m->name_bytes += len;
        char *name = malloc(len);
        if (!name) return oom(m, "the tensor names");
        snprintf(name, len, "%s%s%s", prefix, prefix[0] ? "." : "", k);
        Status s = val->kind == V_TENSOR ? add_tensor(m, &m->tensors[val->i], name)
                                         : walk(m, val, name, depth + 1);
        free(name);
        AGPT_TRY(s);
    }
    return AGPT_OK;
}


Status pth_pickle_load(const uint8_t *pickle, size_t len, const char *what, PthStorageLoader load, void *ctx,
                       PthTensor **tensors, int *n) {
    *tensors = NULL;
    *n = 0;
    Machine m = {.what = what, .load = load, .ctx = ctx, .p = pickle, .n = len};
    Value *root = NULL;
    Status s = run_pickle(&m, &root);
    if (s == AGPT_OK && root->kind != V_DICT)
        s = AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: the checkpoint holds a %s, not a dict of tensors (a state dict)",
                      what, kind_name(root->kind));
    if (s == AGPT_OK) s = walk(&m, root, "", 0);
    free_machine(&m);
    if (s != AGPT_OK) {
        pth_tensors_free(m.out, m.n_out);
        return s;
    }
    *tensors = m.out;
    *n = m.n_out;
    return AGPT_OK;
}

void pth_tensors_free(PthTensor *tensors, int n) {
    for (int i = 0; i < n; i++) free(tensors[i].name);
    free(tensors);
}
