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
 *
 * Also the tracer's mode handler (`ModeCore`, the base of tracer.py's `_Mode`):
 * every torch call of the traced code goes through it, and most (attribute
 * reads, calls that make no new tensor) only pass through. Here those take no
 * Python frame; the rest go on to `Tracer.on_op` or the backward recorder,
 * exactly as tracer.py's Python handler sends them.
 *
 * Needs CPython 3.11's frame API (PyFrame_GetLasti, PyFrame_GetLocals).
 * Optional: where it is not built, sites.py runs the Python walk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <structmember.h>

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

/* ---- the mode's handler ---- */

/* What tracer.py's `_call_kind` says a torch function is: the values of _OP ... _BACKWARD. */
enum { OP = 0, GET = 1, PASS = 2, BACKWARD = 3 };

/* Set once by configure(): torch.Tensor, tracer.py's `_KINDS` and `_call_kind`, torch's mode
 * stack length, and the grad_fn read for when a user's mode sits below ours. */
static PyObject *tensor_type, *call_kinds, *call_kind, *stack_len, *grad_fn_quiet;
static PyObject *str_busy, *str_calls, *str_on_op, *str_backward, *str_run, *str_grad_fn, *str_op_failed, *one;

typedef struct {
    PyObject_HEAD
    PyObject *tracer;
    char stale;
} ModeCore;

static PyObject *call(PyObject *func, PyObject *args, PyObject *kwargs) {
    return PyObject_Call(func, args, kwargs);
}

/* The op's output, handed to the tracer when it may be a new tensor (as `_Mode.__torch_function__`). */
static PyObject *record(ModeCore *self, PyObject *func, PyObject *name, PyObject *args, PyObject *kwargs, PyObject *out) {
    PyObject *kw = kwargs != NULL ? Py_NewRef(kwargs) : PyDict_New();
    if (kw == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *r = PyObject_CallMethodObjArgs(self->tracer, str_on_op, func, name, args, kw, out, NULL);
    Py_DECREF(kw);
    if (r != NULL) {
        Py_DECREF(out);
        return r;
    }
    if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* a KeyboardInterrupt goes on */
        Py_DECREF(out);
        return NULL;
    }
    /* the tracer must never break the user's code: noted, and the op's output returned */
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb); /* 3.11 has no PyErr_GetRaisedException */
    PyErr_NormalizeException(&type, &exc, &tb);
    PyObject *noted = PyObject_CallMethodObjArgs(self->tracer, str_op_failed, func, exc != NULL ? exc : Py_None, NULL);
    Py_XDECREF(type);
    Py_XDECREF(exc);
    Py_XDECREF(tb);
    if (noted == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(noted);
    return out;
}

static PyObject *core_torch_function(ModeCore *self, PyObject *const *a, Py_ssize_t n) {
    if (n < 2 || n > 4) {
        PyErr_SetString(PyExc_TypeError, "__torch_function__(func, types, args=(), kwargs=None)");
        return NULL;
    }
    PyObject *func = a[0];
    PyObject *args = n > 2 ? a[2] : NULL;
    PyObject *kwargs = n > 3 && a[3] != Py_None ? a[3] : NULL;
    PyObject *empty = NULL;
    if (args == NULL) {
        args = empty = PyTuple_New(0);
        if (args == NULL) return NULL;
    } else if (!PyTuple_Check(args)) { /* torch passes a tuple; Python's func(*args) takes any sequence */
        args = empty = PySequence_Tuple(args);
        if (args == NULL) return NULL;
    }
    PyObject *result = NULL, *entry = NULL;
    PyObject *tracer = self->tracer;
    /* stale: pushed back after its run by a late finalizer; busy: the tracer's own work */
    if (self->stale || tracer == NULL) {
        result = call(func, args, kwargs);
        goto done;
    }
    PyObject *busy = PyObject_GetAttr(tracer, str_busy);
    if (busy == NULL) goto done;
    int is_busy = PyObject_IsTrue(busy);
    Py_DECREF(busy);
    if (is_busy < 0) goto done;
    if (is_busy) {
        result = call(func, args, kwargs);
        goto done;
    }
    PyObject *calls = PyObject_GetAttr(tracer, str_calls);
    if (calls == NULL) goto done;
    PyObject *more = PyNumber_Add(calls, one);
    Py_DECREF(calls);
    if (more == NULL) goto done;
    int set = PyObject_SetAttr(tracer, str_calls, more);
    Py_DECREF(more);
    if (set < 0) goto done;
    entry = PyDict_GetItemWithError(call_kinds, func);
    if (entry != NULL) {
        Py_INCREF(entry);
    } else {
        PyErr_Clear(); /* new, or unhashable: classified in Python */
        entry = PyObject_CallOneArg(call_kind, func);
        if (entry == NULL) goto done;
    }
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) {
        PyErr_SetString(PyExc_TypeError, "_call_kind returns (kind, name)");
        goto done;
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(entry, 0));
    PyObject *name = PyTuple_GET_ITEM(entry, 1);
    if (kind == -1 && PyErr_Occurred()) goto done;
    if (kind == PASS) {
        result = call(func, args, kwargs);
        goto done;
    }
    if (kind == BACKWARD) {
        PyObject *recorder = PyObject_GetAttr(tracer, str_backward);
        if (recorder == NULL) goto done;
        PyObject *kw = kwargs != NULL ? Py_NewRef(kwargs) : PyDict_New();
        if (kw != NULL) {
            result = PyObject_CallMethodObjArgs(recorder, str_run, func, args, kw, NULL);
            Py_DECREF(kw);
        }
        Py_DECREF(recorder);
        goto done;
    }
    PyObject *out = call(func, args, kwargs);
    if (out == NULL) goto done;
    /* fast exits for what is not a new tensor: attribute reads and non-tensor results */
    if (kind == GET) {
        if (Py_TYPE(out) != (PyTypeObject *)tensor_type) {
            result = out;
            goto done;
        }
        PyObject *depth = PyObject_CallNoArgs(stack_len);
        if (depth == NULL) {
            Py_DECREF(out);
            goto done;
        }
        int top = depth == Py_None ? 0 : PyObject_IsTrue(depth);
        Py_DECREF(depth);
        PyObject *fn;
        if (top == 0) { /* ours is off the stack in here: nothing would see the read */
            fn = PyObject_GetAttr(out, str_grad_fn);
            if (fn == NULL && PyErr_ExceptionMatches(PyExc_RuntimeError)) { /* as ops.grad_fn_name */
                PyErr_Clear();
                fn = Py_NewRef(Py_None);
            }
        } else if (top > 0) {
            fn = PyObject_CallOneArg(grad_fn_quiet, out);
        } else {
            fn = NULL;
        }
        if (fn == NULL) {
            Py_DECREF(out);
            goto done;
        }
        int none = fn == Py_None;
        Py_DECREF(fn);
        if (none) {
            result = out;
            goto done;
        }
    } else if (out == Py_None) {
        Py_ssize_t len = PyUnicode_GetLength(name);
        if (len < 1 || PyUnicode_READ_CHAR(name, len - 1) != '_') {
            result = out;
            goto done;
        }
    } else if (!PyObject_TypeCheck(out, (PyTypeObject *)tensor_type) && !PyTuple_Check(out) && !PyList_Check(out)) {
        result = out;
        goto done;
    }
    result = record(self, func, name, args, kwargs, out);
done:
    Py_XDECREF(entry);
    Py_XDECREF(empty);
    return result;
}

static PyObject *configure(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 5) {
        PyErr_SetString(PyExc_TypeError, "configure(tensor_type, kinds, call_kind, stack_len, grad_fn_quiet)");
        return NULL;
    }
    if (!PyType_Check(a[0]) || !PyDict_Check(a[1])) {
        PyErr_SetString(PyExc_TypeError, "configure: a type and a dict");
        return NULL;
    }
    Py_XSETREF(tensor_type, Py_NewRef(a[0]));
    Py_XSETREF(call_kinds, Py_NewRef(a[1]));
    Py_XSETREF(call_kind, Py_NewRef(a[2]));
    Py_XSETREF(stack_len, Py_NewRef(a[3]));
    Py_XSETREF(grad_fn_quiet, Py_NewRef(a[4]));
    Py_RETURN_NONE;
}

static int core_traverse(ModeCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->tracer);
    return 0;
}

static int core_clear(ModeCore *self) {
    Py_CLEAR(self->tracer);
    return 0;
}

static void core_dealloc(ModeCore *self) {
    PyObject_GC_UnTrack(self);
    core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef core_methods[] = {
    {"__torch_function__", (PyCFunction)(void (*)(void))core_torch_function, METH_FASTCALL,
     "The tracer's handler of every torch call (tracer.py's `_Mode`)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef core_members[] = {
    {"tracer", T_OBJECT, offsetof(ModeCore, tracer), 0, "the Tracer it records for"},
    {"stale", T_BOOL, offsetof(ModeCore, stale), 0, "its run ended: it only passes calls through"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ModeCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "autograd_magic.capture._walk.ModeCore",
    .tp_basicsize = sizeof(ModeCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The base of tracer.py's _Mode: its __torch_function__, compiled.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_members = core_members,
};

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(tensor_type, kinds, call_kind, stack_len, grad_fn_quiet): what ModeCore reads (tracer.py, once)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_walk", NULL, -1, module_methods};

static int intern(PyObject **slot, const char *text) {
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC PyInit__walk(void) {
    if (PyType_Ready(&WalkerType) < 0 || PyType_Ready(&ModeCoreType) < 0) return NULL;
    if (intern(&str_busy, "busy") < 0 || intern(&str_calls, "calls") < 0 || intern(&str_on_op, "on_op") < 0 ||
        intern(&str_backward, "backward") < 0 || intern(&str_run, "run") < 0 || intern(&str_grad_fn, "grad_fn") < 0 ||
        intern(&str_op_failed, "op_failed") < 0)
        return NULL;
    one = PyLong_FromLong(1);
    if (one == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Walker", (PyObject *)&WalkerType) < 0 ||
        PyModule_AddObjectRef(m, "ModeCore", (PyObject *)&ModeCoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
