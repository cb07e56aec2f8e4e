/*
 * Lets fusesqlite choose FUSE capabilities that pyfuse3 does not expose.
 *
 * libfuse turns some capabilities on by default before it calls the file
 * system's init callback, and pyfuse3's callback gives Python no way to turn
 * them off. One of them, auto_inval_data, makes the kernel drop a file's whole
 * page cache whenever a getattr shows a new mtime, and ask for the attributes
 * again before every read that follows a write. fusesqlite invalidates the
 * kernel's cache itself when another mount commits (coherence.py), so it does
 * not need that, and SQLite pays for it on every page it reads back inside a
 * big transaction.
 *
 * This module defines fuse_session_new. Loaded with RTLD_GLOBAL before pyfuse3
 * (fusesqlite/fuse_caps.py), it is the definition pyfuse3 binds to: it wraps the
 * init callback so that, after pyfuse3's own, the capabilities chosen with
 * configure() are cleared or set, then calls libfuse's fuse_session_new. Only
 * the public libfuse API is used (struct fuse_lowlevel_ops, fuse_conn_info).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 31
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdlib.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);
typedef void (*init_fn)(void *, struct fuse_conn_info *);

static init_fn app_init;
static unsigned clear_mask, set_mask;
static int negotiated;
static unsigned want, capable;
/* the session pyfuse3 made: valid from pyfuse3.init to pyfuse3.close */
static struct fuse_session *made;
static int (*made_fd)(struct fuse_session *);

static void init_hook(void *userdata, struct fuse_conn_info *conn)
{
    if (app_init)
        app_init(userdata, conn);
    conn->want = (conn->want & ~clear_mask) | (set_mask & conn->capable);
    want = conn->want;
    capable = conn->capable;
    negotiated = 1;
}

__attribute__((visibility("default")))
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    void *lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    session_new_fn real = lib ? (session_new_fn)dlsym(lib, "fuse_session_new") : NULL;
    made_fd = lib ? (int (*)(struct fuse_session *))dlsym(lib, "fuse_session_fd") : NULL;
    if (lib)
        dlclose(lib); /* RTLD_NOLOAD took a reference; libfuse stays loaded by its user */
    if (real == NULL || real == fuse_session_new || op_size < sizeof(init_fn)) {
        errno = ENOSYS;
        return NULL;
    }
    /* init is the first member of every libfuse 3 version of the struct; the
     * rest is copied as is, whatever its size (libfuse copies it again) */
    struct fuse_lowlevel_ops *ops = malloc(op_size);
    if (ops == NULL)
        return NULL;
    memcpy(ops, op, op_size);
    app_init = ops->init;
    ops->init = init_hook;
    struct fuse_session *session = real(args, ops, op_size, userdata);
    free(ops);
    made = session;
    return session;
}

static PyObject *configure(PyObject *self, PyObject *args)
{
    unsigned clear, set;
    if (!PyArg_ParseTuple(args, "II", &clear, &set))
        return NULL;
    clear_mask = clear;
    set_mask = set;
    Py_RETURN_NONE;
}

static PyObject *negotiated_caps(PyObject *self, PyObject *unused)
{
    if (!negotiated)
        Py_RETURN_NONE;
    return Py_BuildValue("(II)", want, capable);
}

static PyObject *session_fd(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(made != NULL && made_fd != NULL ? made_fd(made) : -1);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(clear, set): capabilities to clear from and set in what the mount asks of the kernel"},
    {"negotiated", negotiated_caps, METH_NOARGS,
     "(want, capable) once the kernel's INIT handshake went through this module, else None"},
    {"session_fd", session_fd, METH_NOARGS,
     "/dev/fuse's descriptor of the session made through this module (-1 if none); "
     "call it only between pyfuse3.init() and pyfuse3.close()"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fusesqlite._fuse_init", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fuse_init(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "AUTO_INVAL_DATA", FUSE_CAP_AUTO_INVAL_DATA) < 0
        || PyModule_AddIntConstant(m, "WRITEBACK_CACHE", FUSE_CAP_WRITEBACK_CACHE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
