/*
 * A rollback journal's contents, and its writes and reads answered without Python.
 *
 * SQLite writes a journal in small pieces (for each page: its number, the page,
 * a checksum). Where a journal is direct_io (reopened journals, or no writeback
 * cache; files.py) every piece is a FUSE request; where it goes through the page
 * cache, the kernel's write-back sends it as a few large ones.
 * Through pyfuse3 each costs the daemon some 20-30 us of Python; most of them
 * change nothing but the bytes. So the bytes live here (Contents: memory up to
 * a limit, then an unlinked temporary file), and _fuse_init.c's session hook
 * asks this module first for every WRITE, READ, FSYNC and FLUSH of a registered
 * journal handle. Reads are always answered here. Which writes, fsyncs and
 * flushes are is decided in Python, by the journal's protocol (fs/journal.py),
 * and published as one word, Contents.answers: ANSWER_WRITES (a write that keeps
 * the header's first byte set, or lands away from the header: it cannot start or
 * end a transaction), ANSWER_FSYNCS, ANSWER_FLUSHES (nothing to do: the bytes are
 * already the daemon's). Nothing here looks at the journal's state itself.
 * Everything that can start or end a transaction goes to Python
 * (fusesqlite/fs/files.py), which sees the same contents through this type.
 * Such writes do not look at the write lease again: one lost meanwhile fails the
 * transaction at its commit (coherence/, Coherence._lose).
 *
 * Everything runs on the thread holding the GIL: pyfuse3 calls libfuse's
 * fuse_session_process_buf, and so these hooks, from its event loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "_journal.h"

/* Contents.answers: the requests of a journal C answers without Python */
#define ANSWER_WRITES 1  /* writes that keep the header's first byte set */
#define ANSWER_FSYNCS 2
#define ANSWER_FLUSHES 4

typedef struct {
    PyObject_HEAD
    char *mem;          /* the contents while in memory (size bytes of cap) */
    size_t cap;
    uint64_t size;
    int fd;             /* once spilled: an unlinked file of length size; else -1 */
    uint64_t spool;     /* bytes kept in memory before spilling */
    int first;          /* the first byte, 0 while empty */
    int answers;        /* ANSWER_* bits: what C answers, set by fs/journal.py only */
    int64_t changed_ns; /* time of the last change not yet taken, -1 if none */
    char *spill_dir;
} Contents;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int write_all(int fd, const char *buf, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t done = pwrite(fd, buf, n, (off_t)off);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        buf += done;
        n -= (size_t)done;
        off += (uint64_t)done;
    }
    return 0;
}

/* Move the contents to an unlinked file in spill_dir; 0 or an errno. */
static int spill(Contents *c)
{
    int fd = open(c->spill_dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
        size_t len = strlen(c->spill_dir) + 32;
        char *path = malloc(len);
        if (path == NULL)
            return ENOMEM;
        snprintf(path, len, "%s/fusesqlite-journal-XXXXXX", c->spill_dir);
        fd = mkostemp(path, O_CLOEXEC);
        if (fd >= 0)
            unlink(path);
        free(path);
    }
    if (fd < 0)
        return errno;
    int err = write_all(fd, c->mem, (size_t)c->size, 0);
    if (err == 0 && ftruncate(fd, (off_t)c->size) < 0)
        err = errno;
    if (err) {
        close(fd);
        return err;
    }
    free(c->mem);
    c->mem = NULL;
    c->cap = 0;
    c->fd = fd;
    return 0;
}

static int reserve(Contents *c, uint64_t end)
{
    if (end <= c->cap)
        return 0;
    size_t cap = c->cap ? c->cap : 4096;
    while (cap < end)
        cap *= 2;
    char *mem = realloc(c->mem, cap);
    if (mem == NULL)
        return ENOMEM;
    c->mem = mem;
    c->cap = cap;
    return 0;
}

/* Back to memory once empty: a journal truncated after a big transaction. */
static void unspill_if_empty(Contents *c)
{
    if (c->size == 0 && c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    if (c->size == 0 && c->cap > 65536) {
        free(c->mem);
        c->mem = NULL;
        c->cap = 0;
    }
}

static int contents_write(Contents *c, uint64_t off, const char *buf, size_t n)
{
    if (n == 0)
        return 0;
    uint64_t end = off + n;
    int err = 0;
    if (c->fd < 0 && end > c->spool)
        err = spill(c);
    if (err == 0 && c->fd < 0) {
        err = reserve(c, end);
        if (err == 0) {
            if (off > c->size)
                memset(c->mem + c->size, 0, (size_t)(off - c->size)); /* the gap reads as zeros */
            memcpy(c->mem + off, buf, n);
        }
    } else if (err == 0) {
        err = write_all(c->fd, buf, n, off);
    }
    if (err)
        return err;
    if (off == 0)
        c->first = (unsigned char)buf[0];
    else if (c->size == 0)
        c->first = 0;
    if (end > c->size)
        c->size = end;
    c->changed_ns = now_ns();
    return 0;
}

static int contents_truncate(Contents *c, uint64_t size)
{
    int err = 0;
    if (c->fd < 0 && size > c->spool)
        err = spill(c);
    if (err == 0 && c->fd < 0) {
        if (size > c->size) {
            err = reserve(c, size);
            if (err == 0)
                memset(c->mem + c->size, 0, (size_t)(size - c->size));
        }
    } else if (err == 0 && ftruncate(c->fd, (off_t)size) < 0) {
        err = errno; /* growing a file reads as zeros */
    }
    if (err)
        return err;
    if (size > c->size && c->size == 0)
        c->first = 0;
    c->size = size;
    c->changed_ns = now_ns();
    unspill_if_empty(c);
    return 0;
}

/* Up to n bytes at off: a pointer into memory, or a new buffer to free. */
static int contents_read(Contents *c, uint64_t off, size_t n, const char **out, size_t *len, char **to_free)
{
    *to_free = NULL;
    if (off >= c->size) {
        *out = "";
        *len = 0;
        return 0;
    }
    if (n > c->size - off)
        n = (size_t)(c->size - off);
    if (c->fd < 0) {
        *out = c->mem + off;
        *len = n;
        return 0;
    }
    char *buf = malloc(n ? n : 1);
    if (buf == NULL)
        return ENOMEM;
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(c->fd, buf + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int err = errno;
            free(buf);
            return err;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    *out = buf;
    *len = got;
    *to_free = buf;
    return 0;
}

static void contents_close(Contents *c)
{
    free(c->mem);
    c->mem = NULL;
    c->cap = 0;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->size = 0;
}

/* -- the Python type --------------------------------------------------------------- */

static PyObject *os_error(int err)
{
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static int Contents_init(Contents *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"spool_bytes", "spill_dir", NULL};
    unsigned long long spool;
    PyObject *dir_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KO&", kwlist, &spool, PyUnicode_FSConverter, &dir_obj))
        return -1;
    char *dir = strdup(PyBytes_AS_STRING(dir_obj));
    Py_DECREF(dir_obj);
    if (dir == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    contents_close(self);
    free(self->spill_dir);
    self->spill_dir = dir;
    self->spool = spool;
    self->first = 0;
    self->answers = 0;
    self->changed_ns = -1;
    return 0;
}

static PyObject *Contents_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Contents *self = (Contents *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->fd = -1;
        self->changed_ns = -1;
    }
    return (PyObject *)self;
}

static void Contents_dealloc(Contents *self)
{
    contents_close(self);
    free(self->spill_dir);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Contents_write(Contents *self, PyObject *args)
{
    unsigned long long off;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Ky*", &off, &data))
        return NULL;
    int err = contents_write(self, off, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    if (err)
        return os_error(err);
    Py_RETURN_NONE;
}

static PyObject *Contents_read(Contents *self, PyObject *args)
{
    unsigned long long off;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "Kn", &off, &n))
        return NULL;
    if (n < 0)
        n = 0;
    const char *out;
    size_t len;
    char *to_free;
    int err = contents_read(self, off, (size_t)n, &out, &len, &to_free);
    if (err)
        return os_error(err);
    PyObject *r = PyBytes_FromStringAndSize(out, (Py_ssize_t)len);
    free(to_free);
    return r;
}

static PyObject *Contents_truncate(Contents *self, PyObject *args)
{
    unsigned long long size;
    if (!PyArg_ParseTuple(args, "K", &size))
        return NULL;
    int err = contents_truncate(self, size);
    if (err)
        return os_error(err);
    Py_RETURN_NONE;
}

static PyObject *Contents_take_changed(Contents *self, PyObject *unused)
{
    int64_t t = self->changed_ns;
    self->changed_ns = -1;
    if (t < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(t);
}

static PyObject *Contents_close_py(Contents *self, PyObject *unused)
{
    contents_close(self);
    Py_RETURN_NONE;
}

static PyObject *Contents_get_size(Contents *self, void *closure) { return PyLong_FromUnsignedLongLong(self->size); }
static PyObject *Contents_get_first(Contents *self, void *closure) { return PyLong_FromLong(self->first); }
static PyObject *Contents_get_spilled(Contents *self, void *closure) { return PyBool_FromLong(self->fd >= 0); }
static PyObject *Contents_get_answers(Contents *self, void *closure) { return PyLong_FromLong(self->answers); }

static int Contents_set_answers(Contents *self, PyObject *value, void *closure)
{
    long v = value == NULL ? 0 : PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > (ANSWER_WRITES | ANSWER_FSYNCS | ANSWER_FLUSHES)) {
        PyErr_SetString(PyExc_ValueError, "answers: a combination of ANSWER_WRITES, ANSWER_FSYNCS, ANSWER_FLUSHES");
        return -1;
    }
    self->answers = (int)v;
    return 0;
}

static PyMethodDef Contents_methods[] = {
    {"write", (PyCFunction)Contents_write, METH_VARARGS, "write(offset, data): past the end, the gap reads as zeros"},
    {"read", (PyCFunction)Contents_read, METH_VARARGS, "read(offset, length) -> bytes (fewer at the end)"},
    {"truncate", (PyCFunction)Contents_truncate, METH_VARARGS, "truncate(size): growing reads as zeros"},
    {"take_changed", (PyCFunction)Contents_take_changed, METH_NOARGS,
     "time (ns) of the last change since the previous call, or None"},
    {"close", (PyCFunction)Contents_close_py, METH_NOARGS, "drop the contents (memory and spill file)"},
    {NULL},
};

static PyGetSetDef Contents_getset[] = {
    {"size", (getter)Contents_get_size, NULL, "length in bytes", NULL},
    {"first", (getter)Contents_get_first, NULL, "the first byte (0 while empty)", NULL},
    {"spilled", (getter)Contents_get_spilled, NULL, "whether the contents are in the spill file", NULL},
    {"answers", (getter)Contents_get_answers, (setter)Contents_set_answers,
     "ANSWER_* bits: the writes, fsyncs and flushes C answers without Python (fs/journal.py sets them)", NULL},
    {NULL},
};

static PyTypeObject ContentsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fusesqlite._journal.Contents",
    .tp_doc = "Contents(spool_bytes, spill_dir): a journal's bytes, in memory up to spool_bytes, "
              "then in an unlinked file in spill_dir",
    .tp_basicsize = sizeof(Contents),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Contents_new,
    .tp_init = (initproc)Contents_init,
    .tp_dealloc = (destructor)Contents_dealloc,
    .tp_methods = Contents_methods,
    .tp_getset = Contents_getset,
};

/* -- journals by file handle, and the requests answered in C ----------------------- */

#define SLOTS 256
static struct {
    uint64_t fh;
    Contents *c;
} slots[SLOTS];
static int used;
static unsigned long long fast_writes, fast_reads, fast_syncs;

static Contents *find(uint64_t fh)
{
    for (int i = 0; i < used; i++)
        if (slots[i].fh == fh)
            return slots[i].c;
    return NULL;
}

/* Whether C answers a write of size bytes at off starting with first_byte: what
 * Python published allows writes, and this one cannot zero the header. */
static int answers_write(const Contents *c, int64_t off, const char *buf, size_t size)
{
    return (c->answers & ANSWER_WRITES) && off >= 0 && size > 0 && (off != 0 || buf[0] != 0);
}

static int answers_sync(const Contents *c, int flush)
{
    return (c->answers & (flush ? ANSWER_FLUSHES : ANSWER_FSYNCS)) != 0;
}

static int fast_write(uint64_t fh, int64_t off, const char *buf, size_t size)
{
    Contents *c = find(fh);
    if (c == NULL || !answers_write(c, off, buf, size))
        return 0;
    if (contents_write(c, (uint64_t)off, buf, size) != 0)
        return 0; /* Python tries again and reports the error */
    fast_writes++;
    return 1;
}

static int fast_read(uint64_t fh, int64_t off, size_t size, const char **out, size_t *len, char **to_free)
{
    Contents *c = find(fh);
    if (c == NULL || off < 0 || contents_read(c, (uint64_t)off, size, out, len, to_free) != 0)
        return 0;
    fast_reads++;
    return 1;
}

static int fast_sync(uint64_t fh, int flush)
{
    Contents *c = find(fh);
    if (c == NULL || !answers_sync(c, flush))
        return 0;
    fast_syncs++;
    return 1;
}

static const struct journal_api api = {fast_write, fast_read, fast_sync};

static PyObject *register_fh(PyObject *self, PyObject *args)
{
    unsigned long long fh;
    PyObject *c;
    if (!PyArg_ParseTuple(args, "KO!", &fh, &ContentsType, &c))
        return NULL;
    if (find(fh) != NULL || used == SLOTS)
        Py_RETURN_FALSE; /* then Python answers this handle's requests */
    Py_INCREF(c);
    slots[used].fh = fh;
    slots[used].c = (Contents *)c;
    used++;
    Py_RETURN_TRUE;
}

static PyObject *unregister_fh(PyObject *self, PyObject *args)
{
    unsigned long long fh;
    if (!PyArg_ParseTuple(args, "K", &fh))
        return NULL;
    for (int i = 0; i < used; i++) {
        if (slots[i].fh == fh) {
            Contents *c = slots[i].c;
            slots[i] = slots[--used];
            Py_DECREF(c);
            break;
        }
    }
    Py_RETURN_NONE;
}

/* What the session hook would do with a request on fh, without doing it: the
 * protocol tests play SQLite's requests as the kernel would send them and give C
 * the ones it answers (tests/test_journal_protocol.py). */
static PyObject *answers_py(PyObject *self, PyObject *args)
{
    unsigned long long fh;
    const char *op;
    long long off = 0;
    Py_buffer data = {0};
    if (!PyArg_ParseTuple(args, "Ks|Ly*", &fh, &op, &off, &data))
        return NULL;
    Contents *c = find(fh);
    int yes = 0;
    if (c == NULL)
        yes = 0;
    else if (strcmp(op, "write") == 0)
        yes = answers_write(c, off, data.buf, (size_t)data.len);
    else if (strcmp(op, "read") == 0)
        yes = 1;
    else if (strcmp(op, "fsync") == 0 || strcmp(op, "flush") == 0)
        yes = answers_sync(c, op[1] == 'l');
    else {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "answers: no request %s (write, read, fsync, flush)", op);
        return NULL;
    }
    PyBuffer_Release(&data);
    return PyBool_FromLong(yes);
}

static PyObject *api_capsule(PyObject *self, PyObject *unused)
{
    return PyCapsule_New((void *)&api, JOURNAL_API_CAPSULE, NULL);
}

static PyObject *stats(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(KKKi)", fast_writes, fast_reads, fast_syncs, used);
}

static PyMethodDef methods[] = {
    {"register", register_fh, METH_VARARGS,
     "register(fh, contents) -> bool: answer this journal handle's requests in C where contents.answers says"},
    {"answers", answers_py, METH_VARARGS,
     "answers(fh, 'write'|'read'|'fsync'|'flush', offset=0, data=b'') -> bool: whether C answers that request"},
    {"unregister", unregister_fh, METH_VARARGS, "unregister(fh): the handle is released"},
    {"api", api_capsule, METH_NOARGS, "the capsule _fuse_init.fast_path() takes"},
    {"stats", stats, METH_NOARGS, "(writes, reads, fsyncs and flushes answered in C, handles registered)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fusesqlite._journal", NULL, -1, methods};

PyMODINIT_FUNC PyInit__journal(void)
{
    if (PyType_Ready(&ContentsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "ANSWER_WRITES", ANSWER_WRITES) < 0
        || PyModule_AddIntConstant(m, "ANSWER_FSYNCS", ANSWER_FSYNCS) < 0
        || PyModule_AddIntConstant(m, "ANSWER_FLUSHES", ANSWER_FLUSHES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ContentsType);
    if (PyModule_AddObject(m, "Contents", (PyObject *)&ContentsType) < 0) {
        Py_DECREF(&ContentsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
