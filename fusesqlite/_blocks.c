/* Decoding a run of stored blocks (pages.py's format) with the GIL released.
 *
 * Read-ahead decodes ~50,000 blocks a second during a cold scan. In Python,
 * each block's checksum and lz4 call held the GIL, so the event loop serving
 * the kernel's reads waited for the loader and the loader for the event loop:
 * the daemon ran as if on one CPU. Here the Python objects are only looked at
 * (with the GIL) to collect pointers, and the work runs without it.
 *
 * Same format and checks as pages.decode_block: kind | checksum (4 bytes, big
 * endian) | payload; blocks whose checksum is the legacy crc32 are left to
 * Python (decode_run returns None).
 *
 * decode_rows takes the store's rows of a run as they come (Volume.read_run) and
 * also chooses each block's version: parsing 50,000 keys a second in Python cost a
 * third of each load.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <lz4.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

enum { RAW = 0, LZ4 = 1, ZERO = 2, XXH3 = 0x80, HEADER = 5 };

typedef struct {
    unsigned long long block_no;
    const unsigned char *value;
    Py_ssize_t len;
} item;

/* Decode one block into dst; NULL on success, else why not. */
static const char *decode_one(const item *it, unsigned long long ino, unsigned char *dst, Py_ssize_t block_size) {
    if (it->len < HEADER)
        return "value shorter than a block header";
    unsigned kind = it->value[0];
    unsigned long stored = ((unsigned long)it->value[1] << 24) | ((unsigned long)it->value[2] << 16) |
                           ((unsigned long)it->value[3] << 8) | (unsigned long)it->value[4];
    const unsigned char *payload = it->value + HEADER;
    size_t plen = (size_t)(it->len - HEADER);
    unsigned long long seed = (ino * 0x9E3779B97F4A7C15ULL) ^ (it->block_no * 0xC2B2AE3D27D4EB4FULL) ^ kind;
    if ((XXH3_64bits_withSeed(payload, plen, seed) & 0xFFFFFFFFULL) != stored)
        return "checksum mismatch";
    switch (kind & ~XXH3) {
    case ZERO:
        memset(dst, 0, (size_t)block_size);
        return NULL;
    case RAW:
        if ((Py_ssize_t)plen != block_size)
            return "raw block of the wrong size";
        memcpy(dst, payload, plen);
        return NULL;
    case LZ4: {
        if (plen < 4)
            return "lz4: no size prefix";
        unsigned long size = (unsigned long)payload[0] | ((unsigned long)payload[1] << 8) |
                             ((unsigned long)payload[2] << 16) | ((unsigned long)payload[3] << 24);
        if ((Py_ssize_t)size != block_size)
            return "lz4: decoded size is not the block size";
        int n = LZ4_decompress_safe((const char *)payload + 4, (char *)dst, (int)(plen - 4), (int)block_size);
        return n == (int)block_size ? NULL : "lz4: corrupt payload";
    }
    default:
        return "unknown block kind";
    }
}

/* Decode items into a new buffer of count blocks from block start (absent: zeros),
 * without the GIL; the objects the items point into must stay alive meanwhile.
 * Frees items. */
static PyObject *decode_items(item *items, Py_ssize_t n, unsigned long long ino, unsigned long long start,
                              Py_ssize_t count, Py_ssize_t block_size) {
    PyObject *buf = PyByteArray_FromStringAndSize(NULL, count * block_size);
    if (buf == NULL) {
        PyMem_Free(items);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(buf);
    const char *why = NULL;
    unsigned long long bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (n < count)
        memset(out, 0, (size_t)(count * block_size)); /* absent blocks are holes */
    for (Py_ssize_t k = 0; k < n && why == NULL; k++) {
        why = decode_one(&items[k], ino, out + (Py_ssize_t)(items[k].block_no - start) * block_size, block_size);
        bad = items[k].block_no;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(items);
    if (why != NULL) {
        Py_DECREF(buf);
        return PyErr_Format(PyExc_ValueError, "block %llu: %s", bad, why);
    }
    return buf;
}

static int bad_run(Py_ssize_t count, Py_ssize_t block_size) {
    if (count < 0 || block_size <= 0 || count > PY_SSIZE_T_MAX / block_size) {
        PyErr_Format(PyExc_ValueError, "bad run: %zd blocks of %zd bytes", count, block_size);
        return 1;
    }
    return 0;
}

static int has_xxh3(PyObject *value) {
    return PyBytes_GET_SIZE(value) >= 1 && (PyBytes_AS_STRING(value)[0] & XXH3);
}

static PyObject *decode_run(PyObject *self, PyObject *args) {
    PyObject *values;
    unsigned long long ino, start;
    Py_ssize_t count, block_size;
    if (!PyArg_ParseTuple(args, "O!KKnn", &PyDict_Type, &values, &ino, &start, &count, &block_size))
        return NULL;
    if (bad_run(count, block_size))
        return NULL;
    Py_ssize_t n = PyDict_Size(values);
    item *items = PyMem_Malloc(sizeof(item) * (size_t)(n ? n : 1));
    if (items == NULL)
        return PyErr_NoMemory();
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(values, &pos, &key, &value)) {
        unsigned long long b = PyLong_AsUnsignedLongLong(key);
        if (PyErr_Occurred()) {
            PyMem_Free(items);
            return NULL;
        }
        if (b < start || b - start >= (unsigned long long)count || !PyBytes_Check(value)) {
            PyMem_Free(items);
            return PyErr_Format(PyExc_ValueError, "block %llu: not a bytes value of this run", b);
        }
        if (!has_xxh3(value)) {
            PyMem_Free(items);
            Py_RETURN_NONE; /* a crc32 block: Python decodes this run */
        }
        items[i].block_no = b;
        items[i].value = (const unsigned char *)PyBytes_AS_STRING(value);
        items[i].len = PyBytes_GET_SIZE(value);
        i++;
    }
    /* the dict (and so its values) stays alive: the caller holds it for the call */
    return decode_items(items, i, ino, start, count, block_size);
}

typedef unsigned __int128 u128;

/* A non-negative integer of the tuple layer at *p: type code 0x14 + byte count, then
 * big-endian bytes, or a stamped version (keyspace.py: 0x1d, 11, then 11 bytes);
 * advances *p, or returns 0 for anything else. */
static int tuple_uint(const unsigned char **p, const unsigned char *end, u128 *out) {
    if (*p >= end)
        return 0;
    int n, skip;
    if (**p >= 0x14 && **p <= 0x1c) {
        n = **p - 0x14;
        skip = 1;
    } else if (**p == 0x1d && end - *p >= 2 && (*p)[1] == 11) {
        n = 11;
        skip = 2;
    } else {
        return 0;
    }
    if (end - *p < skip + n)
        return 0;
    u128 v = 0;
    for (int k = 0; k < n; k++)
        v = (v << 8) | (*p)[skip + k];
    *p += skip + n;
    *out = v;
    return 1;
}

/* Volume.read_run's rows -- (key, value) pairs in key order, each key the block
 * prefix (prefix_len bytes) then (block_no, version) -- decoded like decode_run: per
 * block of start .. start + count - 1 the last row at a version <= version. The
 * per-row work (key parsing, version choice) was a third of a read-ahead load in
 * Python. */
static PyObject *decode_rows(PyObject *self, PyObject *args) {
    PyObject *rows;
    Py_ssize_t prefix_len, count, block_size;
    unsigned long long ino, start, version_high, version_low;
    if (!PyArg_ParseTuple(args, "O!nKKnKKn", &PyList_Type, &rows, &prefix_len, &ino, &start, &count, &version_high,
                          &version_low, &block_size))
        return NULL;
    u128 version = ((u128)version_high << 64) | version_low;
    if (bad_run(count, block_size))
        return NULL;
    Py_ssize_t nrows = PyList_GET_SIZE(rows);
    item *items = PyMem_Malloc(sizeof(item) * (size_t)(count ? count : 1));
    if (items == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = 0;
    for (Py_ssize_t r = 0; r < nrows; r++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(row, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(row, 1)))
            goto python;
        PyObject *key = PyTuple_GET_ITEM(row, 0), *value = PyTuple_GET_ITEM(row, 1);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(key) + prefix_len;
        const unsigned char *end = (const unsigned char *)PyBytes_AS_STRING(key) + PyBytes_GET_SIZE(key);
        u128 b, ver;
        if (PyBytes_GET_SIZE(key) < prefix_len || !tuple_uint(&p, end, &b) || !tuple_uint(&p, end, &ver) || p != end)
            goto python;
        if (b < start)
            goto python; /* not this run's rows */
        if (b - start >= (u128)count)
            break; /* past the blocks asked for (rows come in key order) */
        if (ver > version)
            continue;
        if (!has_xxh3(value))
            goto python;
        if (n > 0 && items[n - 1].block_no == b)
            n--; /* an older version of the same block: the newer one wins */
        else if (n > 0 && items[n - 1].block_no > b)
            goto python; /* not in key order */
        items[n].block_no = (unsigned long long)b; /* below start + count */
        items[n].value = (const unsigned char *)PyBytes_AS_STRING(value);
        items[n].len = PyBytes_GET_SIZE(value);
        n++;
    }
    /* the list (and so its rows) stays alive: the caller holds it for the call */
    return decode_items(items, n, ino, start, count, block_size);
python:
    PyMem_Free(items);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_run", decode_run, METH_VARARGS,
     "decode_run(values, ino, start, count, block_size) -> bytearray, or None if a value has a crc32 checksum.\n"
     "ValueError names the first block that fails its checks."},
    {"decode_rows", decode_rows, METH_VARARGS,
     "decode_rows(rows, prefix_len, ino, start, count, version_high, version_low, block_size) -> bytearray,\n"
     "or None where the rows are not what it expects (Python then decodes them). ValueError as decode_run.\n"
     "The version is given as its high and low 64 bits (stamped versions are 88-bit integers)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blocks", NULL, -1, methods};

PyMODINIT_FUNC PyInit__blocks(void) { return PyModule_Create(&module); }
