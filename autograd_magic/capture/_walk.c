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
#include <math.h>
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
    if (w->kinds == NULL) { /* made with __new__ alone: __init__ never ran */
        PyErr_SetString(PyExc_TypeError, "Walker.find before Walker.__init__");
        return NULL;
    }
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
static PyObject *tensor_type, *call_kinds, *call_kind, *stack_len, *grad_fn_quiet, *grad_enabled, *limits;
static PyObject *str_busy, *str_calls, *str_on_op, *str_backward, *str_run, *str_grad_fn, *str_op_failed, *one;
static PyObject *str_sites, *str_find, *str_site_runs, *str_span_counts, *str_detail_limit, *str_detaching, *str_watching,
    *str_window, *str_window_bytes, *str_backward_calls, *str_by_tensor, *str_version, *str_is_cpu, *str_numel,
    *str_element_size, *str_check_window, *str_finite_window, *str_finite_window_bytes, *str_grad;

typedef struct {
    PyObject_HEAD
    PyObject *tracer;
    char stale;
} ModeCore;

static PyObject *call(PyObject *func, PyObject *args, PyObject *kwargs) {
    return PyObject_Call(func, args, kwargs);
}

/* Our bookkeeping of an op raised (the error is set): the tracer must never break the user's code,
 * so it is noted and the op's output returned (a new reference); a KeyboardInterrupt goes on (NULL). */
static PyObject *swallowed(ModeCore *self, PyObject *func, PyObject *out) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb); /* 3.11 has no PyErr_GetRaisedException */
    PyErr_NormalizeException(&type, &exc, &tb);
    PyObject *noted = PyObject_CallMethodObjArgs(self->tracer, str_op_failed, func, exc != NULL ? exc : Py_None, NULL);
    Py_XDECREF(type);
    Py_XDECREF(exc);
    Py_XDECREF(tb);
    if (noted == NULL) return NULL;
    Py_DECREF(noted);
    return Py_NewRef(out);
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
    if (r == NULL) r = swallowed(self, func, out);
    Py_DECREF(out);
    return r;
}

/* tracer.py's `is_inplace(name, name)`: __setitem__, __iadd__ and the like, add_ and the like. */
static int inplace_name(PyObject *name) {
    Py_ssize_t n = PyUnicode_GetLength(name);
    if (n < 1) return 0;
    if (PyUnicode_CompareWithASCIIString(name, "__setitem__") == 0) return 1;
    int under_end = n >= 2 && PyUnicode_READ_CHAR(name, n - 1) == '_' && PyUnicode_READ_CHAR(name, n - 2) == '_';
    if (under_end) /* __i...__ */
        return n >= 3 && PyUnicode_READ_CHAR(name, 0) == '_' && PyUnicode_READ_CHAR(name, 1) == '_' &&
               PyUnicode_READ_CHAR(name, 2) == 'i';
    return PyUnicode_READ_CHAR(name, n - 1) == '_';
}

static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* `v` (a new reference, or NULL with an error set) as a Py_ssize_t, released; -1 with an error set */
static Py_ssize_t ssize_of(PyObject *v) {
    if (v == NULL) return -1;
    Py_ssize_t r = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    return r;
}

static Py_ssize_t attr_ssize(PyObject *obj, PyObject *name) { return ssize_of(PyObject_GetAttr(obj, name)); }

/* obj.name() as a Py_ssize_t */
static Py_ssize_t attr_call_ssize(PyObject *obj, PyObject *name) { return ssize_of(PyObject_CallMethodNoArgs(obj, name)); }

static PyObject *param_type, *str_trace, *str_leaf_records; /* set by configure_passes and at import (below) */

/* ---- an op's first runs, recorded here (tracer.py's `on_op` and `_record_op`, the common case) ----
 *
 * An op making one exact torch.Tensor from exact tensors, on a site still under --limit, with no
 * variant changing outputs (no detach, no replacement) and no user's mode below ours (nothing would
 * see our reads): its site counted, its inputs' records found (an input with none goes to
 * `_input_record_quiet`, which makes the external record), its Record made with the same fields,
 * and `_add`'s bookkeeping (by tensor, live, the backward recorder's node or leaf records) done.
 * Anything else is left to `on_op` (`first_run` answers NULL with no error set). tests/test_sites.py
 * runs random cells both ways and compares every field. */
static PyObject *record_cls, *op_name_fn, *tracer_globals, *op_cache, *record_kwnames;
static PyObject *str_replacers, *str_source_map, *str_text, *str_records, *str_live, *str_requires_grad, *str_is_leaf,
    *str_output_nr, *str_sequence_nr, *str_node_records, *str_input_record, *str_preview_quiet, *str_before_inplace,
    *str_out, *str_step_detail;

/* ops.py's `writes_out(kwargs)`: the call writes into tensors it was given (`out=`), an in-place change.
 * 1, 0, or -1 with an error set. */
static int writes_out(PyObject *kwargs) {
    if (kwargs == NULL || !PyDict_Check(kwargs) || PyDict_GET_SIZE(kwargs) == 0) return 0;
    PyObject *out = PyDict_GetItemWithError(kwargs, str_out); /* borrowed */
    if (out == NULL) return PyErr_Occurred() ? -1 : 0;
    return out != Py_None;
}

static PyObject *configure_records(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 3 || !PyDict_Check(a[2])) {
        PyErr_SetString(PyExc_TypeError, "configure_records(Record, op_name, tracer module's globals)");
        return NULL;
    }
    Py_XSETREF(record_cls, Py_NewRef(a[0]));
    Py_XSETREF(op_name_fn, Py_NewRef(a[1]));
    Py_XSETREF(tracer_globals, Py_NewRef(a[2]));
    if (op_cache == NULL && (op_cache = PyDict_New()) == NULL) return NULL;
    if (record_kwnames == NULL) {
        record_kwnames = Py_BuildValue("(ssssssssssssss)", "id", "op", "expr", "line", "span", "occurrence", "grad_fn",
                                       "requires_grad", "is_leaf", "grad_enabled", "inputs", "internal", "module",
                                       "preview");
        if (record_kwnames == NULL) return NULL;
    }
    Py_RETURN_NONE;
}

/* t.name, with torch's RuntimeError (a no_grad view whose base changed in place) as `fallback`. */
static PyObject *attr_or(PyObject *t, PyObject *name, PyObject *fallback) {
    PyObject *v = PyObject_GetAttr(t, name);
    if (v == NULL && PyErr_ExceptionMatches(PyExc_RuntimeError)) {
        PyErr_Clear();
        v = Py_XNewRef(fallback);
    }
    return v;
}

/* An exact torch.Tensor or Parameter: no subclass's __torch_function__ sees our reads. */
static int exact_tensor(PyObject *t) {
    return Py_TYPE(t) == (PyTypeObject *)tensor_type || (param_type != NULL && Py_TYPE(t) == (PyTypeObject *)param_type);
}

/* `tensors_in` over the call's arguments into `tensors`: 1, 0 when one is not an exact tensor
 * (on_op takes the call), -1 on an error. */
static int gather_inputs(PyObject *obj, int depth, PyObject *tensors) {
    if (PyObject_TypeCheck(obj, (PyTypeObject *)tensor_type)) {
        if (!exact_tensor(obj)) return 0;
        return PyList_Append(tensors, obj) < 0 ? -1 : 1;
    }
    if (depth < 2 && (PyList_Check(obj) || PyTuple_Check(obj))) {
        PyObject *seq = PySequence_Fast(obj, "arguments");
        if (seq == NULL) return -1;
        int r = 1;
        for (Py_ssize_t i = 0; r == 1 && i < PySequence_Fast_GET_SIZE(seq); i++)
            r = gather_inputs(PySequence_Fast_ITEMS(seq)[i], depth + 1, tensors);
        Py_DECREF(seq);
        return r;
    }
    return 1;
}

/* `Tracer.record_of(t)` over its `_by_tensor`: the record id (borrowed), or NULL, with an error set
 * only when the lookup failed. */
static PyObject *record_of(PyObject *by_tensor, PyObject *t) {
    PyObject *ident = PyLong_FromVoidPtr(t);
    if (ident == NULL) return NULL;
    PyObject *entry = PyDict_GetItemWithError(by_tensor, ident);
    Py_DECREF(ident);
    if (entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2 && PyWeakref_Check(PyTuple_GET_ITEM(entry, 0)) &&
        PyWeakref_GET_OBJECT(PyTuple_GET_ITEM(entry, 0)) == t)
        return PyTuple_GET_ITEM(entry, 1);
    return NULL;
}

/* The record id of input `t`: `_input_record_quiet(t, span, internal, False)`. New reference. */
static PyObject *input_record(PyObject *tracer, PyObject *by_tensor, PyObject *t, PyObject *span, PyObject *internal) {
    PyObject *rid = record_of(by_tensor, t);
    if (rid != NULL) return Py_NewRef(rid);
    if (PyErr_Occurred()) return NULL;
    return PyObject_CallMethodObjArgs(tracer, str_input_record, t, span, internal, Py_False, NULL);
}

/* `BackwardRecorder.note_record(rid, t)` for a tensor that requires grad; its errors are ignored there too. */
static int note_record(PyObject *tracer, PyObject *rid, PyObject *t, PyObject *ref) {
    PyObject *recorder = PyObject_GetAttr(tracer, str_backward);
    if (recorder == NULL) return -1;
    int rc = -1;
    PyObject *fn = PyObject_GetAttr(t, str_grad_fn);
    if (fn == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) { /* as note_record's `except Exception: pass` */
            PyErr_Clear();
            rc = 0;
        }
        goto done;
    }
    if (fn == Py_None) { /* a leaf: its AccumulateGrad's records */
        PyObject *leaves = PyObject_GetAttr(recorder, str_leaf_records);
        PyObject *ident = leaves != NULL ? PyLong_FromVoidPtr(t) : NULL;
        PyObject *have = ident != NULL ? PyDict_GetItemWithError(leaves, ident) : NULL;
        if (ident != NULL && !(have == NULL && PyErr_Occurred())) {
            if (have != NULL && PyTuple_Check(have) && PyTuple_GET_SIZE(have) == 2 && PyWeakref_Check(PyTuple_GET_ITEM(have, 0)) &&
                PyWeakref_GET_OBJECT(PyTuple_GET_ITEM(have, 0)) == t && PyList_Check(PyTuple_GET_ITEM(have, 1))) {
                rc = PyList_Append(PyTuple_GET_ITEM(have, 1), rid);
            } else {
                PyObject *rids = PyList_New(1);
                PyObject *entry = rids != NULL ? PyTuple_Pack(2, ref, rids) : NULL;
                if (rids != NULL) PyList_SET_ITEM(rids, 0, Py_NewRef(rid));
                rc = entry != NULL ? PyDict_SetItem(leaves, ident, entry) : -1;
                Py_XDECREF(entry);
                Py_XDECREF(rids);
            }
        }
        Py_XDECREF(ident);
        Py_XDECREF(leaves);
    } else { /* (sequence number, node type) -> [(output_nr, record id)] */
        PyObject *seq = PyObject_CallMethodNoArgs(fn, str_sequence_nr);
        PyObject *kind = seq != NULL ? PyType_GetName(Py_TYPE(fn)) : NULL;
        PyObject *key = kind != NULL ? PyTuple_Pack(2, seq, kind) : NULL;
        PyObject *nr = key != NULL ? PyObject_GetAttr(t, str_output_nr) : NULL;
        PyObject *pair = nr != NULL ? PyTuple_Pack(2, nr, rid) : NULL;
        PyObject *nodes = pair != NULL ? PyObject_GetAttr(recorder, str_node_records) : NULL;
        if (nodes != NULL && PyDict_Check(nodes)) {
            PyObject *list = PyDict_GetItemWithError(nodes, key);
            if (list != NULL && PyList_Check(list)) {
                rc = PyList_Append(list, pair);
            } else if (list == NULL && !PyErr_Occurred()) {
                PyObject *fresh = PyList_New(1);
                if (fresh != NULL) {
                    PyList_SET_ITEM(fresh, 0, Py_NewRef(pair));
                    rc = PyDict_SetItem(nodes, key, fresh);
                    Py_DECREF(fresh);
                }
            } else if (list != NULL) {
                PyErr_SetString(PyExc_TypeError, "node_records holds lists");
            }
        } else if (nodes != NULL) {
            PyErr_SetString(PyExc_TypeError, "node_records is a dict");
        }
        Py_XDECREF(nodes);
        Py_XDECREF(pair);
        Py_XDECREF(nr);
        Py_XDECREF(key);
        Py_XDECREF(kind);
        Py_XDECREF(seq);
        if (rc < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear();
            rc = 0;
        }
    }
    Py_DECREF(fn);
done:
    Py_DECREF(recorder);
    return rc;
}

/* The op's record, as `_record_op` makes it; NULL with no error set: not this path's case. */
static PyObject *first_run(ModeCore *self, PyObject *func, PyObject *name, PyObject *args, PyObject *kwargs, PyObject *out,
                           PyObject *span, PyObject *internal, PyObject *key, PyObject *module) {
    PyObject *tracer = self->tracer;
    if (record_cls == NULL || Py_TYPE(out) != (PyTypeObject *)tensor_type || key == Py_None || inplace_name(name)) return NULL;
    if (writes_out(kwargs) != 0) { /* out=: an in-place change, on_op's */
        PyErr_Clear();
        return NULL;
    }
    int r = attr_true(tracer, str_detaching);
    if (r != 0) return NULL;
    r = attr_true(tracer, str_replacers);
    if (r != 0) return NULL;
    PyObject *depth = PyObject_CallNoArgs(stack_len);
    if (depth == NULL) return NULL;
    int below = depth == Py_None ? 0 : PyObject_IsTrue(depth);
    Py_DECREF(depth);
    if (below != 0) return NULL; /* a user's mode below ours would see our reads: on_op reads quietly */
    PyObject *tensors = PyList_New(0);
    if (tensors == NULL) return NULL;
    r = gather_inputs(args, -1, tensors); /* the arguments themselves at depth 0, as `tensors_in` of each */
    if (r == 1 && kwargs != NULL) {
        PyObject *values = PyDict_Values(kwargs);
        r = values != NULL ? gather_inputs(values, -1, tensors) : -1;
        Py_XDECREF(values);
    }
    if (r != 1) {
        Py_DECREF(tensors);
        return NULL;
    }
    PyObject *result = NULL, *runs = NULL, *site = NULL, *counts = NULL, *occ = NULL, *op = NULL, *inputs = NULL;
    PyObject *by_tensor = NULL, *expr = NULL, *source_map = NULL, *enabled = NULL, *grad_fn = NULL, *requires = NULL;
    PyObject *leaf = NULL, *shown = NULL, *trace = NULL, *records = NULL, *rid = NULL, *line = NULL, *rec = NULL;
    PyObject *ref = NULL, *live = NULL, *version = NULL;
    /* the op's name: `op_name(func)`; an in-place one by its name (`is_inplace`) is on_op's */
    op = PyDict_GetItemWithError(op_cache, func);
    if (op != NULL) {
        Py_INCREF(op);
    } else {
        if (PyErr_Occurred()) PyErr_Clear(); /* unhashable: named each time */
        if ((op = PyObject_CallOneArg(op_name_fn, func)) == NULL) goto fail;
        /* kept for torch's own functions only, as `_call_kind` keeps them: one made on the fly is not held */
        PyObject *known = PyDict_GetItemWithError(call_kinds, func);
        if (known != NULL && PyDict_GET_SIZE(op_cache) < 8192 && PyDict_SetItem(op_cache, func, op) < 0) PyErr_Clear();
        if (known == NULL) PyErr_Clear();
    }
    if (!PyUnicode_Check(op)) goto fail;
    {
        Py_ssize_t len = PyUnicode_GetLength(op);
        if (len >= 1 && PyUnicode_READ_CHAR(op, len - 1) == '_' && !(len >= 2 && PyUnicode_READ_CHAR(op, len - 2) == '_'))
            goto skip;
    }
    /* the site's runs: under --limit, or new */
    if ((runs = PyObject_GetAttr(tracer, str_site_runs)) == NULL || !PyDict_Check(runs)) goto fail;
    site = PyDict_GetItemWithError(runs, key);
    if (site == NULL) {
        if (PyErr_Occurred()) goto fail;
        if ((site = PyList_New(2)) == NULL) goto fail;
        PyList_SET_ITEM(site, 0, PyLong_FromLong(0));
        PyList_SET_ITEM(site, 1, Py_NewRef(Py_None));
        if (PyList_GET_ITEM(site, 0) == NULL || PyDict_SetItem(runs, key, site) < 0) goto fail;
    } else {
        Py_INCREF(site);
        if (!PyList_Check(site) || PyList_GET_SIZE(site) != 2) goto skip;
        Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(site, 0));
        Py_ssize_t limit = attr_ssize(tracer, str_detail_limit);
        if ((count == -1 || limit == -1) && PyErr_Occurred()) goto fail;
        if (count >= limit) { /* on_op's own path past the limit, but inside a recorded optimizer step */
            int whole = attr_true(tracer, str_step_detail);
            if (whole < 0) goto fail;
            if (!whole) goto skip;
        }
    }
    {
        Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(site, 0));
        if (count == -1 && PyErr_Occurred()) goto fail;
        PyObject *more = PyLong_FromSsize_t(count + 1);
        if (more == NULL) goto fail;
        PyList_SetItem(site, 0, more); /* steals */
    }
    if ((counts = PyObject_GetAttr(tracer, str_span_counts)) == NULL) goto fail;
    {
        PyObject *seen = PyDict_GetItemWithError(counts, span);
        if (seen == NULL && PyErr_Occurred()) goto fail;
        Py_ssize_t occurrence = seen != NULL ? PyLong_AsSsize_t(seen) : 0;
        if (occurrence == -1 && PyErr_Occurred()) goto fail;
        PyObject *next = PyLong_FromSsize_t(occurrence + 1);
        if (next == NULL || (occ = PyLong_FromSsize_t(occurrence)) == NULL || PyDict_SetItem(counts, span, next) < 0) {
            Py_XDECREF(next);
            goto fail;
        }
        Py_DECREF(next);
    }
    if ((by_tensor = PyObject_GetAttr(tracer, str_by_tensor)) == NULL || !PyDict_Check(by_tensor)) goto fail;
    Py_ssize_t n_in = PyList_GET_SIZE(tensors);
    if ((inputs = PyList_New(n_in)) == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n_in; i++) {
        PyObject *got = input_record(tracer, by_tensor, PyList_GET_ITEM(tensors, i), span, internal);
        if (got == NULL) goto fail;
        PyList_SET_ITEM(inputs, i, got);
    }
    if ((source_map = PyObject_GetAttr(tracer, str_source_map)) == NULL ||
        (expr = PyObject_CallMethodOneArg(source_map, str_text, span)) == NULL)
        goto fail;
    if ((enabled = PyObject_CallNoArgs(grad_enabled)) == NULL) goto fail;
    {
        PyObject *fn = attr_or(out, str_grad_fn, Py_None);
        if (fn == NULL) goto fail;
        grad_fn = fn == Py_None ? Py_NewRef(Py_None) : PyType_GetName(Py_TYPE(fn));
        Py_DECREF(fn);
        if (grad_fn == NULL) goto fail;
    }
    if ((requires = PyObject_GetAttr(out, str_requires_grad)) == NULL || (leaf = attr_or(out, str_is_leaf, Py_False)) == NULL)
        goto fail;
    {
        PyObject *preview_quiet = PyDict_GetItemWithError(tracer_globals, str_preview_quiet); /* as the module has it now */
        if (preview_quiet == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "tracer.py has no preview_quiet");
            goto fail;
        }
        if ((shown = PyObject_CallOneArg(preview_quiet, out)) == NULL) goto fail;
    }
    if ((trace = PyObject_GetAttr(tracer, str_trace)) == NULL || (records = PyObject_GetAttr(trace, str_records)) == NULL ||
        !PyList_Check(records))
        goto fail;
    if ((rid = PyLong_FromSsize_t(PyList_GET_SIZE(records))) == NULL) goto fail;
    line = span != Py_None && PyObject_IsTrue(span) == 1 && PyTuple_Check(span) ? Py_NewRef(PyTuple_GET_ITEM(span, 0))
                                                                                : Py_NewRef(Py_None);
    {
        /* Record(id=, op=, expr=, line=, span=, occurrence=, grad_fn=, requires_grad=, is_leaf=, grad_enabled=,
         *        inputs=, internal=, module=, preview=) */
        PyObject *argv[] = {rid, op, expr, line, span, occ, grad_fn, requires, leaf, enabled, inputs, internal, module, shown};
        if ((rec = PyObject_Vectorcall(record_cls, argv, 0, record_kwnames)) == NULL) goto fail;
    }
    if (PyList_GET_ITEM(site, 1) == Py_None) {
        if (PyList_SetItem(site, 1, Py_NewRef(rid)) < 0) goto fail;
    }
    /* `_add`: the records, then `_adopt` and the backward recorder's lookup */
    if (PyList_Append(records, rec) < 0) goto fail;
    if ((ref = PyWeakref_NewRef(out, NULL)) == NULL) goto fail;
    {
        PyObject *ident = PyLong_FromVoidPtr(out);
        PyObject *link = ident != NULL ? PyTuple_Pack(2, ref, rid) : NULL;
        int ok = link != NULL && PyDict_SetItem(by_tensor, ident, link) == 0;
        Py_XDECREF(ident);
        Py_XDECREF(link);
        if (!ok) goto fail;
    }
    if ((version = attr_or(out, str_version, Py_None)) == NULL || (live = PyObject_GetAttr(tracer, str_live)) == NULL) goto fail;
    {
        PyObject *state = PyTuple_Pack(2, ref, version);
        int ok = state != NULL && PyDict_SetItem(live, rid, state) == 0;
        Py_XDECREF(state);
        if (!ok) goto fail;
    }
    if (requires == Py_True && note_record(tracer, rid, out, ref) < 0) goto fail;
    result = Py_NewRef(out);
    goto done;
skip:
    result = NULL;
    goto done;
fail:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "the tracer's state is not what the compiled handler reads");
    result = NULL;
done:
    Py_DECREF(tensors);
    Py_XDECREF(runs);
    Py_XDECREF(site);
    Py_XDECREF(counts);
    Py_XDECREF(occ);
    Py_XDECREF(op);
    Py_XDECREF(inputs);
    Py_XDECREF(by_tensor);
    Py_XDECREF(expr);
    Py_XDECREF(source_map);
    Py_XDECREF(enabled);
    Py_XDECREF(grad_fn);
    Py_XDECREF(requires);
    Py_XDECREF(leaf);
    Py_XDECREF(shown);
    Py_XDECREF(trace);
    Py_XDECREF(records);
    Py_XDECREF(rid);
    Py_XDECREF(line);
    Py_XDECREF(rec);
    Py_XDECREF(ref);
    Py_XDECREF(live);
    Py_XDECREF(version);
    return result;
}

/* `Tracer.on_op`'s fast path for a loop's later runs of an op making one tensor (the common case
 * past --limit), here: count it, keep it in the NaN window, link its tensor to the site's first
 * record. Everything else goes to `on_op`, with the site found here. Returns a new reference to
 * what the handler returns, or NULL with an error set. */
static PyObject *later_run(ModeCore *self, PyObject *func, PyObject *name, PyObject *args, PyObject *kwargs,
                           PyObject *out) {
    PyObject *tracer = self->tracer;
    PyObject *found = NULL, *site = NULL, *kw = NULL, *result = NULL;
    PyObject *sites = PyObject_GetAttr(tracer, str_sites);
    if (sites == NULL) goto done;
    found = PyObject_CallMethodOneArg(sites, str_find, name);
    Py_DECREF(sites);
    if (found == NULL) goto done;
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 4) {
        PyErr_SetString(PyExc_TypeError, "find() returns (span, internal, key, module)");
        goto done;
    }
    PyObject *span = PyTuple_GET_ITEM(found, 0), *internal = PyTuple_GET_ITEM(found, 1);
    PyObject *key = PyTuple_GET_ITEM(found, 2), *module = PyTuple_GET_ITEM(found, 3);
    int handled = 0;
    int into = writes_out(kwargs);
    if (into < 0) goto done;
    if (key != Py_None && !inplace_name(name) && !into) {
        PyObject *runs = PyObject_GetAttr(tracer, str_site_runs);
        if (runs == NULL) goto done;
        site = PyDict_GetItemWithError(runs, key);
        Py_XINCREF(site);
        Py_DECREF(runs);
        if (site == NULL && PyErr_Occurred()) goto done;
        if (site != NULL && PyList_Check(site) && PyList_GET_SIZE(site) == 2) {
            Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(site, 0));
            Py_ssize_t limit = attr_ssize(tracer, str_detail_limit);
            if ((count == -1 || limit == -1) && PyErr_Occurred()) goto done;
            int detaching = attr_true(tracer, str_detaching);
            if (detaching < 0) goto done;
            int whole = detaching || count < limit ? 0 : attr_true(tracer, str_step_detail); /* a recorded step: on_op's */
            if (whole < 0) goto done;
            PyObject *depth = detaching || count < limit || whole ? NULL : PyObject_CallNoArgs(stack_len);
            if (depth != NULL) {
                int below = depth == Py_None ? 0 : PyObject_IsTrue(depth);
                Py_DECREF(depth);
                if (below < 0) goto done;
                handled = !below; /* a user's mode below ours would see our reads: on_op takes care */
            } else if (PyErr_Occurred()) {
                goto done;
            }
        }
    }
    kw = kwargs != NULL ? Py_NewRef(kwargs) : PyDict_New();
    if (kw == NULL) goto done;
    if (!handled) {
        result = first_run(self, func, name, args, kwargs, out, span, internal, key, module);
        if (result == NULL && !PyErr_Occurred())
            result = PyObject_CallMethodObjArgs(tracer, str_on_op, func, name, args, kw, out, found, NULL);
        goto done;
    }
    /* runs of this very op: the detail limit; runs of anything at this span: a unique key */
    Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(site, 0));
    PyObject *more = PyLong_FromSsize_t(count + 1);
    if (more == NULL) goto done;
    PyList_SetItem(site, 0, more); /* steals */
    PyObject *counts = PyObject_GetAttr(tracer, str_span_counts);
    if (counts == NULL) goto done;
    PyObject *seen = PyDict_GetItemWithError(counts, span);
    Py_ssize_t occurrence = seen != NULL ? PyLong_AsSsize_t(seen) : 0;
    PyObject *occ = NULL, *next = NULL;
    if ((seen == NULL && PyErr_Occurred()) || (occurrence == -1 && PyErr_Occurred()) ||
        (occ = PyLong_FromSsize_t(occurrence)) == NULL || (next = PyLong_FromSsize_t(occurrence + 1)) == NULL ||
        PyDict_SetItem(counts, span, next) < 0) {
        Py_DECREF(counts);
        Py_XDECREF(occ);
        Py_XDECREF(next);
        goto done;
    }
    Py_DECREF(counts);
    Py_DECREF(next);
    int watching = attr_true(tracer, str_watching);
    if (watching < 0) {
        Py_DECREF(occ);
        goto done;
    }
    if (watching) { /* kept until the next backward call says whether its loss is finite */
        PyObject *outs = PyList_New(1);
        PyObject *py_count = PyLong_FromSsize_t(count);
        PyObject *entry = NULL;
        if (outs != NULL && py_count != NULL) {
            PyList_SET_ITEM(outs, 0, Py_NewRef(out));
            entry = PyTuple_Pack(13, func, name, args, kw, out, outs, span, internal, key, occ, module, site, py_count);
        }
        Py_XDECREF(py_count);
        int cpu = entry != NULL ? attr_true(out, str_is_cpu) : -1;
        PyObject *version = cpu == 1 ? PyObject_GetAttr(out, str_version) : NULL;
        if (cpu == 1 && version == NULL && PyErr_ExceptionMatches(PyExc_RuntimeError)) {
            PyErr_Clear();
            cpu = 0; /* an inference tensor has no version: on_op's path keeps it */
        }
        int kept = -1;
        if (cpu == 0) { /* a device value, or no version: as tracer.py keeps it (a note, once) */
            PyObject *r = PyObject_CallMethod(tracer, "_keep_for_nan_search", "OO", entry, outs);
            kept = r != NULL ? 0 : -1;
            Py_XDECREF(r);
        } else if (cpu == 1 && version != NULL) {
            kept = -1;
            PyObject *versions = PyList_New(1);
            PyObject *enabled = PyObject_CallNoArgs(grad_enabled);
            PyObject *calls = PyObject_GetAttr(tracer, str_backward_calls);
            PyObject *window = PyObject_GetAttr(tracer, str_window);
            PyObject *item = NULL;
            if (versions != NULL && enabled != NULL && calls != NULL && window != NULL) {
                PyList_SET_ITEM(versions, 0, Py_NewRef(version));
                item = PyTuple_Pack(4, entry, enabled, versions, calls);
            }
            if (item != NULL && PyList_Append(window, item) == 0) {
                PyObject *numel = PyObject_CallMethodNoArgs(out, str_numel);
                PyObject *size = numel != NULL ? PyObject_CallMethodNoArgs(out, str_element_size) : NULL;
                PyObject *bytes = size != NULL ? PyNumber_Multiply(numel, size) : NULL;
                PyObject *before = bytes != NULL ? PyObject_GetAttr(tracer, str_window_bytes) : NULL;
                PyObject *after = before != NULL ? PyNumber_Add(before, bytes) : NULL;
                if (after != NULL && PyObject_SetAttr(tracer, str_window_bytes, after) == 0) {
                    Py_ssize_t most = attr_ssize(limits, str_finite_window);
                    PyObject *most_bytes = most != -1 ? PyObject_GetAttr(limits, str_finite_window_bytes) : NULL;
                    int over = most_bytes != NULL ? PyObject_RichCompareBool(after, most_bytes, Py_GE) : -1;
                    if (over >= 0) {
                        if (over || PyList_GET_SIZE(window) >= most) {
                            PyObject *r = PyObject_CallMethodNoArgs(tracer, str_check_window);
                            kept = r != NULL ? 0 : -1;
                            Py_XDECREF(r);
                        } else {
                            kept = 0;
                        }
                    }
                    Py_XDECREF(most_bytes);
                }
                Py_XDECREF(numel);
                Py_XDECREF(size);
                Py_XDECREF(bytes);
                Py_XDECREF(before);
                Py_XDECREF(after);
            }
            Py_XDECREF(item);
            Py_XDECREF(versions);
            Py_XDECREF(enabled);
            Py_XDECREF(calls);
            Py_XDECREF(window);
        }
        Py_XDECREF(version);
        Py_XDECREF(entry);
        Py_XDECREF(outs);
        if (kept < 0) {
            Py_DECREF(occ);
            goto done;
        }
    }
    Py_DECREF(occ);
    /* later uses link to the loop's first record of this site */
    PyObject *first = PyList_GET_ITEM(site, 1);
    if (first != Py_None) {
        PyObject *by_tensor = PyObject_GetAttr(tracer, str_by_tensor);
        PyObject *ident = PyLong_FromVoidPtr(out);
        PyObject *ref = PyWeakref_NewRef(out, NULL);
        PyObject *link = ref != NULL ? PyTuple_Pack(2, ref, first) : NULL;
        int ok = by_tensor != NULL && ident != NULL && link != NULL && PyDict_SetItem(by_tensor, ident, link) == 0;
        Py_XDECREF(by_tensor);
        Py_XDECREF(ident);
        Py_XDECREF(ref);
        Py_XDECREF(link);
        if (!ok) goto done;
    }
    result = Py_NewRef(out);
done:
    Py_XDECREF(found);
    Py_XDECREF(site);
    Py_XDECREF(kw);
    return result;
}

/* ---- a training loop's backward calls past --limit (backward.py's `run` and `_run_unrecorded`) ----
 *
 * The loop's common case, `loss.backward()` with a CPU float scalar loss after `zero_grad()`, costs
 * what its own backward costs again in Python around it (a walk for the line, the loss, the NaN
 * window, the leaves' gradient norm: about 50 us on the loop benchmark). Here it is the same reads
 * in one compiled call. Any other case, and any call before the limit, is backward.py's: `pass_fast`
 * answers NULL with no error set, having changed nothing. Set by configure_passes(): */
static PyObject *tensor_backward, *preview_module, *str_site_counts, *str_last_span, *str_iteration,
    *str_trace, *str_iterations, *str_train_iterations, *str_leaf_records, *str_item, *str_dtype, *str_is_floating,
    *str_loss, *str_grad_norm, *str_fused_squares, *str_fused_preview, *str_leaf_norms, *str_fast_passes;

/* t is an exact torch.Tensor or Parameter: no __torch_function__ of a subclass sees our reads */
static int plain_tensor(PyObject *t) {
    return Py_TYPE(t) == (PyTypeObject *)tensor_type || (param_type != NULL && Py_TYPE(t) == (PyTypeObject *)param_type);
}

/* The live leaves the recorder knows, when none holds a `.grad` (after `zero_grad()`): a new list; NULL
 * with no error set when any holds one, is no plain tensor, or none is known (backward.py's hooks then). */
static PyObject *leaves_without_grad(PyObject *recorder) {
    PyObject *records = PyObject_GetAttr(recorder, str_leaf_records);
    if (records == NULL || !PyDict_Check(records)) {
        Py_XDECREF(records);
        return NULL;
    }
    PyObject *leaves = PyList_New(0), *key, *value;
    Py_ssize_t pos = 0;
    while (leaves != NULL && PyDict_Next(records, &pos, &key, &value)) {
        if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 2 || !PyWeakref_Check(PyTuple_GET_ITEM(value, 0))) {
            Py_CLEAR(leaves);
            break;
        }
        PyObject *t = PyWeakref_GetObject(PyTuple_GET_ITEM(value, 0)); /* borrowed */
        if (t == Py_None) continue;
        PyObject *g = plain_tensor(t) ? PyObject_GetAttr(t, str_grad) : NULL;
        int none = g == Py_None;
        Py_XDECREF(g);
        if (!none || PyList_Append(leaves, t) < 0) Py_CLEAR(leaves);
    }
    Py_DECREF(records);
    if (leaves != NULL && PyList_GET_SIZE(leaves) == 0) Py_CLEAR(leaves);
    return leaves;
}

/* entry.grad_norm from the leaves' new `.grad`s: `squares` (capture/_fused.c) where preview.py has it on,
 * what it leaves (or all of them) to backward.py's `_leaf_norms` (finite.py's exact paths). */
static int leaf_norms(PyObject *recorder, PyObject *leaves, PyObject *entry) {
    PyObject *grads = PyList_New(0), *found = NULL, *rest = NULL;
    if (grads == NULL) return -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(leaves); i++) {
        PyObject *g = PyObject_GetAttr(PyList_GET_ITEM(leaves, i), str_grad);
        int bad = g == NULL || (g != Py_None && PyList_Append(grads, g) < 0); /* a leaf the pass did not reach: none */
        Py_XDECREF(g);
        if (bad) {
            Py_DECREF(grads);
            return -1;
        }
    }
    double total = 0;
    Py_ssize_t count = 0;
    int r = -1;
    PyObject *squares = PyObject_GetAttr(preview_module, str_fused_squares);
    PyObject *in_place = squares != NULL ? PyObject_GetAttr(preview_module, str_fused_preview) : NULL;
    if (in_place == NULL) goto done;
    if (squares != Py_None && in_place != Py_None) {
        found = PyObject_CallOneArg(squares, grads);
        if (found == NULL || !PyArg_ParseTuple(found, "dnO!", &total, &count, &PyList_Type, &rest)) goto done;
        Py_INCREF(rest);
    } else {
        rest = Py_NewRef(grads);
    }
    if (PyList_GET_SIZE(rest) > 0) {
        PyObject *t = PyFloat_FromDouble(total), *c = PyLong_FromSsize_t(count);
        PyObject *done = t != NULL && c != NULL ? PyObject_CallMethodObjArgs(recorder, str_leaf_norms, rest, t, c, entry, NULL)
                                                : NULL;
        Py_XDECREF(t);
        Py_XDECREF(c);
        Py_XDECREF(done);
        r = done != NULL ? 0 : -1;
    } else if (count > 0) {
        PyObject *norm = PyFloat_FromDouble(sqrt(total));
        r = norm != NULL ? PyObject_SetAttr(entry, str_grad_norm, norm) : -1;
        Py_XDECREF(norm);
    } else {
        r = 0;
    }
done:
    Py_XDECREF(squares);
    Py_XDECREF(in_place);
    Py_XDECREF(found);
    Py_XDECREF(rest);
    Py_DECREF(grads);
    return r;
}

static PyObject *pass_fast(ModeCore *self, PyObject *func, PyObject *name, PyObject *args, PyObject *kwargs) {
    PyObject *tracer = self->tracer;
    if (tensor_backward == NULL || func != tensor_backward || PyTuple_GET_SIZE(args) != 1) return NULL;
    if (kwargs != NULL) { /* torch passes each argument by name: only their defaults are this case */
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kwargs, &pos, &key, &value))
            if (value != Py_None && value != Py_False) return NULL;
    }
    PyObject *root = PyTuple_GET_ITEM(args, 0);
    if (Py_TYPE(root) != (PyTypeObject *)tensor_type) return NULL;
    PyObject *recorder = NULL, *found = NULL, *counts = NULL, *leaves = NULL, *entry = NULL, *loss = NULL,
             *result = NULL, *window = NULL;
    int on = attr_true(tracer, str_fast_passes);
    PyObject *depth = on > 0 ? PyObject_CallNoArgs(stack_len) : NULL;
    int below = depth == NULL ? 1 : depth == Py_None ? 0 : PyObject_IsTrue(depth);
    Py_XDECREF(depth);
    if (below != 0) goto not_here; /* a user's mode below ours would see our reads: backward.py's blocks */
    /* the case, read before anything is changed */
    recorder = PyObject_GetAttr(tracer, str_backward);
    PyObject *sites = recorder != NULL ? PyObject_GetAttr(tracer, str_sites) : NULL;
    found = sites != NULL ? PyObject_CallMethodOneArg(sites, str_find, name) : NULL;
    Py_XDECREF(sites);
    if (found == NULL || !PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 4) goto not_here;
    PyObject *span = PyTuple_GET_ITEM(found, 0);
    if (span == Py_None) goto not_here;
    counts = PyObject_GetAttr(recorder, str_site_counts);
    if (counts == NULL || !PyDict_Check(counts)) goto not_here;
    PyObject *seen = PyDict_GetItemWithError(counts, span);
    Py_ssize_t count = seen != NULL ? PyLong_AsSsize_t(seen) : 0;
    Py_ssize_t limit = attr_ssize(tracer, str_detail_limit);
    if (PyErr_Occurred() || count <= limit) goto not_here; /* up to the limit: recorded; at it, also a note */
    PyObject *trace = PyObject_GetAttr(tracer, str_trace);
    PyObject *kept = trace != NULL ? PyObject_GetAttr(trace, str_iterations) : NULL;
    Py_XDECREF(trace);
    Py_ssize_t most = kept != NULL ? attr_ssize(limits, str_train_iterations) : -1;
    Py_ssize_t have = kept != NULL ? PyObject_Length(kept) : -1;
    Py_XDECREF(kept);
    if (PyErr_Occurred() || have < 0 || most < 0 || have >= most) goto not_here; /* past the bound: counted there */
    Py_ssize_t numel = attr_true(root, str_is_cpu) == 1 ? attr_call_ssize(root, str_numel) : -1;
    PyObject *dtype = numel == 1 ? PyObject_GetAttr(root, str_dtype) : NULL;
    int floating = dtype != NULL ? attr_true(dtype, str_is_floating) : -1;
    Py_XDECREF(dtype);
    if (floating != 1) goto not_here;
    leaves = leaves_without_grad(recorder);
    if (leaves == NULL) goto not_here; /* gradients accumulate: hooks read them as they arrive */
    /* the loss, read once (as loss_value): the NaN search asks whether it is finite */
    loss = PyObject_CallMethodNoArgs(root, str_item);
    double value = loss != NULL ? PyFloat_AsDouble(loss) : -1;
    if (loss == NULL || (value == -1 && PyErr_Occurred())) goto not_here;
    /* this call is ours from here on: as run() counts it */
    PyObject *calls = PyObject_GetAttr(tracer, str_backward_calls);
    PyObject *more = calls != NULL ? PyNumber_Add(calls, one) : NULL;
    Py_XDECREF(calls);
    int failed = more == NULL || PyObject_SetAttr(tracer, str_backward_calls, more) < 0;
    Py_XDECREF(more);
    PyObject *next = failed ? NULL : PyLong_FromSsize_t(count + 1);
    failed = next == NULL || PyDict_SetItem(counts, span, next) < 0 || PyObject_SetAttr(recorder, str_last_span, span) < 0;
    Py_XDECREF(next);
    if (failed) goto done;
    entry = PyObject_CallMethodObjArgs(recorder, str_iteration, span, Py_None, NULL); /* not None: checked above */
    if (entry == NULL || PyObject_SetAttr(entry, str_loss, loss) < 0) goto done;
    window = PyObject_GetAttr(tracer, str_window); /* searched only when the loss is not finite (before_backward_quiet) */
    if (window == NULL) goto done;
    if (!PyList_Check(window)) { /* the call is counted already: an error, never a second count by backward.py */
        PyErr_SetString(PyExc_TypeError, "tracer._window is not a list");
        goto done;
    }
    if (PyList_GET_SIZE(window) > 0) {
        if (isfinite(value)) {
            PyObject *zero = PyLong_FromLong(0);
            failed = zero == NULL || PyList_SetSlice(window, 0, PyList_GET_SIZE(window), NULL) < 0 ||
                     PyObject_SetAttr(tracer, str_window_bytes, zero) < 0;
            Py_XDECREF(zero);
            if (failed) goto done;
        } else {
            PyObject *r = PyObject_CallMethodNoArgs(tracer, str_check_window);
            if (r == NULL) goto done;
            Py_DECREF(r);
        }
    }
    result = call(func, args, kwargs); /* the user's backward, as called */
    if (result == NULL) goto done;
    if (leaf_norms(recorder, leaves, entry) < 0) { /* bookkeeping only: noted, as backward.py notes it */
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            Py_CLEAR(result);
            goto done;
        }
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        PyObject *kind = PyObject_GetAttrString(type, "__name__"); /* type(exc).__name__, as backward.py says it */
        PyObject *text = kind != NULL ? PyUnicode_FromFormat("the gradient norm of a pass past the limit was not kept: %S: %S",
                                                             kind, exc != NULL ? exc : Py_None) : NULL;
        Py_XDECREF(kind);
        PyObject *noted = text != NULL ? PyObject_CallMethod(tracer, "note", "O", text) : NULL;
        Py_XDECREF(text);
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        if (noted == NULL) Py_CLEAR(result);
        Py_XDECREF(noted);
    }
    goto done;
not_here: /* nothing changed yet: backward.py's run takes the call, except on a Ctrl-C (or any other
           * BaseException), which goes on to the user as it would from backward.py */
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception)) goto done;
    PyErr_Clear();
done:
    Py_XDECREF(recorder);
    Py_XDECREF(found);
    Py_XDECREF(counts);
    Py_XDECREF(leaves);
    Py_XDECREF(entry);
    Py_XDECREF(loss);
    Py_XDECREF(window);
    return result;
}

static PyObject *configure_passes(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "configure_passes(torch.Tensor.backward, torch.nn.Parameter, preview module)");
        return NULL;
    }
    Py_XSETREF(tensor_backward, Py_NewRef(a[0]));
    Py_XSETREF(param_type, Py_NewRef(a[1]));
    Py_XSETREF(preview_module, Py_NewRef(a[2]));
    Py_RETURN_NONE;
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
        result = pass_fast(self, func, name, args, kwargs);
        if (result != NULL || PyErr_Occurred()) goto done;
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
    PyObject *target = NULL; /* borrowed: what the op is about to change in place */
    if (kind == OP) {
        if (inplace_name(name) && PyTuple_GET_SIZE(args) > 0 &&
            PyObject_TypeCheck(PyTuple_GET_ITEM(args, 0), (PyTypeObject *)tensor_type) &&
            PyUnicode_CompareWithASCIIString(name, "grad_set_") != 0) { /* `t.grad = g` changes no values */
            target = PyTuple_GET_ITEM(args, 0);
        } else if (kwargs != NULL && PyDict_Check(kwargs) && PyDict_GET_SIZE(kwargs)) { /* `out=x`, as the Python handler reads it */
            target = PyDict_GetItemWithError(kwargs, str_out);
            if (target == NULL && PyErr_Occurred()) goto done;
            if (target != NULL && !PyObject_TypeCheck(target, (PyTypeObject *)tensor_type)) target = NULL;
        }
    }
    if (target != NULL) {
        /* about to change a tensor in place: one no record has yet (from before the cell) is previewed
         * first, for the record its use here makes (`Tracer.before_inplace`) */
        PyObject *by_tensor = PyObject_GetAttr(tracer, str_by_tensor);
        if (by_tensor == NULL) goto done;
        int known = PyDict_Check(by_tensor) && record_of(by_tensor, target) != NULL;
        Py_DECREF(by_tensor);
        if (PyErr_Occurred()) goto done;
        if (!known) {
            PyObject *r = PyObject_CallMethodOneArg(tracer, str_before_inplace, target);
            if (r == NULL) goto done; /* it catches its own errors: only an interrupt comes here, before the op runs */
            Py_DECREF(r);
        }
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
    if (kind == OP && PyObject_TypeCheck(out, (PyTypeObject *)tensor_type)) {
        /* errors of our own bookkeeping are noted and the op's output returned, as on_op's */
        result = later_run(self, func, name, args, kwargs, out);
        if (result == NULL) result = swallowed(self, func, out);
        Py_DECREF(out);
        goto done;
    }
    result = record(self, func, name, args, kwargs, out);
done:
    Py_XDECREF(entry);
    Py_XDECREF(empty);
    return result;
}

static PyObject *configure(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 7) {
        PyErr_SetString(PyExc_TypeError, "configure(tensor_type, kinds, call_kind, stack_len, grad_fn_quiet, "
                                         "grad_enabled, limits)");
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
    Py_XSETREF(grad_enabled, Py_NewRef(a[5]));
    Py_XSETREF(limits, Py_NewRef(a[6]));
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

/* tracer.py's `keep_step` reads of a lifted optimizer step's parameters (every step of a training
 * loop past --limit, a read or four per parameter): `_params_state`'s answer, compiled. An error
 * (an inference tensor has no version) is raised for that one to answer. */
static PyObject *params_state(PyObject *module, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "params_state(params): a list of tensors");
    if (seq == NULL) return NULL;
    PyObject *cpu = PyList_New(0), *versions = PyList_New(0), *grads = NULL, *result = NULL;
    Py_ssize_t nbytes = 0, len = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (cpu == NULL || versions == NULL) goto done;
    for (Py_ssize_t i = 0; i < len; i++) {
        int on_cpu = attr_true(items[i], str_is_cpu);
        if (on_cpu < 0) goto done;
        if (!on_cpu) continue;
        if (PyList_Append(cpu, items[i]) < 0) goto done;
        PyObject *v = PyObject_GetAttr(items[i], str_version);
        if (v == NULL) goto done;
        int bad = PyList_Append(versions, v);
        Py_DECREF(v);
        if (bad < 0) goto done;
        Py_ssize_t count = attr_call_ssize(items[i], str_numel);
        Py_ssize_t size = count != -1 ? attr_call_ssize(items[i], str_element_size) : -1;
        if (size == -1 && PyErr_Occurred()) goto done;
        nbytes += count * size;
    }
    grads = PyTuple_New(PyList_GET_SIZE(cpu));
    if (grads == NULL) goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(cpu); i++) {
        PyObject *g = PyObject_GetAttr(PyList_GET_ITEM(cpu, i), str_grad);
        if (g == NULL) goto done;
        PyTuple_SET_ITEM(grads, i, g);
    }
    result = Py_BuildValue("(OOOn)", cpu, grads, versions, nbytes);
done:
    Py_XDECREF(cpu);
    Py_XDECREF(versions);
    Py_XDECREF(grads);
    Py_DECREF(seq);
    return result;
}


/* ---- a training loop's optimizer steps past --limit, lifted (steps.py's `_pre` and `_count_as_before`) ----
 *
 * Every step of a loop past the limit runs its two hooks: the walk for its line, the checks that
 * it may run lifted, and after it the counts and the NaN window's entry. In Python they cost about
 * a sixth of the loop benchmark's plain iteration; here they are the same reads in two calls.
 * Set by configure_steps(): */
static PyObject *st_no_tf, *st_global_pre, *st_global_post, *st_step_name, *st_pop, *st_push, *st_at, *st_lifted;
static PyObject *str_open, *str_tracer, *str_mode, *str_stale, *str_sites_of, *str_alike, *str_interventions,
    *str_pre_hooks, *str_post_hooks, *str_last, *str_param_groups, *str_params, *str_step, *str_keep_step, *str_enter,
    *str_exit, *str_dot_step;

static PyObject *configure_steps(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 7) {
        PyErr_SetString(PyExc_TypeError, "configure_steps(no_torch_function, global pre-hooks, global post-hooks, "
                                         "STEP, pop_mode, push_mode, mode_at)");
        return NULL;
    }
    if (!PyDict_Check(a[1]) || !PyDict_Check(a[2])) {
        PyErr_SetString(PyExc_TypeError, "configure_steps: the global hooks are dicts");
        return NULL;
    }
    if (st_lifted == NULL && (st_lifted = PyUnicode_InternFromString("lifted")) == NULL) return NULL;
    PyObject **slots[] = {&st_no_tf, &st_global_pre, &st_global_post, &st_step_name, &st_pop, &st_push, &st_at};
    for (int i = 0; i < 7; i++) Py_XSETREF(*slots[i], Py_NewRef(a[i]));
    Py_RETURN_NONE;
}

/* The tracer behind steps.tracer (a weak proxy): borrowed, or NULL with no error set when it is gone. */
static PyObject *steps_tracer(PyObject *steps) {
    PyObject *ref = PyObject_GetAttr(steps, str_tracer);
    if (ref == NULL) return NULL;
    PyObject *tracer = PyWeakref_Check(ref) ? PyWeakref_GetObject(ref) : ref;
    Py_DECREF(ref); /* the tracer itself is held by whoever runs it (a proxy's referent, or steps') */
    return tracer == Py_None ? NULL : tracer;
}

/* Torch-function dispatch off (steps.py's `with no_torch_function()`): the context entered, or NULL */
static PyObject *no_tf_enter(void) {
    PyObject *ctx = PyObject_CallNoArgs(st_no_tf);
    if (ctx == NULL) return NULL;
    PyObject *entered = PyObject_CallMethodNoArgs(ctx, str_enter);
    if (entered == NULL) {
        Py_DECREF(ctx);
        return NULL;
    }
    Py_DECREF(entered);
    return ctx;
}

/* ... and back on; `result` (a new reference or NULL with an error set) passed through, or NULL
 * when leaving the context fails */
static PyObject *no_tf_exit(PyObject *ctx, PyObject *result) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *exited = PyObject_CallMethodObjArgs(ctx, str_exit, Py_None, Py_None, Py_None, NULL);
    Py_DECREF(ctx);
    if (exited == NULL) {
        Py_XDECREF(type), Py_XDECREF(value), Py_XDECREF(tb);
        Py_XDECREF(result);
        return NULL;
    }
    Py_DECREF(exited);
    PyErr_Restore(type, value, tb);
    return result;
}

/* lift_step(steps, opt, args, kwargs) -> True when this call of a step now runs lifted (its site's
 * last two traced calls matched: `_Site.alike`; `_may_lift` holds; the mode popped, `steps._open`
 * set, the call counted), False when steps.py's `_pre` takes it, with nothing changed. */
static PyObject *lift_step(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 4) {
        PyErr_SetString(PyExc_TypeError, "lift_step(steps, opt, args, kwargs)");
        return NULL;
    }
    if (st_no_tf == NULL || stack_len == NULL) Py_RETURN_FALSE; /* not configured: steps.py's way */
    PyObject *steps = a[0], *opt = a[1], *args = a[2], *kwargs = a[3];
    PyObject *mode = NULL, *found = NULL, *sites = NULL, *site = NULL, *result = NULL;
    PyObject *open = PyObject_GetAttr(steps, str_open);
    if (open == NULL) return NULL;
    int pending = open != Py_None; /* a lifted call that raised: `_raised` puts the mode back */
    Py_DECREF(open);
    if (pending) Py_RETURN_FALSE;
    PyObject *tracer = Py_XNewRef(steps_tracer(steps)); /* held: the walk below runs Python */
    if (tracer == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_FALSE;
    }
    if ((mode = PyObject_GetAttr(tracer, str_mode)) == NULL) goto done;
    if (mode == Py_None) goto no;
    int r = attr_true(mode, str_stale);
    if (r != 0) goto check;
    if ((r = attr_true(tracer, str_busy)) != 0) goto check;
    if ((r = attr_true(tracer, str_interventions)) != 0) goto check;
    /* `_may_lift`: no argument (a closure), no step hook but ours, ours the mode on top */
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) > 1) goto no;
    if ((r = PyObject_IsTrue(kwargs)) != 0) goto check;
    if ((r = attr_true(opt, str_pre_hooks)) != 0 || (r = attr_true(opt, str_post_hooks)) != 0) goto check;
    if (PyDict_Size(st_global_pre) > 1 || PyDict_Size(st_global_post) > 1) goto no;
    Py_ssize_t depth = ssize_of(PyObject_CallNoArgs(stack_len));
    if (depth == -1 && PyErr_Occurred()) goto done;
    if (depth < 1) goto no;
    PyObject *index = PyLong_FromSsize_t(depth - 1);
    PyObject *top = index != NULL ? PyObject_CallOneArg(st_at, index) : NULL;
    Py_XDECREF(index);
    if (top == NULL) goto done;
    Py_DECREF(top); /* compared by identity only: the tracer holds its mode */
    if (top != mode) goto no;
    /* the line of this call, and whether its site may run lifted */
    PyObject *finder = PyObject_GetAttr(tracer, str_sites);
    PyObject *find = finder != NULL ? PyObject_GetAttr(finder, str_find) : NULL;
    Py_XDECREF(finder);
    PyObject *ctx = find != NULL ? no_tf_enter() : NULL;
    found = ctx != NULL ? no_tf_exit(ctx, PyObject_CallOneArg(find, str_step)) : NULL;
    Py_XDECREF(find);
    if (found == NULL) goto done;
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 4) goto no;
    PyObject *span = PyTuple_GET_ITEM(found, 0);
    if (span == Py_None) goto no;
    if ((sites = PyObject_GetAttr(steps, str_sites_of)) == NULL) goto done;
    if (!PyDict_Check(sites)) goto no;
    site = PyDict_GetItemWithError(sites, span);
    if (site == NULL) {
        if (PyErr_Occurred()) goto done;
        goto no; /* a new site: `_pre` makes it */
    }
    Py_INCREF(site);
    if ((r = attr_true(site, str_alike)) != 1) goto check;
    /* lifted from here: popped, counted, open; put back as it was if any of it fails */
    PyObject *calls = PyObject_GetAttr(site, str_calls);
    PyObject *more = calls != NULL ? PyNumber_Add(calls, one) : NULL;
    PyObject *state = more != NULL ? PyTuple_Pack(3, st_lifted, mode, opt) : NULL;
    PyObject *opened = state != NULL ? PyTuple_Pack(3, site, span, state) : NULL;
    Py_XDECREF(state);
    PyObject *popped = opened != NULL ? PyObject_CallNoArgs(st_pop) : NULL;
    int counted = 0;
    if (popped == NULL || (counted = PyObject_SetAttr(site, str_calls, more) == 0) == 0 ||
        PyObject_SetAttr(steps, str_open, opened) < 0) {
        if (popped != NULL) { /* the mode goes back: as if never lifted */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            if (counted && PyObject_SetAttr(site, str_calls, calls) < 0) PyErr_Clear();
            PyObject *back = PyObject_CallOneArg(st_push, mode);
            if (back == NULL) PyErr_Clear();
            Py_XDECREF(back);
            PyErr_Restore(type, value, tb);
        }
        Py_XDECREF(popped), Py_XDECREF(calls), Py_XDECREF(more), Py_XDECREF(opened);
        goto done;
    }
    Py_DECREF(popped), Py_DECREF(calls), Py_DECREF(more), Py_DECREF(opened);
    result = Py_NewRef(Py_True);
    goto done;
check:
    if (r < 0) goto done;
no:
    result = Py_NewRef(Py_False);
done:
    Py_DECREF(tracer);
    Py_XDECREF(mode);
    Py_XDECREF(found);
    Py_XDECREF(sites);
    Py_XDECREF(site);
    return result;
}

/* count_lifted(steps, site, span, opt): `_count_as_before` and the `keep_step` it calls, compiled:
 * the call counted as the traced one before it, its parameters kept in the NaN window. An error
 * is raised for steps.py's `_post` to note (it puts the mode back). */
static PyObject *count_lifted(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 4) {
        PyErr_SetString(PyExc_TypeError, "count_lifted(steps, site, span, opt)");
        return NULL;
    }
    PyObject *steps = a[0], *site = a[1], *span = a[2], *opt = a[3];
    if (st_no_tf == NULL || tensor_type == NULL || limits == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "count_lifted: not configured");
        return NULL;
    }
    PyObject *tracer = steps_tracer(steps);
    if (tracer == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ReferenceError, "the tracer of these steps is gone");
        return NULL;
    }
    Py_INCREF(tracer);
    PyObject *last = NULL, *runs = NULL, *counts = NULL, *params = NULL, *state = NULL, *result = NULL;
    if ((last = PyObject_GetAttr(site, str_last)) == NULL) goto done;
    if (!PyTuple_Check(last) || PyTuple_GET_SIZE(last) != 3 || !PyTuple_Check(PyTuple_GET_ITEM(last, 0)) ||
        !PyTuple_Check(PyTuple_GET_ITEM(last, 1))) {
        PyErr_SetString(PyExc_TypeError, "a lifted site's last call is (site deltas, span deltas, calls)");
        goto done;
    }
    if ((runs = PyObject_GetAttr(tracer, str_site_runs)) == NULL || (counts = PyObject_GetAttr(tracer, str_span_counts)) == NULL)
        goto done;
    if (!PyDict_Check(runs) || !PyDict_Check(counts)) {
        PyErr_SetString(PyExc_TypeError, "the tracer's counts are dicts");
        goto done;
    }
    PyObject *seen = PyDict_GetItemWithError(counts, span);
    if (seen == NULL && PyErr_Occurred()) goto done;
    PyObject *occurrence = seen != NULL ? seen : PyLong_FromLong(0);
    if (seen != NULL) Py_INCREF(occurrence);
    if (occurrence == NULL) goto done;
    PyObject *deltas = PyTuple_GET_ITEM(last, 0);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(deltas); i++) {
        PyObject *kn = PyTuple_GET_ITEM(deltas, i), *lst = NULL;
        if (!PyTuple_Check(kn) || PyTuple_GET_SIZE(kn) != 2 ||
            (lst = PyDict_GetItemWithError(runs, PyTuple_GET_ITEM(kn, 0))) == NULL || !PyList_Check(lst) ||
            PyList_GET_SIZE(lst) < 1) {
            if (!PyErr_Occurred()) { /* as `runs[k]`: the key is the error */
                if (!PyTuple_Check(kn) || PyTuple_GET_SIZE(kn) != 2) PyErr_SetString(PyExc_TypeError, "a site delta is (key, count)");
                else if (lst == NULL) PyErr_SetObject(PyExc_KeyError, PyTuple_GET_ITEM(kn, 0));
                else PyErr_SetString(PyExc_TypeError, "a site's runs are [count, first record]");
            }
            Py_DECREF(occurrence);
            goto done;
        }
        PyObject *sum = PyNumber_Add(PyList_GET_ITEM(lst, 0), PyTuple_GET_ITEM(kn, 1));
        if (sum == NULL || PyList_SetItem(lst, 0, sum) < 0) { /* SetItem steals */
            Py_DECREF(occurrence);
            goto done;
        }
    }
    deltas = PyTuple_GET_ITEM(last, 1);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(deltas); i++) {
        PyObject *kn = PyTuple_GET_ITEM(deltas, i);
        if (!PyTuple_Check(kn) || PyTuple_GET_SIZE(kn) != 2) {
            PyErr_SetString(PyExc_TypeError, "a span delta is (span, count)");
            Py_DECREF(occurrence);
            goto done;
        }
        PyObject *had = PyDict_GetItemWithError(counts, PyTuple_GET_ITEM(kn, 0));
        if (had == NULL && PyErr_Occurred()) {
            Py_DECREF(occurrence);
            goto done;
        }
        PyObject *zero = had == NULL ? PyLong_FromLong(0) : NULL;
        PyObject *sum = PyNumber_Add(had != NULL ? had : zero, PyTuple_GET_ITEM(kn, 1));
        Py_XDECREF(zero);
        int bad = sum == NULL || PyDict_SetItem(counts, PyTuple_GET_ITEM(kn, 0), sum) < 0;
        Py_XDECREF(sum);
        if (bad) {
            Py_DECREF(occurrence);
            goto done;
        }
    }
    PyObject *calls = PyObject_GetAttr(tracer, str_calls);
    PyObject *more = calls != NULL ? PyNumber_Add(calls, PyTuple_GET_ITEM(last, 2)) : NULL;
    Py_XDECREF(calls);
    int bad = more == NULL || PyObject_SetAttr(tracer, str_calls, more) < 0;
    Py_XDECREF(more);
    int watching = bad ? -1 : attr_true(tracer, str_watching);
    if (watching <= 0) {
        Py_DECREF(occurrence);
        if (watching == 0) result = Py_NewRef(Py_None);
        goto done;
    }
    /* keep_step: the optimizer's CPU parameters, each with the gradient it was updated from */
    params = PyList_New(0);
    PyObject *groups = params != NULL ? PyObject_GetAttr(opt, str_param_groups) : NULL;
    PyObject *it = groups != NULL ? PyObject_GetIter(groups) : NULL;
    Py_XDECREF(groups);
    PyObject *group;
    bad = it == NULL;
    while (!bad && (group = PyIter_Next(it)) != NULL) {
        PyObject *ps = PyObject_GetItem(group, str_params);
        Py_DECREF(group);
        PyObject *pit = ps != NULL ? PyObject_GetIter(ps) : NULL;
        Py_XDECREF(ps);
        PyObject *p;
        bad = pit == NULL;
        while (!bad && (p = PyIter_Next(pit)) != NULL) {
            int is = PyObject_IsInstance(p, tensor_type);
            bad = is < 0 || (is == 1 && PyList_Append(params, p) < 0);
            Py_DECREF(p);
        }
        bad = bad || PyErr_Occurred() != NULL;
        Py_XDECREF(pit);
    }
    Py_XDECREF(it);
    if (bad || PyErr_Occurred()) {
        Py_DECREF(occurrence);
        goto done;
    }
    PyObject *kind = PyObject_GetAttrString((PyObject *)Py_TYPE(opt), "__name__");
    PyObject *internal = kind != NULL ? PyNumber_Add(kind, str_dot_step) : NULL; /* as `type(opt).__name__ + ".step"` */
    Py_XDECREF(kind);
    PyObject *site_calls = internal != NULL ? PyObject_GetAttr(site, str_calls) : NULL;
    PyObject *count = site_calls != NULL ? PyNumber_Subtract(site_calls, one) : NULL;
    Py_XDECREF(site_calls);
    if (count == NULL) {
        Py_XDECREF(internal);
        Py_DECREF(occurrence);
        goto done;
    }
    PyObject *ctx = no_tf_enter();
    state = ctx != NULL ? no_tf_exit(ctx, params_state(NULL, params)) : NULL;
    if (state == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_RuntimeError)) {
            Py_DECREF(internal), Py_DECREF(count), Py_DECREF(occurrence);
            goto done;
        }
        PyErr_Clear(); /* an inference tensor has no version: tracer.py's keep_step reads them its way */
        result = PyObject_CallMethodObjArgs(tracer, str_keep_step, opt, params, span, internal, occurrence, count, NULL);
        Py_DECREF(internal), Py_DECREF(count), Py_DECREF(occurrence);
        goto done;
    }
    PyObject *cpu, *grads, *versions;
    Py_ssize_t nbytes;
    if (!PyArg_ParseTuple(state, "OOOn", &cpu, &grads, &versions, &nbytes)) {
        Py_DECREF(internal), Py_DECREF(count), Py_DECREF(occurrence);
        goto done;
    }
    if (PyList_GET_SIZE(cpu) == 0) {
        Py_DECREF(internal), Py_DECREF(count), Py_DECREF(occurrence);
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *step = PyObject_GetAttr(opt, str_step);
    PyObject *kwargs = step != NULL ? PyDict_New() : NULL;
    PyObject *runs_of = kwargs != NULL ? PyList_New(2) : NULL;
    if (runs_of != NULL) {
        PyList_SET_ITEM(runs_of, 0, Py_NewRef(count));
        PyList_SET_ITEM(runs_of, 1, Py_NewRef(Py_None));
    }
    PyObject *entry = runs_of != NULL ? PyTuple_Pack(13, step, st_step_name, grads, kwargs, Py_None, cpu, span, internal,
                                                      Py_None, occurrence, Py_None, runs_of, count) : NULL;
    Py_XDECREF(step), Py_XDECREF(kwargs), Py_XDECREF(runs_of);
    Py_DECREF(internal), Py_DECREF(count), Py_DECREF(occurrence);
    PyObject *backward_calls = entry != NULL ? PyObject_GetAttr(tracer, str_backward_calls) : NULL;
    PyObject *item = backward_calls != NULL ? PyTuple_Pack(4, entry, Py_False, versions, backward_calls) : NULL;
    Py_XDECREF(entry), Py_XDECREF(backward_calls);
    PyObject *window = item != NULL ? PyObject_GetAttr(tracer, str_window) : NULL;
    bad = window == NULL || !PyList_Check(window) || PyList_Append(window, item) < 0;
    Py_XDECREF(item);
    if (bad) {
        if (window != NULL && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "tracer._window is not a list");
        Py_XDECREF(window);
        goto done;
    }
    Py_ssize_t kept = PyList_GET_SIZE(window);
    Py_DECREF(window);
    PyObject *before = PyObject_GetAttr(tracer, str_window_bytes);
    PyObject *size = before != NULL ? PyLong_FromSsize_t(nbytes) : NULL;
    PyObject *after = size != NULL ? PyNumber_Add(before, size) : NULL;
    Py_XDECREF(before), Py_XDECREF(size);
    if (after == NULL || PyObject_SetAttr(tracer, str_window_bytes, after) < 0) {
        Py_XDECREF(after);
        goto done;
    }
    Py_ssize_t most = attr_ssize(limits, str_finite_window);
    PyObject *most_bytes = most != -1 ? PyObject_GetAttr(limits, str_finite_window_bytes) : NULL;
    int over = most_bytes != NULL ? PyObject_RichCompareBool(after, most_bytes, Py_GE) : -1;
    Py_XDECREF(most_bytes);
    Py_DECREF(after);
    if (over < 0) goto done;
    result = over || kept >= most ? PyObject_CallMethodNoArgs(tracer, str_check_window) : Py_NewRef(Py_None);
done:
    Py_DECREF(tracer);
    Py_XDECREF(last), Py_XDECREF(runs), Py_XDECREF(counts), Py_XDECREF(params), Py_XDECREF(state);
    return result;
}

static PyMethodDef module_methods[] = {
    {"configure_passes", (PyCFunction)(void (*)(void))configure_passes, METH_FASTCALL,
     "configure_passes(torch.Tensor.backward, torch.nn.Parameter, preview module): what the handler's own "
     "backward calls past --limit compare with and read (backward.py, once)."},
    {"params_state", params_state, METH_O,
     "params_state(params) -> (those on the CPU, their .grads, their versions, their bytes): tracer.py's "
     "`_params_state`, compiled."},
    {"configure_steps", (PyCFunction)(void (*)(void))configure_steps, METH_FASTCALL,
     "configure_steps(no_torch_function, global pre-hooks, global post-hooks, STEP, pop_mode, push_mode, mode_at): what "
     "lift_step and count_lifted compare with and call (steps.py, once)."},
    {"lift_step", (PyCFunction)(void (*)(void))lift_step, METH_FASTCALL,
     "lift_step(steps, opt, args, kwargs) -> whether this step call now runs lifted: steps.py's `_pre`, compiled "
     "(False: nothing changed, `_pre` takes it)."},
    {"count_lifted", (PyCFunction)(void (*)(void))count_lifted, METH_FASTCALL,
     "count_lifted(steps, site, span, opt): steps.py's `_count_as_before` with tracer.py's `keep_step`, compiled."},
    {"configure_records", (PyCFunction)(void (*)(void))configure_records, METH_FASTCALL,
     "configure_records(Record, op_name, tracer module's globals): what the handler's own records of an op's "
     "first runs are made of (tracer.py, once)."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(tensor_type, kinds, call_kind, stack_len, grad_fn_quiet, grad_enabled, limits): what ModeCore "
     "reads (tracer.py, once)."},
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
        intern(&str_op_failed, "op_failed") < 0 || intern(&str_sites, "sites") < 0 || intern(&str_find, "find") < 0 ||
        intern(&str_site_runs, "_site_runs") < 0 || intern(&str_span_counts, "_span_counts") < 0 ||
        intern(&str_detail_limit, "detail_limit") < 0 || intern(&str_detaching, "_detaching") < 0 ||
        intern(&str_watching, "_watching") < 0 || intern(&str_window, "_window") < 0 ||
        intern(&str_window_bytes, "_window_bytes") < 0 || intern(&str_backward_calls, "backward_calls") < 0 ||
        intern(&str_by_tensor, "_by_tensor") < 0 || intern(&str_version, "_version") < 0 ||
        intern(&str_is_cpu, "is_cpu") < 0 || intern(&str_numel, "numel") < 0 ||
        intern(&str_element_size, "element_size") < 0 || intern(&str_check_window, "check_window") < 0 ||
        intern(&str_finite_window, "FINITE_WINDOW") < 0 || intern(&str_finite_window_bytes, "FINITE_WINDOW_BYTES") < 0 ||
        intern(&str_grad, "grad") < 0 || intern(&str_site_counts, "_site_counts") < 0 ||
        intern(&str_last_span, "last_span") < 0 || intern(&str_iteration, "_iteration") < 0 ||
        intern(&str_trace, "trace") < 0 || intern(&str_iterations, "iterations") < 0 ||
        intern(&str_train_iterations, "TRAIN_ITERATIONS") < 0 || intern(&str_leaf_records, "leaf_records") < 0 ||
        intern(&str_item, "item") < 0 || intern(&str_dtype, "dtype") < 0 ||
        intern(&str_is_floating, "is_floating_point") < 0 || intern(&str_loss, "loss") < 0 ||
        intern(&str_grad_norm, "grad_norm") < 0 || intern(&str_fused_squares, "_fused_squares") < 0 ||
        intern(&str_fused_preview, "_fused_preview") < 0 || intern(&str_leaf_norms, "_leaf_norms") < 0 ||
        intern(&str_fast_passes, "_fast_passes") < 0 || intern(&str_open, "_open") < 0 ||
        intern(&str_tracer, "tracer") < 0 || intern(&str_mode, "_mode") < 0 || intern(&str_stale, "stale") < 0 ||
        intern(&str_sites_of, "_sites") < 0 || intern(&str_alike, "alike") < 0 ||
        intern(&str_interventions, "interventions") < 0 || intern(&str_pre_hooks, "_optimizer_step_pre_hooks") < 0 ||
        intern(&str_post_hooks, "_optimizer_step_post_hooks") < 0 || intern(&str_last, "last") < 0 ||
        intern(&str_param_groups, "param_groups") < 0 || intern(&str_params, "params") < 0 ||
        intern(&str_step, "step") < 0 || intern(&str_keep_step, "keep_step") < 0 || intern(&str_enter, "__enter__") < 0 ||
        intern(&str_exit, "__exit__") < 0 || intern(&str_dot_step, ".step") < 0 ||
        intern(&str_replacers, "_replacers") < 0 || intern(&str_source_map, "source_map") < 0 ||
        intern(&str_text, "text") < 0 || intern(&str_records, "records") < 0 || intern(&str_live, "_live") < 0 ||
        intern(&str_requires_grad, "requires_grad") < 0 || intern(&str_is_leaf, "is_leaf") < 0 ||
        intern(&str_output_nr, "output_nr") < 0 || intern(&str_sequence_nr, "_sequence_nr") < 0 ||
        intern(&str_node_records, "node_records") < 0 || intern(&str_input_record, "_input_record_quiet") < 0 ||
        intern(&str_preview_quiet, "preview_quiet") < 0 || intern(&str_before_inplace, "before_inplace") < 0 ||
        intern(&str_out, "out") < 0 || intern(&str_step_detail, "_step_detail") < 0)
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
