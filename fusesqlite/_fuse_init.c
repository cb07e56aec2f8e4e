/*
 * Lets fusesqlite choose FUSE capabilities that pyfuse3 does not expose.
 *
 * libfuse turns some capabilities on by default before it calls the file
 * system's init callback, and pyfuse3's callback gives Python no way to turn
 * them off. One of them, auto_inval_data, makes the kernel drop a file's whole
 * page cache whenever a getattr shows a new mtime, and ask for the attributes
 * again before every read that follows a write. fusesqlite invalidates the
 * kernel's cache itself when another mount commits (coherence/), so it does
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
 * writev sets the flag in the one reply that follows the init callback. libfuse 3.17
 * sends the flag itself when `want` has it, so there the init hook only sets it.
 *
 * Fences. All of this leans on how libfuse and pyfuse3 work inside, so it engages
 * only with what it was written and tested for: the libfuse this process loaded
 * (found by walking the loaded objects, whatever its soname: libfuse3.so.3 for
 * 3.14, libfuse3.so.4 for 3.17) must be 3.14 or 3.17 (fuse_version()) and
 * the version whose headers this module was built against, and every function
 * it forwards to is taken by its symbol version (3.17 has two fuse_session_custom_io,
 * and pyfuse3 built against 3.17 calls fuse_session_new_versioned instead of
 * fuse_session_new). Otherwise each interposed function hands its call to libfuse
 * unchanged and status() says why; fusesqlite/fuse_caps.py checks pyfuse3's version
 * before it loads this module at all, and logs the one line that says why.
 */
#define _GNU_SOURCE 1 /* dlvsym, dl_iterate_phdr */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 31
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <link.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_journal.h"

/* libfuse 3.17's headers make fuse_session_new a macro around fuse_session_new_versioned;
 * this module defines the function libfuse exports under that name */
#ifdef fuse_session_new
#undef fuse_session_new
#endif
/* complete in libfuse 3.17's headers; only passed on here */
struct libfuse_version;

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t, void *);
typedef struct fuse_session *(*session_new_versioned_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
                                                         struct libfuse_version *, void *);
typedef int (*session_mount_fn)(struct fuse_session *, const char *);
/* fuse_session_custom_io@FUSE_3.0: three arguments in 3.14 and 3.17 alike (3.17's
 * default version, @@FUSE_3.17, takes the size of the struct as a fourth) */
typedef int (*custom_io_fn)(struct fuse_session *, const struct fuse_custom_io *, int);
typedef void (*init_fn)(void *, struct fuse_conn_info *);

/* the libfuse versions the hooks were written and tested for (fuse_version()) */
static const int tested_versions[] = {314, 317};
#define BUILT_FOR FUSE_MAKE_VERSION(FUSE_MAJOR_VERSION, FUSE_MINOR_VERSION)

/* The libfuse this process loaded, found once, at the first call pyfuse3 makes
 * (it is loaded by then: pyfuse3 links it). */
static struct {
    int resolved;
    int engaged;     /* the hooks are on; else calls go to libfuse unchanged */
    char why[400];   /* why not engaged */
    char path[256];  /* the loaded object's file name */
    int version;     /* its fuse_version(): 314, 317 */
    char release[32]; /* its fuse_pkgversion(): "3.17.2" */
    session_new_fn new30;
    session_new_versioned_fn new_versioned;
    session_mount_fn mount;
    custom_io_fn custom_io;
} lf;

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
    if (fast != NULL && fast->sync(fi->fh, 0)) {
        reply_err(req, 0);
        return;
    }
    app_fsync(req, ino, datasync, fi);
}

static void flush_hook(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (fast != NULL && fast->sync(fi->fh, 1)) {
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

static void refuse(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(lf.why, sizeof lf.why, fmt, ap);
    va_end(ap);
    lf.engaged = 0;
}

static int count_libfuse(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    const char *base = strrchr(info->dlpi_name, '/');
    base = base != NULL ? base + 1 : info->dlpi_name;
    if (strncmp(base, "libfuse3.so.", 12) == 0) {
        int *found = data;
        if (*found == 0)
            snprintf(lf.path, sizeof lf.path, "%s", info->dlpi_name);
        ++*found;
    }
    return 0;
}

static const char *soname(void)
{
    const char *base = strrchr(lf.path, '/');
    return base != NULL ? base + 1 : lf.path;
}

/* Find the loaded libfuse, the functions this module forwards to, and whether the
 * hooks may engage with it. */
static void resolve(void)
{
    if (lf.resolved)
        return;
    lf.resolved = 1;
    int found = 0;
    dl_iterate_phdr(count_libfuse, &found);
    if (found == 0) {
        refuse("no libfuse3 is loaded in this process");
        return;
    }
    /* RTLD_NOLOAD: the copy pyfuse3 loaded, whichever scope it is in; the reference
     * taken is kept (libfuse stays loaded while pyfuse3 is) */
    void *lib = dlopen(lf.path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) {
        refuse("%s is loaded but dlopen cannot name it: %s", lf.path, dlerror());
        return;
    }
    lf.new30 = (session_new_fn)dlvsym(lib, "fuse_session_new", "FUSE_3.0");
    lf.new_versioned = (session_new_versioned_fn)dlvsym(lib, "fuse_session_new_versioned", "FUSE_3.17");
    lf.mount = (session_mount_fn)dlvsym(lib, "fuse_session_mount", "FUSE_3.0");
    lf.custom_io = (custom_io_fn)dlvsym(lib, "fuse_session_custom_io", "FUSE_3.0");
    /* fuse_version(): FUSE_VERSION, 314 or 317 (fuse_lowlevel_version() only prints
     * the kernel protocol's); fuse_pkgversion(): "3.17.2" */
    int (*version)(void) = (int (*)(void))dlvsym(lib, "fuse_version", "FUSE_3.0");
    const char *(*pkgversion)(void) = (const char *(*)(void))dlvsym(lib, "fuse_pkgversion", "FUSE_3.0");
    snprintf(lf.release, sizeof lf.release, "%s", pkgversion != NULL ? pkgversion() : "?");
    made_fd = (int (*)(struct fuse_session *))dlvsym(lib, "fuse_session_fd", "FUSE_3.0");
    reply_write = (int (*)(fuse_req_t, size_t))dlvsym(lib, "fuse_reply_write", "FUSE_3.0");
    reply_buf = (int (*)(fuse_req_t, const char *, size_t))dlvsym(lib, "fuse_reply_buf", "FUSE_3.0");
    reply_err = (int (*)(fuse_req_t, int))dlvsym(lib, "fuse_reply_err", "FUSE_3.0");
    lf.version = version != NULL ? version() : 0;
    int tested = 0;
    for (size_t i = 0; i < sizeof tested_versions / sizeof tested_versions[0]; i++)
        tested |= lf.version == tested_versions[i];
    if (found > 1)
        refuse("%d copies of libfuse3 are loaded in this process (one is %s)", found, lf.path);
    else if (!tested)
        refuse("libfuse %s (%s) is not a version the hooks were tested with (3.14, 3.17)", lf.release, soname());
    else if (lf.version != BUILT_FOR)
        refuse("fusesqlite was built against libfuse %d.%d's headers but runs with libfuse %s (%s): "
               "reinstall fusesqlite",
               BUILT_FOR / 100, BUILT_FOR % 100, lf.release, soname());
    else if (lf.new30 == NULL || lf.mount == NULL || lf.custom_io == NULL || made_fd == NULL || reply_write == NULL
             || reply_buf == NULL || reply_err == NULL || (lf.version >= 317 && lf.new_versioned == NULL))
        refuse("%s lacks a function the hooks use at the symbol version they were written for", soname());
    else
        lf.engaged = 1;
}

__attribute__((visibility("default")))
int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
    static const struct fuse_custom_io io = {.writev = io_writev, .read = io_read};
    resolve();
    if (lf.mount == NULL) {
        errno = ENOSYS;
        return -1;
    }
    int res = lf.mount(se, mountpoint);
    /* libfuse 3.17 sends FUSE_HANDLE_KILLPRIV itself (init_hook) */
    if (res == 0 && lf.engaged && lf.version < 317 && killpriv_wanted && se == made && made_fd(se) >= 0
        && lf.custom_io(se, &io, made_fd(se)) == 0)
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
    /* On 3.17, ask for what the mount gets on 3.14, where it was written and tested
     * (the same `want`): */
    if (lf.version >= 317) {
        /* parallel directory operations: 3.14 asks for them by default, 3.17 does
         * not (the kernel then lets lookups and creates in one directory run at once) */
        conn->want |= FUSE_CAP_PARALLEL_DIROPS & conn->capable;
        if (killpriv_wanted) {
            if (conn->capable & FUSE_CAP_HANDLE_KILLPRIV) {
                conn->want |= FUSE_CAP_HANDLE_KILLPRIV; /* 3.17 puts it in the reply then */
                killpriv_sent = 1;
            }
            /* requests read into memory, not spliced: on 3.14 the custom I/O that sends
             * the flag has no splice_receive, so libfuse cannot splice there */
            conn->want &= ~FUSE_CAP_SPLICE_READ;
        }
    }
    want = conn->want;
    capable = conn->capable;
    negotiated = 1;
}

/* The copy of pyfuse3's callbacks handed to libfuse, with the hooks in it; NULL (and
 * the callbacks handed on unchanged) when the hooks do not engage. */
static struct fuse_lowlevel_ops *hooked_ops(const struct fuse_lowlevel_ops *op, size_t op_size)
{
    app_init = NULL;
    app_write_buf = NULL;
    app_read = NULL;
    app_fsync = NULL;
    app_flush = NULL;
    app_readdirplus = NULL;
    made = NULL;
    resolve();
    if (!lf.engaged || op_size < sizeof(init_fn))
        return NULL;
    /* init is the first member of every libfuse 3 version of the struct; the
     * rest is copied as is, whatever its size (libfuse copies it again) */
    struct fuse_lowlevel_ops *ops = malloc(op_size);
    if (ops == NULL)
        return NULL;
    memcpy(ops, op, op_size);
    app_init = ops->init;
    ops->init = init_hook;
    if (op_size >= sizeof(struct fuse_lowlevel_ops) && ops->write_buf != NULL && ops->read != NULL
        && ops->fsync != NULL && ops->flush != NULL && ops->readdirplus != NULL) {
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
    return ops;
}

/* what pyfuse3 built against libfuse 3.14 calls */
__attribute__((visibility("default")))
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    struct fuse_lowlevel_ops *ops = hooked_ops(op, op_size);
    if (lf.new30 == NULL) {
        free(ops);
        errno = ENOSYS;
        return NULL;
    }
    struct fuse_session *session = lf.new30(args, ops != NULL ? ops : op, op_size, userdata);
    if (ops != NULL)
        made = session;
    free(ops);
    return session;
}

/* what pyfuse3 built against libfuse 3.17 calls (its headers' fuse_session_new) */
__attribute__((visibility("default")))
struct fuse_session *fuse_session_new_versioned(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                                size_t op_size, struct libfuse_version *version, void *userdata)
{
    struct fuse_lowlevel_ops *ops = hooked_ops(op, op_size);
    if (lf.new_versioned == NULL) {
        free(ops);
        errno = ENOSYS;
        return NULL;
    }
    struct fuse_session *session = lf.new_versioned(args, ops != NULL ? ops : op, op_size, version, userdata);
    if (ops != NULL)
        made = session;
    free(ops);
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

static PyObject *status(PyObject *self, PyObject *unused)
{
    if (!lf.resolved)
        Py_RETURN_NONE;
    return Py_BuildValue("(Nssssi)", PyBool_FromLong(lf.engaged), lf.engaged ? "" : lf.why, lf.path, soname(),
                         lf.release, lf.version);
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
    {"status", status, METH_NOARGS,
     "(engaged, why_not, path, soname, release, version) of the libfuse this process loaded, once pyfuse3 made a "
     "session through this module; None before"},
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
        || PyModule_AddIntConstant(m, "NO_OPENDIR_SUPPORT", FUSE_CAP_NO_OPENDIR_SUPPORT) < 0
        || PyModule_AddIntConstant(m, "BUILT_FOR", BUILT_FOR) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
