/* A backward pass's plan, compiled: backward.py's `_plan_py`, the same answer.
 *
 * Before each recorded pass the recorder walks the autograd graph from its
 * roots and decides, per node, what it will hook: its name, key and leaf, its
 * edges, which edges hand a gradient to a slot nothing else feeds, which nodes
 * need a post-hook, and which senders' gradients each receiver fills in. In
 * Python that is a dozen small tuples and lists per node, built for every node
 * of every pass (~85 us of a 3-layer MLP's 16-node pass); here it is one call.
 *
 * What needs Python stays in Python, as callbacks: a node type's name the
 * first time (`name_of`), and whether a node of that name sends views of what
 * it received (`sends_views`). Tests compare this with `_plan_py` on the same
 * graphs. Optional: where it is not built, backward.py plans in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *str_next_functions, *str_variable, *str_sequence_nr, *str_accumulate;

/* ---- an open-addressing map of 64-bit keys to counts or indices (the walk's `index`, the fan-in) ---- */
typedef struct {
    uint64_t *keys;  /* 0 is the empty slot: keys are stored plus one */
    Py_ssize_t *values;
    Py_ssize_t size, used;
} Map;

static int map_init(Map *m, Py_ssize_t hint) {
    Py_ssize_t size = 64;
    while (size < 2 * hint) size *= 2;
    m->keys = PyMem_Calloc(size, sizeof(uint64_t));
    m->values = PyMem_Malloc(size * sizeof(Py_ssize_t));
    m->size = size;
    m->used = 0;
    if (m->keys == NULL || m->values == NULL) {
        PyMem_Free(m->keys);
        PyMem_Free(m->values);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void map_free(Map *m) {
    PyMem_Free(m->keys);
    PyMem_Free(m->values);
}

static inline Py_ssize_t map_slot(const Map *m, uint64_t key) {
    uint64_t h = (key + 1) * 0x9E3779B97F4A7C15ull;
    Py_ssize_t mask = m->size - 1, i = (Py_ssize_t)(h >> 17) & mask;
    while (m->keys[i] != 0 && m->keys[i] != key + 1) i = (i + 1) & mask;
    return i;
}

/* The value of `key`, or -1 when absent. */
static inline Py_ssize_t map_get(const Map *m, uint64_t key) {
    Py_ssize_t i = map_slot(m, key);
    return m->keys[i] == 0 ? -1 : m->values[i];
}

static int map_grow(Map *m) {
    Map bigger;
    if (map_init(&bigger, m->size) < 0) return -1;
    for (Py_ssize_t i = 0; i < m->size; i++) {
        if (m->keys[i] != 0) {
            Py_ssize_t j = map_slot(&bigger, m->keys[i] - 1);
            bigger.keys[j] = m->keys[i];
            bigger.values[j] = m->values[i];
            bigger.used++;
        }
    }
    map_free(m);
    *m = bigger;
    return 0;
}

/* Set `key` to `value` (add = 0), or add `value` to it (add = 1, absent counts as 0). */
static int map_put(Map *m, uint64_t key, Py_ssize_t value, int add) {
    if (2 * (m->used + 1) > m->size && map_grow(m) < 0) return -1;
    Py_ssize_t i = map_slot(m, key);
    if (m->keys[i] == 0) {
        m->keys[i] = key + 1;
        m->values[i] = value;
        m->used++;
    } else {
        m->values[i] = add ? m->values[i] + value : value;
    }
    return 0;
}

/* ---- the plan ---- */

/* `getattr(node, "variable", None)`: a new reference, NULL with an error other than AttributeError set. */
static PyObject *variable_of(PyObject *node) {
    PyObject *v = PyObject_GetAttr(node, str_variable);
    if (v != NULL) return v;
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return NULL;
    PyErr_Clear();
    Py_RETURN_NONE;
}

/* `(node._sequence_nr(), type(node).__name__)`, or None where reading it raises (a new reference). */
static PyObject *key_of(PyObject *node) {
    PyObject *nr = PyObject_CallMethodNoArgs(node, str_sequence_nr);
    PyObject *tname = nr != NULL ? PyType_GetName(Py_TYPE(node)) : NULL;
    PyObject *key = tname != NULL ? PyTuple_Pack(2, nr, tname) : NULL;
    Py_XDECREF(nr);
    Py_XDECREF(tname);
    if (key == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        return NULL;  /* a KeyboardInterrupt goes on */
    }
    return key;
}

/* The name of a node: from `names` (type -> name), or `name_of(node)` (which fills it). */
static PyObject *name_of_node(PyObject *node, PyObject *names, PyObject *name_of) {
    PyObject *name = PyDict_GetItemWithError(names, (PyObject *)Py_TYPE(node));
    if (name != NULL) return Py_NewRef(name);
    if (PyErr_Occurred()) return NULL;
    return PyObject_CallOneArg(name_of, node);
}

/* Everything the walk makes, owned here until returned. */
typedef struct {
    PyObject *nodes, *names, *variables, *keys;
    PyObject **nexts; /* per node: its next_functions (a tuple of (node or None, slot)) */
    Py_ssize_t n_nexts, cap_nexts;
} Walk;

static void walk_clear(Walk *w) {
    Py_CLEAR(w->nodes);
    Py_CLEAR(w->names);
    Py_CLEAR(w->variables);
    Py_CLEAR(w->keys);
    for (Py_ssize_t i = 0; i < w->n_nexts; i++) Py_XDECREF(w->nexts[i]);
    PyMem_Free(w->nexts);
    w->nexts = NULL;
    w->n_nexts = w->cap_nexts = 0;
}

/* A node's next_functions, checked: a tuple of 2-tuples. */
static PyObject *nexts_of(PyObject *node) {
    PyObject *nf = PyObject_GetAttr(node, str_next_functions);
    if (nf == NULL) return NULL;
    if (!PyTuple_Check(nf)) {
        Py_DECREF(nf);
        PyErr_SetString(PyExc_TypeError, "next_functions is not a tuple");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(nf); i++) {
        PyObject *e = PyTuple_GET_ITEM(nf, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 2) {
            Py_DECREF(nf);
            PyErr_SetString(PyExc_TypeError, "an edge of next_functions is not (node, slot)");
            return NULL;
        }
    }
    return nf;
}

/* The depth-first walk of backward.py's `_plan_py`: same order, same limit. 0 or -1 (error set). */
static int walk(Walk *w, PyObject *start, Py_ssize_t max_walk, Map *index) {
    PyObject *stack = PySequence_List(start);
    if (stack == NULL) return -1;
    int rc = -1;
    while (PyList_GET_SIZE(stack) > 0 && PyList_GET_SIZE(w->nodes) < max_walk) {
        Py_ssize_t top = PyList_GET_SIZE(stack) - 1;
        PyObject *node = Py_NewRef(PyList_GET_ITEM(stack, top));
        if (PyList_SetSlice(stack, top, top + 1, NULL) < 0) {
            Py_DECREF(node);
            goto done;
        }
        if (node == Py_None || map_get(index, (uint64_t)(uintptr_t)node) >= 0) {
            Py_DECREF(node);
            continue;
        }
        Py_ssize_t nid = PyList_GET_SIZE(w->nodes);
        int bad = map_put(index, (uint64_t)(uintptr_t)node, nid, 0) < 0 || PyList_Append(w->nodes, node) < 0;
        Py_DECREF(node);  /* held by w->nodes from here on */
        if (bad) goto done;
        PyObject *nf = nexts_of(node);
        if (nf == NULL) goto done;
        if (w->n_nexts == w->cap_nexts) {
            Py_ssize_t cap = w->cap_nexts ? 2 * w->cap_nexts : 64;
            PyObject **grown = PyMem_Realloc(w->nexts, cap * sizeof(PyObject *));
            if (grown == NULL) {
                Py_DECREF(nf);
                PyErr_NoMemory();
                goto done;
            }
            w->nexts = grown;
            w->cap_nexts = cap;
        }
        w->nexts[w->n_nexts++] = nf;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(nf); i++) {
            PyObject *nxt = PyTuple_GET_ITEM(PyTuple_GET_ITEM(nf, i), 0);
            if (nxt != Py_None && map_get(index, (uint64_t)(uintptr_t)nxt) < 0 && PyList_Append(stack, nxt) < 0)
                goto done;
        }
    }
    rc = 0;
done:
    Py_DECREF(stack);
    return rc;
}

/* Each node's name, leaf (for AccumulateGrad and a custom Function's node) and key. */
static int describe(Walk *w, PyObject *names, PyObject *name_of, PyObject *py_node) {
    Py_ssize_t n = PyList_GET_SIZE(w->nodes);
    for (Py_ssize_t nid = 0; nid < n; nid++) {
        PyObject *node = PyList_GET_ITEM(w->nodes, nid);
        PyObject *name = name_of_node(node, names, name_of);
        if (name == NULL) return -1;
        int rc = PyList_Append(w->names, name);
        int acc = PyUnicode_Check(name) && PyUnicode_Compare(name, str_accumulate) == 0;
        Py_DECREF(name);
        if (rc < 0) return -1;
        int custom = PyObject_TypeCheck(node, (PyTypeObject *)py_node);
        PyObject *variable = acc || custom ? variable_of(node) : Py_NewRef(Py_None);
        if (variable == NULL) return -1;
        rc = PyList_Append(w->variables, variable);
        Py_DECREF(variable);
        if (rc < 0) return -1;
        PyObject *key = key_of(node);
        if (key == NULL) return -1;
        rc = PyList_Append(w->keys, key);
        Py_DECREF(key);
        if (rc < 0) return -1;
    }
    return 0;
}

static uint64_t slot_key(Py_ssize_t target, long slot) {
    return ((uint64_t)target << 24) ^ (uint64_t)(uint32_t)slot;
}

/* plan(start, max_walk, all_run, names, name_of, sends_views, py_node)
 *   -> (nodes, names, variables, keys, edges_of, all_edges, handoffs, posts, fed)
 * `_plan_py`'s, see there. */
static PyObject *plan(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 7 || !PyDict_Check(a[3]) || !PyType_Check(a[6])) {
        PyErr_SetString(PyExc_TypeError, "plan(start, max_walk, all_run, names: dict, name_of, sends_views, py_node: type)");
        return NULL;
    }
    Py_ssize_t max_walk = PyLong_AsSsize_t(a[1]);
    if (max_walk == -1 && PyErr_Occurred()) return NULL;
    int all_run = PyObject_IsTrue(a[2]);
    if (all_run < 0) return NULL;
    PyObject *names_cache = a[3], *name_of = a[4], *sends_views = a[5], *py_node = a[6];
    Walk w = {PyList_New(0), PyList_New(0), PyList_New(0), PyList_New(0), NULL, 0, 0};
    PyObject *edges_of = NULL, *all_edges = NULL, *handoffs = NULL, *posts = NULL, *fed = NULL, *result = NULL;
    Map index = {0}, fan_in = {0};
    int have_index = 0, have_fan = 0;
    if (w.nodes == NULL || w.names == NULL || w.variables == NULL || w.keys == NULL) goto done;
    if (map_init(&index, 64) < 0) goto done;
    have_index = 1;
    if (walk(&w, a[0], max_walk, &index) < 0 || describe(&w, names_cache, name_of, py_node) < 0) goto done;
    Py_ssize_t count = PyList_GET_SIZE(w.nodes);
    if (map_init(&fan_in, 2 * count) < 0) goto done;
    have_fan = 1;
    edges_of = PyList_New(count);
    all_edges = PyList_New(0);
    handoffs = PyList_New(count);
    posts = PyList_New(count);
    fed = PyDict_New();
    if (edges_of == NULL || all_edges == NULL || handoffs == NULL || posts == NULL || fed == NULL) goto done;
    /* each edge's target (its index, or None: a node the walk did not reach) and the edges into each slot */
    for (Py_ssize_t nid = 0; nid < count; nid++) {
        PyObject *nf = w.nexts[nid];
        Py_ssize_t m = PyTuple_GET_SIZE(nf);
        PyObject *edges = PyList_New(m);
        if (edges == NULL) goto done;
        PyList_SET_ITEM(edges_of, nid, edges);
        for (Py_ssize_t i = 0; i < m; i++) {
            PyObject *pair = PyTuple_GET_ITEM(nf, i), *nxt = PyTuple_GET_ITEM(pair, 0), *slot = PyTuple_GET_ITEM(pair, 1);
            Py_ssize_t target = nxt == Py_None ? -1 : map_get(&index, (uint64_t)(uintptr_t)nxt);
            PyObject *t = target < 0 ? Py_NewRef(Py_None) : PyLong_FromSsize_t(target);
            if (t == NULL) goto done;
            PyObject *edge = PyTuple_Pack(2, t, slot);
            if (edge == NULL) {
                Py_DECREF(t);
                goto done;
            }
            PyList_SET_ITEM(edges, i, edge);
            if (target >= 0) {
                PyObject *from = PyLong_FromSsize_t(nid);
                PyObject *pair_out = from != NULL ? PyTuple_Pack(2, from, t) : NULL;
                Py_XDECREF(from);
                int bad = pair_out == NULL || PyList_Append(all_edges, pair_out) < 0;
                Py_XDECREF(pair_out);
                long s = PyLong_AsLong(slot);
                if (bad || (s == -1 && PyErr_Occurred()) || map_put(&fan_in, slot_key(target, s), 1, 1) < 0) {
                    Py_DECREF(t);
                    goto done;
                }
            }
            Py_DECREF(t);
        }
    }
    /* hand-offs, post-hooks, and what each receiver fills in for senders without a post-hook */
    for (Py_ssize_t nid = 0; nid < count; nid++) {
        PyObject *nf = w.nexts[nid], *edges = PyList_GET_ITEM(edges_of, nid);
        PyObject *node = PyList_GET_ITEM(w.nodes, nid), *name = PyList_GET_ITEM(w.names, nid);
        Py_ssize_t m = PyTuple_GET_SIZE(nf);
        PyObject *hand = PyList_New(m);
        if (hand == NULL) goto done;
        PyList_SET_ITEM(handoffs, nid, hand);
        int all_handed = 1;
        int custom = PyObject_TypeCheck(node, (PyTypeObject *)py_node);
        for (Py_ssize_t i = 0; i < m; i++) {
            PyObject *edge = PyList_GET_ITEM(edges, i), *t = PyTuple_GET_ITEM(edge, 0);
            int h = 0;
            if (t != Py_None) {
                long s = PyLong_AsLong(PyTuple_GET_ITEM(edge, 1));
                h = map_get(&fan_in, slot_key(PyLong_AsSsize_t(t), s)) == 1;
            }
            PyList_SET_ITEM(hand, i, Py_NewRef(h ? Py_True : Py_False));
            PyObject *nxt = PyTuple_GET_ITEM(PyTuple_GET_ITEM(nf, i), 0);
            if (!(h || (nxt == Py_None && !custom))) all_handed = 0;
        }
        int acc = PyUnicode_Check(name) && PyUnicode_Compare(name, str_accumulate) == 0;
        int post = !acc;
        if (post && all_run && PyList_GET_ITEM(w.variables, nid) == Py_None && m > 0 && all_handed) {
            PyObject *views = PyObject_CallOneArg(sends_views, name);
            int sends = views != NULL ? PyObject_IsTrue(views) : -1;
            Py_XDECREF(views);
            if (sends < 0) goto done;
            post = sends;
        }
        PyList_SET_ITEM(posts, nid, Py_NewRef(post ? Py_True : Py_False));
        if (post) continue;
        for (Py_ssize_t i = 0; i < m; i++) {
            PyObject *edge = PyList_GET_ITEM(edges, i), *t = PyTuple_GET_ITEM(edge, 0);
            if (t == Py_None) continue;
            PyObject *list = PyDict_GetItemWithError(fed, t);
            if (list == NULL) {
                if (PyErr_Occurred()) goto done;
                list = PyList_New(0);
                if (list == NULL) goto done;
                int bad = PyDict_SetItem(fed, t, list) < 0;
                Py_DECREF(list);
                if (bad) goto done;
            }
            PyObject *from = PyLong_FromSsize_t(nid), *at = PyLong_FromSsize_t(i);
            PyObject *entry = from != NULL && at != NULL ? PyTuple_Pack(3, PyTuple_GET_ITEM(edge, 1), from, at) : NULL;
            Py_XDECREF(from);
            Py_XDECREF(at);
            int bad = entry == NULL || PyList_Append(list, entry) < 0;
            Py_XDECREF(entry);
            if (bad) goto done;
        }
    }
    result = PyTuple_Pack(9, w.nodes, w.names, w.variables, w.keys, edges_of, all_edges, handoffs, posts, fed);
done:
    if (have_index) map_free(&index);
    if (have_fan) map_free(&fan_in);
    walk_clear(&w);
    Py_XDECREF(edges_of);
    Py_XDECREF(all_edges);
    Py_XDECREF(handoffs);
    Py_XDECREF(posts);
    Py_XDECREF(fed);
    return result;
}

static PyMethodDef module_methods[] = {
    {"plan", (PyCFunction)(void (*)(void))plan, METH_FASTCALL,
     "plan(start, max_walk, all_run, names, name_of, sends_views, py_node) -> (nodes, names, variables, keys, "
     "edges_of, all_edges, handoffs, posts, fed): backward.py's _plan_py, compiled."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_graph", NULL, -1, module_methods};

static int intern(PyObject **slot, const char *text) {
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC PyInit__graph(void) {
    if (intern(&str_next_functions, "next_functions") < 0 || intern(&str_variable, "variable") < 0 ||
        intern(&str_sequence_nr, "_sequence_nr") < 0 || intern(&str_accumulate, "AccumulateGrad") < 0)
        return NULL;
    return PyModule_Create(&module);
}
