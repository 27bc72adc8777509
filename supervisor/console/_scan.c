/* The console filter's fast path in C: supervisor/console/filter.py's `_SAFE_RUN` regex and the UTF-8
 * check after it (`safe_run_end_re`), as one loop. The regex engine costs a Python-level iteration
 * per alternative matched, and SGR-dense output has an escape sequence every ~17 bytes.
 *
 * Checking UTF-8 inside the loop gives what the regex followed by the decoder gives: the decoder
 * stops at the first byte that does not start a complete, valid character, and the regex's run
 * never ends inside a valid character (its only delimiters, ESC and C2, are no continuation bytes;
 * C2 80..9F, the C1 controls, is where both stop).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ESC 0x1b
#define MAX_PARAMS 250 /* the bounds of `_SAFE_RUN`, which are the byte-by-byte path's */
#define MAX_INTERMEDIATES 4

/* What a byte starts. */
enum {
    T, /* text: an ASCII byte other than ESC */
    E, /* ESC: a CSI the fast path accepts, or the end of the run */
    A, /* C2: C2 A0..BF passes, C2 80..9F is a C1 control */
    B, /* C3..DF: a two-byte character */
    C, /* E0: second byte A0..BF (shorter forms are overlong) */
    D, /* E1..EC, EE, EF */
    S, /* ED: second byte 80..9F (ED A0.. encodes a surrogate) */
    F, /* F0: second byte 90..BF (overlong below) */
    G, /* F1..F3 */
    H, /* F4: second byte 80..8F (beyond U+10FFFF above) */
    X, /* never starts a character: continuation bytes, C0, C1, F5..FF */
};

static const unsigned char byte_class[256] = {
    /* 0x00 */ T, T, T, T, T, T, T, T, T, T, T, T, T, T, T, T,
    /* 0x10 */ T, T, T, T, T, T, T, T, T, T, T, E, T, T, T, T,
    /* 0x20 */ T, T, T, T, T, T, T, T, T, T, T, T, T, T, T, T,
    /* 0x30 */ T, T, T, T, T, T, T, T, T, T, T, T, T, T, T, T,
    /* 0x40 */ T, T, T, T, T, T, T, T, T, T, T, T, T, T, T, T,
    /* 0x50 */ T, T, T, T, T, T, T, T, T, T, T, T, T, T, T, T,
    /* 0x60 */ T, T, T, T, T, T, T, T, T, T, T, T, T, T, T, T,
    /* 0x70 */ T, T, T, T, T, T, T, T, T, T, T, T, T, T, T, T,
    /* 0x80 */ X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X,
    /* 0x90 */ X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X,
    /* 0xa0 */ X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X,
    /* 0xb0 */ X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X,
    /* 0xc0 */ X, X, A, B, B, B, B, B, B, B, B, B, B, B, B, B,
    /* 0xd0 */ B, B, B, B, B, B, B, B, B, B, B, B, B, B, B, B,
    /* 0xe0 */ C, D, D, D, D, D, D, D, D, D, D, D, D, S, D, D,
    /* 0xf0 */ F, G, G, G, H, X, X, X, X, X, X, X, X, X, X, X,
};

/* Per class: the character's length and the range of its second byte (the others are 80..BF). */
static const struct {
    unsigned char length, low, high;
} lead[] = {
    [A] = {2, 0xa0, 0xbf}, [B] = {2, 0x80, 0xbf}, [C] = {3, 0xa0, 0xbf}, [D] = {3, 0x80, 0xbf},
    [S] = {3, 0x80, 0x9f}, [F] = {4, 0x90, 0xbf}, [G] = {4, 0x80, 0xbf}, [H] = {4, 0x80, 0x8f},
};

/* CSI final bytes the fast path accepts: 0x40..0x7e but c i q t (refused by some rule) and h l r u
 * (they switch modes, which the byte-by-byte path reports to `on_sequence`). Bit n is 0x40 + n. */
#define FINAL(c) (UINT64_C(1) << ((c) - 0x40))
static const uint64_t csi_finals = (FINAL(0x7f) - 1) /* 0x40..0x7e */
                                  & ~(FINAL('c') | FINAL('i') | FINAL('q') | FINAL('t'))
                                  & ~(FINAL('h') | FINAL('l') | FINAL('r') | FINAL('u'));

#define CONTINUATION(c) ((c) >= 0x80 && (c) <= 0xbf)

/* ESC [ [0-9:;]{0,250} [\x20-\x2f]{0,4} F at `p`: where the sequence ends, or NULL. The three
 * classes are disjoint, so the regex never backtracks into one and this needs not either. */
static const unsigned char *csi_end(const unsigned char *p, const unsigned char *end) {
    const unsigned char *start;
    if (end - p < 2 || p[1] != '[')
        return NULL;
    p += 2;
    start = p;
    while (p < end && p - start <= MAX_PARAMS && *p >= 0x30 && *p <= 0x3b)
        p++;
    if (p - start > MAX_PARAMS)
        return NULL;
    start = p;
    while (p < end && p - start <= MAX_INTERMEDIATES && *p >= 0x20 && *p <= 0x2f)
        p++;
    if (p - start > MAX_INTERMEDIATES || p == end || *p < 0x40 || *p > 0x7e)
        return NULL;
    return (csi_finals >> (*p - 0x40)) & 1 ? p + 1 : NULL;
}

/* Eight bytes of plain text: none has its top bit set and none is ESC (no zero byte in w ^ ESCs). */
static inline int text8(const unsigned char *p) {
    const uint64_t ones = UINT64_C(0x0101010101010101), highs = UINT64_C(0x8080808080808080);
    uint64_t w, x;
    memcpy(&w, p, 8);
    x = w ^ (ones * ESC);
    return ((w | ((x - ones) & ~x)) & highs) == 0;
}

static Py_ssize_t scan(const unsigned char *s, Py_ssize_t pos, Py_ssize_t length) {
    const unsigned char *p = s + pos, *end = s + length, *next;
    while (p < end) {
        unsigned char kind = byte_class[*p];
        if (kind == T) {
            p++;
            while (end - p >= 8 && text8(p))
                p += 8;
        } else if (kind == E) {
            if ((next = csi_end(p, end)) == NULL)
                break;
            p = next;
        } else if (kind == X) {
            break;
        } else {
            Py_ssize_t n = lead[kind].length;
            if (end - p < n || p[1] < lead[kind].low || p[1] > lead[kind].high ||
                (n > 2 && !CONTINUATION(p[2])) || (n > 3 && !CONTINUATION(p[3])))
                break;
            p += n;
        }
    }
    return p - s;
}

PyDoc_STRVAR(safe_run_end_doc,
             "safe_run_end($module, data, pos, /)\n--\n\n"
             "Where the run of certainly safe output that starts at `pos` ends: exactly what\n"
             "supervisor.console.filter.safe_run_end_re returns. `data` is bytes or another buffer;\n"
             "0 <= pos <= len(data).");

static PyObject *safe_run_end(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer view;
    Py_ssize_t pos, stop;
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "safe_run_end expected 2 arguments, got %zd", nargs);
        return NULL;
    }
    pos = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (PyBytes_CheckExact(args[0])) { /* the common case, without the buffer protocol's cost */
        Py_ssize_t length = PyBytes_GET_SIZE(args[0]);
        if (pos < 0 || pos > length)
            goto out_of_range;
        return PyLong_FromSsize_t(scan((const unsigned char *)PyBytes_AS_STRING(args[0]), pos, length));
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || pos > view.len) {
        PyBuffer_Release(&view);
        goto out_of_range;
    }
    stop = scan(view.buf, pos, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(stop);
out_of_range:
    PyErr_SetString(PyExc_ValueError, "safe_run_end: pos must be within data (0 <= pos <= len(data))");
    return NULL;
}

static PyMethodDef methods[] = {
    {"safe_run_end", (PyCFunction)(void (*)(void))safe_run_end, METH_FASTCALL, safe_run_end_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {{0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "supervisor.console._scan",
    .m_doc = "The console filter's fast path in C (supervisor/console/filter.py falls back to a regex).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModuleDef_Init(&module); }
