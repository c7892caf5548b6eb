/* forkio._speedups: the compiled hot path of a pickle channel (optional).
 *
 * What a small message costs in Python is mostly the layers of calls around two system calls
 * and a pickle. This module does the common case in one C call each way, with exactly the
 * rules of the pure-Python path in _channel.py and _codec.py, which stays the reference and
 * the fallback (no compiler, or FORKIO_PURE_PYTHON=1):
 *
 *   encode_plain(message, threshold, max_frame)  one frame for a message without fds
 *   Wire.send(message, threshold)                 encode_plain + the write, under the send lock
 *   Wire.recv_message()                           a blocking read; the first message when the
 *                                                 read holds whole plain frames (the others go to
 *                                                 the inbox), else MORE
 *   Wire.fill(block)                              the same, every message to the inbox (any
 *                                                 reader's read, waiting or not)
 *   Wire.read(block)                              one read, for the general decoder (first what
 *                                                 recv_message left to it)
 *
 * "Python must" answers are False (encode from scratch) or ``(pickle,)`` (frame this pickle).
 * Anything else (fds, out-of-band buffers, large or oversized frames, pickling errors, a
 * read that is not exactly one plain frame) is handed back to the Python path unchanged, so
 * errors are worded and raised in one place. Frame format: see _codec.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define HEADER_SIZE 8
#define MAGIC 0xF5
#define KIND_MESSAGE 0
#define PICKLE_PROTOCOL 5
#define MAX_FDS_PER_READ 64
#define MAX_PAYLOAD 0xFFFFFFFFLL

#ifdef MSG_CMSG_CLOEXEC
#define RECV_FLAGS MSG_CMSG_CLOEXEC
#else
#define RECV_FLAGS 0
#endif

static PyObject *dumps;           /* pickle.dumps */
static PyObject *loads;           /* pickle.loads */
static PyObject *protocol;        /* 5 */
static PyObject *dumps_kwnames;   /* ("buffer_callback",) */
static PyObject *refuse_buffer;   /* the buffer_callback: out-of-band buffers take the Python path */
static PyObject *OutOfBand;       /* what refuse_buffer raises */
static PyObject *MORE;            /* recv_message's "not a message: read() returns the read" */
static PyObject *node_prefix;     /* "NODE_" */
static PyObject *zero;            /* 0 */

/* ------------------------------------------------------------------------------- encoding */

static PyObject *
refuse(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(buffer))
{
    PyErr_SetNone(OutOfBand);
    return NULL;
}

static PyMethodDef refuse_def = {"_refuse_buffer", refuse, METH_O, NULL};

/* The pickle of a message that may take the fast path, or Py_False (the Python path must
 * encode it: a bytes-like message, out-of-band buffers, an error it will word), or NULL with
 * an exception that is not an Exception (KeyboardInterrupt during a __reduce__). */
static PyObject *
pickle_plain(PyObject *message)
{
    PyTypeObject *type = Py_TYPE(message);
    if (type == &PyBytes_Type || type == &PyByteArray_Type || type == &PyMemoryView_Type)
        Py_RETURN_FALSE;
    PyObject *args[3] = {message, protocol, refuse_buffer};
    PyObject *payload = PyObject_Vectorcall(dumps, args, 2, dumps_kwnames);
    if (payload == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    if (!PyBytes_CheckExact(payload)) {
        Py_DECREF(payload);
        Py_RETURN_FALSE;
    }
    return payload;
}

static Py_ssize_t
threshold_arg(PyObject *obj)
{
    if (obj == Py_None)
        return PY_SSIZE_T_MAX;
    return PyLong_AsSsize_t(obj);
}

static void
put_header(unsigned char *header, Py_ssize_t length)
{
    header[0] = MAGIC;
    header[1] = KIND_MESSAGE;
    header[2] = 0;
    header[3] = 0;
    header[4] = (unsigned char)(length >> 24);
    header[5] = (unsigned char)(length >> 16);
    header[6] = (unsigned char)(length >> 8);
    header[7] = (unsigned char)length;
}

/* Whether a pickle of ``size`` bytes goes in a plain frame (else: Python decides). */
static int
fits(Py_ssize_t size, Py_ssize_t threshold, Py_ssize_t max_frame)
{
    return size < threshold && size <= max_frame && size <= MAX_PAYLOAD;
}

/* ``(payload,)``: pickled, but only the Python path can frame it (steals the reference). */
static PyObject *
too_big(PyObject *payload)
{
    PyObject *result = PyTuple_New(1);
    if (result == NULL) {
        Py_DECREF(payload);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, payload);
    return result;
}

static PyObject *
encode_plain(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode_plain(message, threshold, max_frame)");
        return NULL;
    }
    Py_ssize_t threshold = threshold_arg(args[1]);
    Py_ssize_t max_frame = PyLong_AsSsize_t(args[2]);
    if ((threshold == -1 || max_frame == -1) && PyErr_Occurred())
        return NULL;
    PyObject *payload = pickle_plain(args[0]);
    if (payload == NULL || payload == Py_False)
        return payload;
    Py_ssize_t size = PyBytes_GET_SIZE(payload);
    if (!fits(size, threshold, max_frame))
        return too_big(payload);
    PyObject *frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + size);
    if (frame != NULL) {
        char *out = PyBytes_AS_STRING(frame);
        put_header((unsigned char *)out, size);
        memcpy(out + HEADER_SIZE, PyBytes_AS_STRING(payload), (size_t)size);
    }
    Py_DECREF(payload);
    return frame;
}

/* ----------------------------------------------------------------------------------- Wire */

typedef struct {
    PyObject_HEAD
    int fd;                 /* -1 once disabled: the channel's socket is closing */
    PyObject *acquire;      /* the channel's send lock, as bound methods */
    PyObject *release;
    Py_buffer recv;         /* the channel's receive buffer, held for the wire's life */
    Py_ssize_t max_frame;
    PyObject *pending;      /* (start, end, fds): bytes recv_message left to the decoder; read() returns it */
    int torn;               /* a write was interrupted part-way: no frame may follow */
    PyObject *json_dumps;   /* JSON channels (Node's format): message -> str, as JsonCodec does */
    PyObject *json_scan;    /* and a json scanner: scan(str, 0) -> (value, end) */
    PyObject *inbox_append; /* the channel's inbox (a deque), where extra messages of a read go */
    PyObject *inbox_appendleft;
    PyObject *no_fds;       /* the decoder's shared empty fd list, for the inbox's items */
} Wire;

static int
Wire_init(Wire *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "send_lock", "recv_buffer", "max_frame", "inbox", "no_fds", "json_dumps",
                             "json_scan", NULL};
    int fd;
    PyObject *lock, *buffer, *inbox, *no_fds, *json_dumps = Py_None, *json_scan = Py_None;
    Py_ssize_t max_frame;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOnOO|$OO", kwlist, &fd, &lock, &buffer, &max_frame, &inbox,
                                     &no_fds, &json_dumps, &json_scan))
        return -1;
    if ((json_dumps == Py_None) != (json_scan == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "json_dumps and json_scan go together");
        return -1;
    }
    if (self->acquire != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Wire is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->recv, PyBUF_WRITABLE) < 0)
        return -1;
    self->acquire = PyObject_GetAttrString(lock, "acquire");
    self->release = PyObject_GetAttrString(lock, "release");
    self->inbox_append = PyObject_GetAttrString(inbox, "append");
    self->inbox_appendleft = PyObject_GetAttrString(inbox, "appendleft");
    Py_INCREF(no_fds);
    self->no_fds = no_fds;
    if (self->acquire == NULL || self->release == NULL || self->inbox_append == NULL || self->inbox_appendleft == NULL)
        return -1;
    if (json_dumps != Py_None) {
        Py_INCREF(json_dumps);
        Py_INCREF(json_scan);
        self->json_dumps = json_dumps;
        self->json_scan = json_scan;
    }
    self->fd = fd;
    self->max_frame = max_frame;
    return 0;
}

static int
Wire_traverse(Wire *self, visitproc visit, void *arg)
{
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->pending);
    Py_VISIT(self->json_dumps);
    Py_VISIT(self->json_scan);
    Py_VISIT(self->inbox_append);
    Py_VISIT(self->inbox_appendleft);
    Py_VISIT(self->no_fds);
    return 0;
}

static int
Wire_clear(Wire *self)
{
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->json_dumps);
    Py_CLEAR(self->json_scan);
    Py_CLEAR(self->inbox_append);
    Py_CLEAR(self->inbox_appendleft);
    Py_CLEAR(self->no_fds);
    return 0;
}

/* Methods of a Wire whose __init__ never ran (or failed) would touch NULL pointers. */
static int
ready(Wire *self)
{
    if (self->release == NULL || self->recv.obj == NULL || self->inbox_appendleft == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Wire is not initialised");
        return 0;
    }
    return 1;
}

static void
Wire_dealloc(Wire *self)
{
    PyObject_GC_UnTrack(self);
    Wire_clear(self);
    if (self->recv.obj != NULL)
        PyBuffer_Release(&self->recv);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Call the lock's release, keeping whatever exception is pending. */
static void
release_lock(Wire *self)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *r = PyObject_CallNoArgs(self->release);
    if (r == NULL)
        PyErr_WriteUnraisable(self->release);
    Py_XDECREF(r);
    PyErr_Restore(type, value, traceback);
}

/* Write a whole frame, given in two pieces, with the GIL released, as sendall does: a signal
 * handler that raises stops it (marking the wire torn when part of the frame went out). */
static int
write_frame(Wire *self, const char *first, size_t first_len, const char *second, size_t second_len)
{
    struct iovec iov[2];
    iov[0].iov_base = (void *)first;
    iov[0].iov_len = first_len;
    iov[1].iov_base = (void *)second;
    iov[1].iov_len = second_len;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    size_t sent = 0;
    while (msg.msg_iovlen) {
        ssize_t n;
        int fd = self->fd;
        Py_BEGIN_ALLOW_THREADS
        n = sendmsg(fd, &msg, 0);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    self->torn = sent > 0;
                    return -1;
                }
                continue;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        sent += (size_t)n;
        while (msg.msg_iovlen && (size_t)n >= msg.msg_iov[0].iov_len) {
            n -= (ssize_t)msg.msg_iov[0].iov_len;
            msg.msg_iov++;
            msg.msg_iovlen--;
        }
        if (msg.msg_iovlen) {
            msg.msg_iov[0].iov_base = (char *)msg.msg_iov[0].iov_base + n;
            msg.msg_iov[0].iov_len -= (size_t)n;
            /* As sendall does: a signal can cut a write short without EINTR. */
            if (PyErr_CheckSignals() < 0) {
                self->torn = 1;
                return -1;
            }
        }
    }
    return 0;
}

/* None once sent; False when the Python path must send it (nothing written); ``(pickle,)`` when
 * only the Python path can frame it (large, oversized); raises OSError from the write. */
/* Write ``first`` + ``second`` under the send lock. ``owner`` keeps the bytes alive; this takes
 * its reference. None once written; False when the channel closed meanwhile (nothing written). */
static PyObject *
send_locked(Wire *self, PyObject *owner, const char *first, size_t first_len, const char *second,
            size_t second_len)
{
    PyObject *r = PyObject_CallNoArgs(self->acquire);
    if (r == NULL) {
        Py_DECREF(owner);
        return NULL;
    }
    Py_DECREF(r);
    if (self->fd < 0) {  /* closed since: the Python path says so */
        release_lock(self);
        Py_DECREF(owner);
        Py_RETURN_FALSE;
    }
    int result = write_frame(self, first, first_len, second, second_len);
    release_lock(self);
    Py_DECREF(owner);
    if (result < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* A JSON line for ``message`` (as JsonCodec.encode), or False for the Python path to send. */
static PyObject *
send_json(Wire *self, PyObject *message)
{
    PyObject *text = PyObject_CallOneArg(self->json_dumps, message);
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    Py_ssize_t size;
    const char *utf8 = PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &size) : NULL;
    if (utf8 == NULL || size + 1 > self->max_frame) {  /* lone surrogates, too long: Python's way */
        PyErr_Clear();
        Py_DECREF(text);
        Py_RETURN_FALSE;
    }
    return send_locked(self, text, utf8, (size_t)size, "\n", 1);
}

static PyObject *
Wire_send(Wire *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send(message, threshold)");
        return NULL;
    }
    if (!ready(self))
        return NULL;
    if (self->fd < 0)
        Py_RETURN_FALSE;
    if (self->json_dumps != NULL)
        return send_json(self, args[0]);
    Py_ssize_t threshold = threshold_arg(args[1]);
    if (threshold == -1 && PyErr_Occurred())
        return NULL;
    PyObject *payload = pickle_plain(args[0]);
    if (payload == NULL || payload == Py_False)
        return payload;
    Py_ssize_t size = PyBytes_GET_SIZE(payload);
    if (!fits(size, threshold, self->max_frame))
        return too_big(payload);
    unsigned char header[HEADER_SIZE];
    put_header(header, size);
    return send_locked(self, payload, (const char *)header, HEADER_SIZE, PyBytes_AS_STRING(payload), (size_t)size);
}

static PyObject *
fds_from(struct msghdr *msg)
{
    PyObject *fds = PyList_New(0);
    if (fds == NULL)
        return NULL;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *at = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, at + i, sizeof fd);
            PyObject *n = PyLong_FromLong(fd);
            if (n == NULL || PyList_Append(fds, n) < 0) {
                Py_XDECREF(n);
                Py_DECREF(fds);
                return NULL;
            }
            Py_DECREF(n);
        }
    }
    return fds;
}

/* One read into the receive buffer. Returns the byte count (0: end of stream), -2 when a
 * non-blocking read found nothing, -1 with an exception; ``*fds`` is a new list or NULL. */
static Py_ssize_t
read_once(Wire *self, int block, PyObject **fds)
{
    union {
        char buf[CMSG_SPACE(MAX_FDS_PER_READ * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {self->recv.buf, (size_t)self->recv.len};
    struct msghdr msg;
    *fds = NULL;
    for (;;) {
        ssize_t n;
        int fd = self->fd;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        if (fd < 0) {
            errno = EBADF;
            n = -1;
        }
        else {
            Py_BEGIN_ALLOW_THREADS
            n = recvmsg(fd, &msg, RECV_FLAGS | (block ? 0 : MSG_DONTWAIT));
            Py_END_ALLOW_THREADS
        }
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return -1;
                continue;
            }
            if (!block && (errno == EAGAIN || errno == EWOULDBLOCK))
                return -2;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (msg.msg_controllen > 0) {
            *fds = fds_from(&msg);
            if (*fds == NULL)
                return -1;  /* out of memory: the fds leak, as they would in Python */
        }
        return n;
    }
}

static PyObject *
Wire_read(Wire *self, PyObject *block)
{
    if (!ready(self))
        return NULL;
    if (self->pending != NULL) {  /* what recv_message read and did not decode comes first */
        PyObject *pending = self->pending;
        self->pending = NULL;
        return pending;
    }
    PyObject *fds;
    Py_ssize_t n = read_once(self, PyObject_IsTrue(block), &fds);
    if (n == -1)
        return NULL;
    if (n == -2)
        Py_RETURN_NONE;
    if (fds == NULL && (fds = PyList_New(0)) == NULL)
        return NULL;
    return Py_BuildValue("(nnN)", (Py_ssize_t)0, n, fds);
}

/* Node's rule (_codec.is_internal): an object whose cmd is "NODE_" and more is internal. */
static int
is_internal(PyObject *value)
{
    if (!PyDict_Check(value))
        return 0;
    PyObject *cmd = PyDict_GetItemString(value, "cmd");  /* borrowed; str keys cannot raise */
    if (cmd == NULL || !PyUnicode_Check(cmd) || PyUnicode_GET_LENGTH(cmd) <= 5)
        return 0;
    return PyUnicode_Tailmatch(cmd, node_prefix, 0, 5, -1) == 1;
}

/* The value of one JSON line (without its newline), or NULL: errors, internal messages, blank
 * lines, surrounding whitespace and the like are the decoder's to read and word. */
static PyObject *
json_value(Wire *self, const char *line, Py_ssize_t size)
{
    if (size < 1 || size + 1 > self->max_frame || line[0] == ' ' || line[0] == '\t' || line[0] == '\r')
        return NULL;
    PyObject *text = PyUnicode_DecodeUTF8(line, size, "strict");
    if (text == NULL)
        return NULL;
    PyObject *args[2] = {text, zero};
    PyObject *got = PyObject_Vectorcall(self->json_scan, args, 2, NULL);
    PyObject *value = NULL;
    if (got != NULL && PyTuple_CheckExact(got) && PyTuple_GET_SIZE(got) == 2
            && PyLong_AsSsize_t(PyTuple_GET_ITEM(got, 1)) == PyUnicode_GET_LENGTH(text)
            && !is_internal(PyTuple_GET_ITEM(got, 0))) {
        value = PyTuple_GET_ITEM(got, 0);
        Py_INCREF(value);
    }
    Py_XDECREF(got);
    Py_DECREF(text);
    return value;
}

/* The message at b[pos:n] when it is a whole plain frame (or JSON line), setting *next past it.
 * NULL without an exception: the decoder takes it from ``pos`` on (incomplete, unusual, or an
 * error it words); NULL with one: an exception that is not an Exception (KeyboardInterrupt). */
static PyObject *
decode_at(Wire *self, const char *b, Py_ssize_t pos, Py_ssize_t n, Py_ssize_t *next)
{
    PyObject *value;
    if (self->json_dumps != NULL) {
        const char *newline = memchr(b + pos, '\n', (size_t)(n - pos));
        if (newline == NULL)
            return NULL;
        *next = newline - b + 1;
        value = json_value(self, b + pos, newline - b - pos);
    }
    else {
        const unsigned char *h = (const unsigned char *)b + pos;
        if (n - pos < HEADER_SIZE || h[0] != MAGIC || h[1] != KIND_MESSAGE || h[2] != 0 || h[3] != 0)
            return NULL;
        Py_ssize_t length = ((Py_ssize_t)h[4] << 24) | ((Py_ssize_t)h[5] << 16) | ((Py_ssize_t)h[6] << 8) | h[7];
        if (length > self->max_frame || length > n - pos - HEADER_SIZE)
            return NULL;
        PyObject *view = PyMemoryView_FromMemory((char *)h + HEADER_SIZE, length, PyBUF_READ);
        if (view == NULL)
            return NULL;
        value = PyObject_CallOneArg(loads, view);
        Py_DECREF(view);
        *next = pos + HEADER_SIZE + length;
    }
    if (value == NULL && PyErr_Occurred() && PyErr_ExceptionMatches(PyExc_Exception))
        PyErr_Clear();
    return value;
}

/* Keep b[start:n] and its fds for the next read() (steals ``fds``). */
static int
keep(Wire *self, Py_ssize_t start, Py_ssize_t n, PyObject *fds)
{
    if (fds == NULL && (fds = PyList_New(0)) == NULL)
        return -1;
    PyObject *kept = Py_BuildValue("(nnN)", start, n, fds);
    if (kept == NULL)
        return -1;
    Py_XSETREF(self->pending, kept);
    return 0;
}

/* Hand ``value`` to the channel's inbox as a decoded item, with ``add`` (the inbox's append or
 * appendleft); steals the reference. */
static int
to_inbox(Wire *self, PyObject *value, PyObject *add)
{
    PyObject *item = PyTuple_Pack(5, value, self->no_fds, Py_None, Py_False, Py_None);
    Py_DECREF(value);
    if (item == NULL)
        return -1;
    PyObject *r = PyObject_CallOneArg(add, item);
    Py_DECREF(item);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* One blocking read. The usual answer is the message itself: the read held whole plain frames
 * (or JSON lines), the first is returned and the others go to the inbox. Otherwise what was
 * decoded goes to the inbox, the rest is kept for read(), and the answer is MORE. Only call it
 * while the decoder is idle (nothing held back) and the inbox is empty. */
static PyObject *
receive(Wire *self, int keep_first, int block)
{
    if (!ready(self))
        return NULL;
    if (self->pending != NULL) {
        Py_INCREF(MORE);
        return MORE;
    }
    PyObject *fds;
    Py_ssize_t n = read_once(self, block, &fds);
    if (n == -1)
        return NULL;
    if (n == -2)  /* non-blocking, nothing there */
        Py_RETURN_FALSE;
    if (n == 0 || fds != NULL) {
        if (keep(self, 0, n, fds) < 0)
            return NULL;
        Py_INCREF(MORE);
        return MORE;
    }
    const char *b = (const char *)self->recv.buf;
    PyObject *first = NULL;
    Py_ssize_t pos = 0;
    while (pos < n) {
        Py_ssize_t next = pos;
        PyObject *value = decode_at(self, b, pos, n, &next);
        if (value == NULL)
            break;
        pos = next;
        if (first == NULL && keep_first)
            first = value;
        else if (to_inbox(self, value, self->inbox_append) < 0)
            goto fail;
    }
    if (pos == n) {  /* n > 0 and every byte decoded: at least one message */
        if (keep_first)
            return first;
        Py_RETURN_NONE;
    }
    /* b[pos:n] is the decoder's (the next read() hands it over); what was decoded before it
     * comes first. An interruption while decoding (Ctrl-C) loses nothing: it goes on after. */
    PyObject *type, *exc, *traceback;
    PyErr_Fetch(&type, &exc, &traceback);
    int failed = keep(self, pos, n, NULL) < 0;
    if (first != NULL) {
        if (failed)
            Py_DECREF(first);  /* out of memory already: it cannot be kept anywhere */
        else
            failed = to_inbox(self, first, self->inbox_appendleft) < 0;  /* steals it */
        first = NULL;
    }
    if (type != NULL) {
        PyErr_Clear();
        PyErr_Restore(type, exc, traceback);
        return NULL;
    }
    if (failed)
        return NULL;
    Py_INCREF(MORE);
    return MORE;
fail:
    Py_XDECREF(first);
    return NULL;
}

static PyObject *
Wire_recv_message(Wire *self, PyObject *Py_UNUSED(ignored))
{
    return receive(self, 1, 1);
}

static PyObject *
Wire_fill(Wire *self, PyObject *block)
{
    int wait = PyObject_IsTrue(block);
    if (wait < 0)
        return NULL;
    return receive(self, 0, wait);
}

static PyObject *
Wire_disable(Wire *self, PyObject *Py_UNUSED(ignored))
{
    self->fd = -1;
    Py_RETURN_NONE;
}

static PyObject *
Wire_get_torn(Wire *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->torn);
}

static PyMethodDef Wire_methods[] = {
    {"send", (PyCFunction)(void (*)(void))Wire_send, METH_FASTCALL,
     "send(message, threshold): None once sent; False or (pickle,) when the Python path must send it."},
    {"recv_message", (PyCFunction)Wire_recv_message, METH_NOARGS,
     "Blocking read: the first message when the read holds whole plain frames, else MORE (read() has the rest)."},
    {"fill", (PyCFunction)Wire_fill, METH_O,
     "fill(block): recv_message with every message to the inbox: None, MORE (read() has the rest), "
     "or False (nothing to read without waiting)."},
    {"read", (PyCFunction)Wire_read, METH_O,
     "read(block): (start, end, fds) of one read in the buffer (first what recv_message left), or None."},
    {"disable", (PyCFunction)Wire_disable, METH_NOARGS, "Stop using the fd (call under the send lock)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Wire_getset[] = {
    {"torn", (getter)Wire_get_torn, NULL, "True once a write was interrupted part-way.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WireType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "forkio._speedups.Wire",
    .tp_basicsize = sizeof(Wire),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The socket side of a pickle channel, in C: see _channel.Channel.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Wire_init,
    .tp_dealloc = (destructor)Wire_dealloc,
    .tp_traverse = (traverseproc)Wire_traverse,
    .tp_clear = (inquiry)Wire_clear,
    .tp_methods = Wire_methods,
    .tp_getset = Wire_getset,
};

/* --------------------------------------------------------------------------------- module */

static PyMethodDef module_methods[] = {
    {"encode_plain", (PyCFunction)(void (*)(void))encode_plain, METH_FASTCALL,
     "encode_plain(message, threshold, max_frame): a plain frame; False or (pickle,) when Python must frame it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "forkio._speedups", "The compiled hot path of a pickle channel (optional).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    PyObject *pickle = PyImport_ImportModule("pickle");
    if (pickle == NULL)
        goto fail;
    dumps = PyObject_GetAttrString(pickle, "dumps");
    loads = PyObject_GetAttrString(pickle, "loads");
    Py_DECREF(pickle);
    protocol = PyLong_FromLong(PICKLE_PROTOCOL);
    dumps_kwnames = Py_BuildValue("(s)", "buffer_callback");
    refuse_buffer = PyCFunction_New(&refuse_def, NULL);
    OutOfBand = PyErr_NewException("forkio._speedups.OutOfBand", NULL, NULL);
    MORE = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    node_prefix = PyUnicode_FromString("NODE_");
    zero = PyLong_FromLong(0);
    if (!dumps || !loads || !protocol || !dumps_kwnames || !refuse_buffer || !OutOfBand || !MORE || !node_prefix
            || !zero)
        goto fail;
    if (PyType_Ready(&WireType) < 0)
        goto fail;
    Py_INCREF(&WireType);
    if (PyModule_AddObject(module, "Wire", (PyObject *)&WireType) < 0) {
        Py_DECREF(&WireType);
        goto fail;
    }
    Py_INCREF(MORE);
    if (PyModule_AddObject(module, "MORE", MORE) < 0) {
        Py_DECREF(MORE);
        goto fail;
    }
    return module;
fail:
    Py_DECREF(module);
    return NULL;
}
