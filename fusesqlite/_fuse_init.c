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
 *
 * It also wraps the write, read, fsync and flush callbacks: once fast_path() has
 * been given fusesqlite._journal's API, a journal's writes and reads that module
 * can answer, and every fsync and flush of a journal, are answered here, in C, and
 * only the rest reach pyfuse3 (_journal.c says why).
 *
 * And it wraps readdirplus: the mount answers opendir with ENOSYS, after which
 * the kernel never sends opendir or releasedir again (no_opendir) and lists every
 * directory with handle 0. pyfuse3 hands Python the handle only, so the hook puts
 * the directory's inode there (fusesqlite/fs/directories.py, listing).
 *
 * And, if asked (handle_killpriv), it adds FUSE_HANDLE_KILLPRIV to the INIT reply:
 * libfuse 3.14 offers FUSE_CAP_HANDLE_KILLPRIV and even sets it in `want` by default,
 * but never puts it in the reply it builds. The module defines fuse_session_mount
 * too (same RTLD_GLOBAL binding) and, after the real one, gives the session custom
 * I/O (fuse_session_custom_io: plain read and writev on the same descriptor) whose
 * writev sets the flag in the one reply that follows the init callback.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 31
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_journal.h"

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);
typedef void (*init_fn)(void *, struct fuse_conn_info *);

static init_fn app_init;
static unsigned clear_mask, set_mask;
static int negotiated;
static unsigned want, capable;
/* the session pyfuse3 made: valid from pyfuse3.init to pyfuse3.close */
static struct fuse_session *made;
static int (*made_fd)(struct fuse_session *);

/* pyfuse3's callbacks, and libfuse's replies (found in the copy pyfuse3 loaded) */
typedef void (*write_buf_fn)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t, struct fuse_file_info *);
typedef void (*read_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef void (*fsync_fn)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);
typedef void (*flush_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
typedef void (*readdir_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static write_buf_fn app_write_buf;
static read_fn app_read;
static fsync_fn app_fsync;
static flush_fn app_flush;
static readdir_fn app_readdirplus;
static int (*reply_write)(fuse_req_t, size_t);
static int (*reply_buf)(fuse_req_t, const char *, size_t);
static int (*reply_err)(fuse_req_t, int);
static const struct journal_api *fast;

/* FUSE_HANDLE_KILLPRIV in the kernel's protocol (linux/fuse.h, INIT flags) */
#define KERNEL_HANDLE_KILLPRIV (1u << 19)
static int killpriv_wanted; /* handle_killpriv() */
static int patch_init;      /* the next reply written is INIT's */
static int killpriv_sent;

static void write_buf_hook(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi)
{
    if (fast != NULL && bufv->count == 1 && bufv->idx == 0 && bufv->off == 0
        && !(bufv->buf[0].flags & FUSE_BUF_IS_FD)
        && fast->write(fi->fh, off, bufv->buf[0].mem, bufv->buf[0].size)) {
        reply_write(req, bufv->buf[0].size);
        return;
    }
    app_write_buf(req, ino, bufv, off, fi);
}

static void read_hook(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    const char *out;
    size_t len;
    char *to_free;
    if (fast != NULL && fast->read(fi->fh, off, size, &out, &len, &to_free)) {
        reply_buf(req, out, len);
        free(to_free);
        return;
    }
    app_read(req, ino, size, off, fi);
}

static void fsync_hook(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    if (fast != NULL && fast->settle(fi->fh, 0)) {
        reply_err(req, 0);
        return;
    }
    app_fsync(req, ino, datasync, fi);
}

static void flush_hook(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (fast != NULL && fast->settle(fi->fh, 1)) {
        reply_err(req, 0);
        return;
    }
    app_flush(req, ino, fi);
}

static void readdirplus_hook(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    app_readdirplus(req, ino, size, off, fi);
}

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    return read(fd, buf, len);
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    if (patch_init) {
        patch_init = 0;
        /* struct fuse_out_header {len, error, unique}, then struct fuse_init_out
         * {major, minor, max_readahead, flags, ...} (libfuse's own, writable copy) */
        int32_t error;
        uint32_t major, flags;
        if (count >= 2 && iov[0].iov_len >= 16 && iov[1].iov_len >= 16) {
            memcpy(&error, (char *)iov[0].iov_base + 4, 4);
            memcpy(&major, iov[1].iov_base, 4);
            if (error == 0 && major == 7) {
                memcpy(&flags, (char *)iov[1].iov_base + 12, 4);
                flags |= KERNEL_HANDLE_KILLPRIV;
                memcpy((char *)iov[1].iov_base + 12, &flags, 4);
                killpriv_sent = 1;
            }
        }
    }
    return writev(fd, iov, count);
}

__attribute__((visibility("default")))
int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
    static const struct fuse_custom_io io = {.writev = io_writev, .read = io_read};
    void *lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    int (*real)(struct fuse_session *, const char *) =
        lib ? (int (*)(struct fuse_session *, const char *))dlsym(lib, "fuse_session_mount") : NULL;
    int (*custom)(struct fuse_session *, const struct fuse_custom_io *, int) =
        lib ? (int (*)(struct fuse_session *, const struct fuse_custom_io *, int))dlsym(lib, "fuse_session_custom_io")
            : NULL;
    if (lib)
        dlclose(lib);
    if (real == NULL || real == fuse_session_mount)
        return -1;
    int res = real(se, mountpoint);
    if (res == 0 && killpriv_wanted && custom != NULL && se == made && made_fd != NULL && made_fd(se) >= 0
        && custom(se, &io, made_fd(se)) == 0)
        killpriv_wanted = 2; /* the INIT reply will go through io_writev */
    return res;
}

static void init_hook(void *userdata, struct fuse_conn_info *conn)
{
    if (app_init)
        app_init(userdata, conn);
    if (killpriv_wanted == 2 && (conn->capable & FUSE_CAP_HANDLE_KILLPRIV))
        patch_init = 1;
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
    reply_write = lib ? (int (*)(fuse_req_t, size_t))dlsym(lib, "fuse_reply_write") : NULL;
    reply_buf = lib ? (int (*)(fuse_req_t, const char *, size_t))dlsym(lib, "fuse_reply_buf") : NULL;
    reply_err = lib ? (int (*)(fuse_req_t, int))dlsym(lib, "fuse_reply_err") : NULL;
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
    app_write_buf = NULL;
    app_read = NULL;
    app_fsync = NULL;
    app_flush = NULL;
    app_readdirplus = NULL;
    if (op_size >= sizeof(struct fuse_lowlevel_ops) && reply_write != NULL && reply_buf != NULL
        && reply_err != NULL && ops->write_buf != NULL && ops->read != NULL && ops->fsync != NULL
        && ops->flush != NULL && ops->readdirplus != NULL) {
        app_write_buf = ops->write_buf;
        ops->write_buf = write_buf_hook;
        app_read = ops->read;
        ops->read = read_hook;
        app_fsync = ops->fsync;
        ops->fsync = fsync_hook;
        app_flush = ops->flush;
        ops->flush = flush_hook;
        app_readdirplus = ops->readdirplus;
        ops->readdirplus = readdirplus_hook;
    }
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

static PyObject *handle_killpriv(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    killpriv_wanted = on;
    killpriv_sent = 0;
    Py_RETURN_NONE;
}

static PyObject *killpriv(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(killpriv_sent);
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

static PyObject *fast_path(PyObject *self, PyObject *capsule)
{
    const struct journal_api *api = PyCapsule_GetPointer(capsule, JOURNAL_API_CAPSULE);
    if (api == NULL)
        return NULL;
    fast = api;
    Py_RETURN_NONE;
}

static PyObject *hooked(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(app_write_buf != NULL);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(clear, set): capabilities to clear from and set in what the mount asks of the kernel"},
    {"handle_killpriv", handle_killpriv, METH_O,
     "handle_killpriv(on): whether the next mount tells the kernel it clears set-user-ID bits itself "
     "(call before pyfuse3.init)"},
    {"killpriv", killpriv, METH_NOARGS, "whether the INIT reply told the kernel so"},
    {"negotiated", negotiated_caps, METH_NOARGS,
     "(want, capable) once the kernel's INIT handshake went through this module, else None"},
    {"session_fd", session_fd, METH_NOARGS,
     "/dev/fuse's descriptor of the session made through this module (-1 if none); "
     "call it only between pyfuse3.init() and pyfuse3.close()"},
    {"fast_path", fast_path, METH_O,
     "fast_path(capsule): answer what fusesqlite._journal.api() can in C (before pyfuse3.init)"},
    {"hooked", hooked, METH_NOARGS, "whether the session made through this module has the read, write, fsync, flush and readdirplus hooks"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fusesqlite._fuse_init", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fuse_init(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "AUTO_INVAL_DATA", FUSE_CAP_AUTO_INVAL_DATA) < 0
        || PyModule_AddIntConstant(m, "WRITEBACK_CACHE", FUSE_CAP_WRITEBACK_CACHE) < 0
        || PyModule_AddIntConstant(m, "NO_OPENDIR_SUPPORT", FUSE_CAP_NO_OPENDIR_SUPPORT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
