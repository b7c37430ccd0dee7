/* The site walk of capture/sites.py, compiled: where an op came from.
 *
 * For every tensor op the tracer walks the Python stack from the op up to the
 * first frame of the traced code (the anchor), classifying each frame's code
 * once (`kinds`, filled by the Python classifier). In Python that walk is a
 * dictionary lookup and a few attribute reads per frame, ~9 frames per op in
 * a training loop: the largest per-op cost past the detail limit. Here it is
 * the same walk, with the same caches, giving the same answer as
 * `SiteFinder._find_py` (tests compare both on the same programs).
 *
 * What needs Python stays in Python, as callbacks: classifying a new code
 * object, a code object's positions the first time (`span`), the name of a
 * module, the module enclosing a function of the traced code. The common
 * case calls none but `module_name`, and that only inside a module.
 *
 * Needs CPython 3.11's frame API (PyFrame_GetLasti, PyFrame_GetLocals).
 * Optional: where it is not built, sites.py runs the Python walk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>

/* What a frame's code is to the walk: the values of sites.py's _ROUTING ... _ANCHOR_ROOT. */
enum { ROUTING = 0, OTHER = 1, MODULE_CALL = 2, ANCHOR = 3, ANCHOR_FORWARD = 4, ANCHOR_ROOT = 5 };

typedef struct {
    PyObject_HEAD
    PyObject *kinds;       /* dict: id(code) -> (code, kind); the code is held, so no id is reused */
    PyObject *classify;    /* code -> kind, for a code seen the first time */
    PyObject *positions;   /* dict: id(code) -> (code, list of co_positions()) (SourceMap's cache) */
    PyObject *span;        /* frame -> span, where `positions` has no entry yet (it fills it) */
    PyObject *module_type; /* torch.nn.Module */
    PyObject *module_name; /* module -> its name */
    PyObject *enclosing;   /* frame -> the module whose call runs it, or None */
    PyObject *outside;     /* "outside the traced code" */
} Walker;

/* The kind of `code`: from `kinds`, or classified now and remembered. -1 on error. */
static int kind_of(Walker *w, PyObject *code) {
    PyObject *key = PyLong_FromVoidPtr(code);
    if (key == NULL) return -1;
    PyObject *entry = PyDict_GetItemWithError(w->kinds, key); /* borrowed */
    long kind;
    if (entry != NULL) {
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) {
            Py_DECREF(key);
            PyErr_SetString(PyExc_TypeError, "site kinds: an entry is not (code, kind)");
            return -1;
        }
        kind = PyLong_AsLong(PyTuple_GET_ITEM(entry, 1));
    } else {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
        PyObject *k = PyObject_CallOneArg(w->classify, code);
        if (k == NULL) {
            Py_DECREF(key);
            return -1;
        }
        kind = PyLong_AsLong(k);
        PyObject *pair = PyTuple_Pack(2, code, k);
        Py_DECREF(k);
        if (pair == NULL || PyDict_SetItem(w->kinds, key, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(key);
            return -1;
        }
        Py_DECREF(pair);
    }
    Py_DECREF(key);
    if (kind == -1 && PyErr_Occurred()) return -1;
    return (int)kind;
}

/* The module a frame runs for: its `self`, when that is an nn.Module; else None. Never fails
 * (as sites.py's _frame_self: a frame whose locals cannot be read has no module). New reference. */
static PyObject *frame_self(Walker *w, PyFrameObject *f) {
    PyObject *self = NULL;
#if PY_VERSION_HEX >= 0x030C0000
    self = PyFrame_GetVarString(f, "self"); /* one local, no dict of all of them */
#else
    PyObject *locals = PyFrame_GetLocals(f);
    if (locals != NULL) {
        self = PyMapping_GetItemString(locals, "self");
        Py_DECREF(locals);
    }
#endif
    if (self == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int is = PyObject_IsInstance(self, w->module_type);
    if (is <= 0) {
        PyErr_Clear();
        Py_DECREF(self);
        Py_RETURN_NONE;
    }
    return self;
}

/* SourceMap.span(f): (line, col, end_line, end_col) of the instruction the frame runs, or None. */
static PyObject *span_of(Walker *w, PyFrameObject *f, PyObject *code) {
    PyObject *key = PyLong_FromVoidPtr(code);
    if (key == NULL) return NULL;
    PyObject *entry = PyDict_GetItemWithError(w->positions, key); /* borrowed */
    Py_DECREF(key);
    if (entry == NULL) {
        if (PyErr_Occurred()) return NULL;
        return PyObject_CallOneArg(w->span, (PyObject *)f); /* the first time: Python reads and caches them */
    }
    PyObject *positions = PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2 ? PyTuple_GET_ITEM(entry, 1) : NULL;
    if (positions == NULL || !PyList_Check(positions)) return PyObject_CallOneArg(w->span, (PyObject *)f);
    int lasti = PyFrame_GetLasti(f);
    Py_ssize_t i = lasti / 2;
    if (lasti < 0 || i >= PyList_GET_SIZE(positions)) Py_RETURN_NONE;
    PyObject *pos = PyList_GET_ITEM(positions, i);
    if (!PyTuple_Check(pos) || PyTuple_GET_SIZE(pos) != 4) return PyObject_CallOneArg(w->span, (PyObject *)f);
    PyObject *line = PyTuple_GET_ITEM(pos, 0), *end_line = PyTuple_GET_ITEM(pos, 1);
    PyObject *col = PyTuple_GET_ITEM(pos, 2), *end_col = PyTuple_GET_ITEM(pos, 3);
    if (line == Py_None) Py_RETURN_NONE;
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL) return NULL;
    /* as Python's `col or 0`, `end_line or line`, `end_col if end_col is not None else 0` */
    int col_true = PyObject_IsTrue(col), end_line_true = PyObject_IsTrue(end_line);
    if (col_true < 0 || end_line_true < 0) {
        Py_DECREF(zero);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(4, line, col_true ? col : zero, end_line_true ? end_line : line,
                                 end_col != Py_None ? end_col : zero);
    Py_DECREF(zero);
    return out;
}

/* The module's name by the Python callback, or None when the op ran in no module. New reference. */
static PyObject *name_of(Walker *w, PyObject *module) {
    if (module == NULL || module == Py_None) return Py_NewRef(Py_None);
    return PyObject_CallOneArg(w->module_name, module);
}

/* (span, internal, key, module name) of the current op: SiteFinder.find. */
static PyObject *walker_find(Walker *w, PyObject *func_name) {
    PyFrameObject *f = PyEval_GetFrame(); /* borrowed: the frame that called find() */
    Py_XINCREF(f);
    PyObject *internal = NULL, *inner = NULL, *module = NULL, *result = NULL;
    while (f != NULL) {
        PyCodeObject *code = PyFrame_GetCode(f); /* new reference */
        int kind = kind_of(w, (PyObject *)code);
        if (kind < 0) {
            Py_DECREF(code);
            goto done;
        }
        if (kind >= ANCHOR) {
            if (module == NULL && kind != ANCHOR_ROOT) { /* in a function or module the traced code defines */
                if (kind == ANCHOR_FORWARD) {
                    module = frame_self(w, f);
                } else {
                    PyFrameObject *back = PyFrame_GetBack(f);
                    module = PyObject_CallOneArg(w->enclosing, back != NULL ? (PyObject *)back : Py_None);
                    Py_XDECREF(back);
                    if (module == NULL) {
                        Py_DECREF(code);
                        goto done;
                    }
                }
            }
            PyObject *span = span_of(w, f, (PyObject *)code);
            Py_DECREF(code);
            if (span == NULL) goto done;
            PyObject *name = name_of(w, module);
            if (name == NULL) {
                Py_DECREF(span);
                goto done;
            }
            PyObject *key;
            if (inner == NULL) {
                key = name == Py_None ? Py_NewRef(span) : PyTuple_Pack(3, span, Py_None, name);
            } else {
                key = PyTuple_Pack(3, span, inner, name);
            }
            if (key != NULL) {
                result = PyTuple_Pack(4, span, internal != NULL ? internal : Py_None, key, name);
                Py_DECREF(key);
            }
            Py_DECREF(span);
            Py_DECREF(name);
            goto done;
        }
        if (kind != ROUTING) {
            if (internal == NULL) {
                int differs = PyObject_RichCompareBool(code->co_name, func_name, Py_NE);
                if (differs < 0) {
                    Py_DECREF(code);
                    goto done;
                }
                if (differs) {
                    internal = Py_NewRef(code->co_qualname);
                    inner = Py_BuildValue("(Ni)", PyLong_FromVoidPtr(code), PyFrame_GetLasti(f));
                    if (inner == NULL) {
                        Py_DECREF(code);
                        goto done;
                    }
                }
            }
            if (kind == MODULE_CALL && module == NULL) {
                module = frame_self(w, f);
                if (module == Py_None) Py_CLEAR(module); /* as Python's `module is None`: a later frame may give it */
            }
        }
        Py_DECREF(code);
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    /* no anchor on the stack */
    {
        PyObject *name = name_of(w, module);
        if (name == NULL) goto done;
        result = PyTuple_Pack(4, Py_None, internal != NULL ? internal : w->outside, Py_None, name);
        Py_DECREF(name);
    }
done:
    Py_XDECREF(f);
    Py_XDECREF(internal);
    Py_XDECREF(inner);
    Py_XDECREF(module);
    return result;
}

static int walker_init(Walker *w, PyObject *args, PyObject *kwds) {
    static char *names[] = {"kinds", "classify", "positions", "span", "module_type", "module_name", "enclosing", NULL};
    PyObject *kinds, *classify, *positions, *span, *module_type, *module_name, *enclosing;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO!OOOO", names, &PyDict_Type, &kinds, &classify, &PyDict_Type,
                                     &positions, &span, &module_type, &module_name, &enclosing))
        return -1;
    PyObject *outside = PyUnicode_FromString("outside the traced code");
    if (outside == NULL) return -1;
    Py_XSETREF(w->kinds, Py_NewRef(kinds));
    Py_XSETREF(w->classify, Py_NewRef(classify));
    Py_XSETREF(w->positions, Py_NewRef(positions));
    Py_XSETREF(w->span, Py_NewRef(span));
    Py_XSETREF(w->module_type, Py_NewRef(module_type));
    Py_XSETREF(w->module_name, Py_NewRef(module_name));
    Py_XSETREF(w->enclosing, Py_NewRef(enclosing));
    Py_XSETREF(w->outside, outside);
    return 0;
}

static int walker_traverse(Walker *w, visitproc visit, void *arg) {
    Py_VISIT(w->kinds);
    Py_VISIT(w->classify);
    Py_VISIT(w->positions);
    Py_VISIT(w->span);
    Py_VISIT(w->module_type);
    Py_VISIT(w->module_name);
    Py_VISIT(w->enclosing);
    return 0;
}

static int walker_clear(Walker *w) {
    Py_CLEAR(w->kinds);
    Py_CLEAR(w->classify);
    Py_CLEAR(w->positions);
    Py_CLEAR(w->span);
    Py_CLEAR(w->module_type);
    Py_CLEAR(w->module_name);
    Py_CLEAR(w->enclosing);
    Py_CLEAR(w->outside);
    return 0;
}

static void walker_dealloc(Walker *w) {
    PyObject_GC_UnTrack(w);
    walker_clear(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef walker_methods[] = {
    {"find", (PyCFunction)walker_find, METH_O,
     "find(func_name) -> (span, internal, key, module name) of the op its caller is handling."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "autograd_magic.capture._walk.Walker",
    .tp_basicsize = sizeof(Walker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Walker(kinds, classify, positions, span, module_type, module_name, enclosing): sites.py's walk.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)walker_init,
    .tp_traverse = (traverseproc)walker_traverse,
    .tp_clear = (inquiry)walker_clear,
    .tp_dealloc = (destructor)walker_dealloc,
    .tp_methods = walker_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_walk", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__walk(void) {
    if (PyType_Ready(&WalkerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Walker", (PyObject *)&WalkerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
