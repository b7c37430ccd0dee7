/* A backward pass's plan, compiled: backward.py's `_plan_py`, the same answer.
 *
 * Before each recorded pass the recorder walks the autograd graph from its
 * roots and decides, per node, what it will hook: its name, key and leaf, its
 * edges, which edges hand a gradient to a slot nothing else feeds, which nodes
 * need a post-hook, and which senders' gradients each receiver fills in. In
 * Python that is a dozen small tuples and lists per node, built for every node
 * of every pass (~85 us of a 3-layer MLP's 16-node pass); here it is one call.
 *
 * Also each node's pre-hook (`PreHook`, backward.py's `_PreHook`): called by the engine for
 * every node of every pass, with its previews, hand-offs and step.
 *
 * What needs Python stays in Python, as callbacks: a node type's name the
 * first time (`name_of`), and whether a node of that name sends views of what
 * it received (`sends_views`). Tests compare this with `_plan_py` on the same
 * graphs. Optional: where it is not built, backward.py plans in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

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

/* ---- a node's pre-hook: backward.py's `_PreHook`, compiled ----
 *
 * Called by torch's engine with the gradients a node receives, before it runs: their previews,
 * what senders without a post-hook sent it (`fed`) or held for it, the node's step, and for
 * AccumulateGrad what its leaf may take over. Same fields, same behaviour as `_PreHook` (tests run
 * the backward suite on both); `shared` is the pass's `_PassHooks`. Set up by `configure`. */

static PyObject *step_type;      /* data/trace.py's BackwardStep */
static PyObject *no_torch_fn;    /* torch._C.DisableTorchFunction */
static PyObject *strided;        /* torch.strided */
static PyObject *str_get, *str_by_node, *str_held, *str_steps, *str_recorder, *str_p, *str_accumulated,
    *str_version_seen, *str_grad_out, *str_missed, *str_store,
    *str_layout, *str_data_ptr, *str_shape, *str_enter, *str_exit;

typedef struct {
    PyObject_HEAD
    PyObject *shared, *nid, *name, *outs, *nexts, *fed, *leaf;
    char no_post;
} PreHook;

static int prehook_init(PreHook *self, PyObject *args, PyObject *kwds) {
    PyObject *shared, *nid, *name, *outs, *nexts, *fed, *leaf;
    int no_post;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "PreHook takes no keywords");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OOOOOOpO:PreHook", &shared, &nid, &name, &outs, &nexts, &fed, &no_post, &leaf))
        return -1;
    if (!PyLong_Check(nid) || !PyList_Check(nexts)) {
        PyErr_SetString(PyExc_TypeError, "PreHook: nid is an int, nexts a list");
        return -1;
    }
    Py_XSETREF(self->shared, Py_NewRef(shared));
    Py_XSETREF(self->nid, Py_NewRef(nid));
    Py_XSETREF(self->name, Py_NewRef(name));
    Py_XSETREF(self->outs, Py_NewRef(outs));
    Py_XSETREF(self->nexts, Py_NewRef(nexts));
    Py_XSETREF(self->fed, Py_NewRef(fed));
    Py_XSETREF(self->leaf, Py_NewRef(leaf));
    self->no_post = (char)no_post;
    return 0;
}

/* `sender.grad_out[i] = value` where that entry is still None and exists. */
static int fill_sent(PyObject *sender, Py_ssize_t i, PyObject *value) {
    PyObject *out = PyObject_GetAttr(sender, str_grad_out);
    if (out == NULL) return -1;
    int rc = 0;
    if (PyList_Check(out)) {
        if (i < PyList_GET_SIZE(out) && PyList_GET_ITEM(out, i) == Py_None) {
            PyList_SetItem(out, i, Py_NewRef(value));
        }
    } else {
        Py_ssize_t n = PyObject_Length(out);
        if (n < 0) rc = -1;
        else if (i < n) {
            PyObject *cur = PySequence_GetItem(out, i);
            if (cur == NULL) rc = -1;
            else {
                if (cur == Py_None) rc = PySequence_SetItem(out, i, value);
                Py_DECREF(cur);
            }
        }
    }
    Py_DECREF(out);
    return rc;
}

/* The body; 0, or -1 with an error set. */
static int prehook_body(PreHook *self, PyObject *grads) {
    PyObject *sh = self->shared;
    PyObject *get = NULL, *by_node = NULL, *held = NULL, *steps = NULL, *grad_in = NULL, *got = NULL, *step = NULL;
    int rc = -1;
    if (!PyTuple_Check(grads) && !PyList_Check(grads)) {
        PyErr_SetString(PyExc_TypeError, "a pre-hook's gradients are not a tuple");
        return -1;
    }
    PyObject *seq = PySequence_Fast(grads, "gradients");
    if (seq == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **g = PySequence_Fast_ITEMS(seq);
    if ((get = PyObject_GetAttr(sh, str_get)) == NULL || (by_node = PyObject_GetAttr(sh, str_by_node)) == NULL ||
        (held = PyObject_GetAttr(sh, str_held)) == NULL || (steps = PyObject_GetAttr(sh, str_steps)) == NULL)
        goto done;
    if (!PyDict_Check(by_node) || !PyDict_Check(held) || !PyList_Check(steps)) {
        PyErr_SetString(PyExc_TypeError, "a pass's by_node and held are dicts, its steps a list");
        goto done;
    }
    if ((grad_in = PyList_New(n)) == NULL) goto done;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *shown = PyObject_CallOneArg(get, g[k]);
        if (shown == NULL) goto done;
        PyList_SET_ITEM(grad_in, k, shown);
    }
    /* what senders without a post-hook sent: exactly what this node received */
    PyObject *fed = PySequence_Fast(self->fed, "fed");
    if (fed == NULL) goto done;
    for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(fed); k++) {
        PyObject *e = PySequence_Fast_ITEMS(fed)[k];
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3) {
            Py_DECREF(fed);
            PyErr_SetString(PyExc_TypeError, "fed: an entry is not (slot, sender, edge)");
            goto done;
        }
        Py_ssize_t slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(e, 0)), i = PyLong_AsSsize_t(PyTuple_GET_ITEM(e, 2));
        if ((slot == -1 || i == -1) && PyErr_Occurred()) {
            Py_DECREF(fed);
            goto done;
        }
        PyObject *sender = PyDict_GetItemWithError(by_node, PyTuple_GET_ITEM(e, 1));
        if (sender == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(fed);
                goto done;
            }
            continue;
        }
        if (slot >= 0 && slot < n && i >= 0 && fill_sent(sender, i, PyList_GET_ITEM(grad_in, slot)) < 0) {
            Py_DECREF(fed);
            goto done;
        }
    }
    Py_DECREF(fed);
    /* what senders held for this node: released before it runs (AccumulateGrad may take it over) */
    if (PyDict_GET_SIZE(held)) {
        for (Py_ssize_t slot = 0; slot < n; slot++) {
            PyObject *at = PyLong_FromSsize_t(slot);
            PyObject *key = at != NULL ? PyTuple_Pack(2, self->nid, at) : NULL;
            Py_XDECREF(at);
            if (key == NULL) goto done;
            PyObject *sent = PyDict_GetItemWithError(held, key);
            if (sent == NULL) {
                Py_DECREF(key);
                if (PyErr_Occurred()) goto done;
                continue;
            }
            Py_INCREF(sent);
            int bad = PyDict_DelItem(held, key) < 0;
            Py_DECREF(key);
            if (bad || !PyTuple_Check(sent) || PyTuple_GET_SIZE(sent) != 3) {
                if (!bad) PyErr_SetString(PyExc_TypeError, "held: an entry is not (gradient, sender, edge)");
                Py_DECREF(sent);
                goto done;
            }
            PyObject *sg = PyTuple_GET_ITEM(sent, 0), *sender = PyTuple_GET_ITEM(sent, 1);
            Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(sent, 2));
            PyObject *shown = i == -1 && PyErr_Occurred() ? NULL
                              : sg == g[slot] ? Py_NewRef(PyList_GET_ITEM(grad_in, slot)) : PyObject_CallOneArg(get, sg);
            bad = shown == NULL || (i >= 0 && fill_sent(sender, i, shown) < 0);
            Py_XDECREF(shown);
            Py_DECREF(sent);
            if (bad) goto done;
        }
    }
    /* the records whose gradient this node received: `BackwardRecorder._store`, one definition */
    int has_outs = PyObject_IsTrue(self->outs);
    if (has_outs < 0) goto done;
    if (has_outs) {
        PyObject *recorder = PyObject_GetAttr(sh, str_recorder), *p = recorder != NULL ? PyObject_GetAttr(sh, str_p) : NULL;
        got = recorder != NULL && p != NULL ? PyObject_CallMethodObjArgs(recorder, str_store, p, self->outs, grad_in, NULL) : NULL;
        Py_XDECREF(p);
        Py_XDECREF(recorder);
        if (got == NULL) goto done;
    } else if ((got = PyList_New(0)) == NULL) {
        goto done;
    }
    {
        Py_ssize_t m = PyList_GET_SIZE(self->nexts);
        PyObject *sent = PyList_New(self->no_post ? m : 0);
        if (sent == NULL) goto done;
        for (Py_ssize_t k = 0; self->no_post && k < m; k++) PyList_SET_ITEM(sent, k, Py_NewRef(Py_None));
        PyObject *at = PyLong_FromSsize_t(PyList_GET_SIZE(steps));
        if (at == NULL) {
            Py_DECREF(sent);
            goto done;
        }
        PyObject *argv[] = {at, self->name, self->nid, got, grad_in, sent, self->nexts};
        step = PyObject_Vectorcall(step_type, argv, 7, NULL);
        Py_DECREF(at);
        Py_DECREF(sent);
        if (step == NULL || PyList_Append(steps, step) < 0 || PyDict_SetItem(by_node, self->nid, step) < 0) goto done;
    }
    /* AccumulateGrad: what its leaf may take over, read once the pass is over (`_note_new_grads`) */
    if (self->leaf != Py_None && n > 0 && g[0] != Py_None) {
        PyObject *layout = PyObject_GetAttr(g[0], str_layout);
        if (layout == NULL) goto done;
        int dense = layout == strided;
        Py_DECREF(layout);
        if (dense) {
            PyObject *acc = PyObject_GetAttr(sh, str_accumulated), *seen = acc != NULL ? PyObject_GetAttr(sh, str_version_seen) : NULL;
            PyObject *ptr = acc != NULL && seen != NULL ? PyObject_CallMethodNoArgs(g[0], str_data_ptr) : NULL;
            PyObject *shape = ptr != NULL ? PyObject_GetAttr(g[0], str_shape) : NULL;
            PyObject *version = shape != NULL ? PyObject_CallOneArg(seen, g[0]) : NULL;
            PyObject *entry = version != NULL ? PyTuple_Pack(5, self->leaf, ptr, shape, version, PyList_GET_ITEM(grad_in, 0)) : NULL;
            int bad = entry == NULL || PyList_Append(acc, entry) < 0;
            Py_XDECREF(entry);
            Py_XDECREF(version);
            Py_XDECREF(shape);
            Py_XDECREF(ptr);
            Py_XDECREF(seen);
            Py_XDECREF(acc);
            if (bad) goto done;
        }
    }
    rc = 0;
done:
    Py_XDECREF(step);
    Py_XDECREF(got);
    Py_XDECREF(grad_in);
    Py_XDECREF(steps);
    Py_XDECREF(held);
    Py_XDECREF(by_node);
    Py_XDECREF(get);
    Py_DECREF(seq);
    return rc;
}

static PyObject *prehook_call(PreHook *self, PyObject *const *a, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a pre-hook takes the node's gradients");
        return NULL;
    }
    if (self->shared == NULL || no_torch_fn == NULL || step_type == NULL) { /* __new__ alone, or configure() never ran */
        PyErr_SetString(PyExc_TypeError, "PreHook called before PreHook.__init__ and _graph.configure");
        return NULL;
    }
    PyObject *ctx = PyObject_CallNoArgs(no_torch_fn);  /* our reads are not the user's ops */
    if (ctx == NULL) return NULL;
    PyObject *entered = PyObject_CallMethodNoArgs(ctx, str_enter);
    if (entered == NULL) {
        Py_DECREF(ctx);
        return NULL;
    }
    Py_DECREF(entered);
    int rc = prehook_body(self, a[0]);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *exited = PyObject_CallMethodObjArgs(ctx, str_exit, Py_None, Py_None, Py_None, NULL);
    Py_DECREF(ctx);
    if (exited == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return NULL;
    }
    Py_DECREF(exited);
    PyErr_Restore(type, value, tb);
    if (rc < 0) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;  /* a KeyboardInterrupt goes on */
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL) PyException_SetTraceback(value, tb);
        PyObject *recorder = PyObject_GetAttr(self->shared, str_recorder);
        PyObject *noted = recorder != NULL ? PyObject_CallMethodOneArg(recorder, str_missed, value) : NULL;
        Py_XDECREF(recorder);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        if (noted == NULL) return NULL;
        Py_DECREF(noted);
    }
    Py_RETURN_NONE;  /* never replaces a gradient */
}

static int prehook_traverse(PreHook *self, visitproc visit, void *arg) {
    Py_VISIT(self->shared);
    Py_VISIT(self->nid);
    Py_VISIT(self->name);
    Py_VISIT(self->outs);
    Py_VISIT(self->nexts);
    Py_VISIT(self->fed);
    Py_VISIT(self->leaf);
    return 0;
}

static int prehook_clear(PreHook *self) {
    Py_CLEAR(self->shared);
    Py_CLEAR(self->nid);
    Py_CLEAR(self->name);
    Py_CLEAR(self->outs);
    Py_CLEAR(self->nexts);
    Py_CLEAR(self->fed);
    Py_CLEAR(self->leaf);
    return 0;
}

static void prehook_dealloc(PreHook *self) {
    PyObject_GC_UnTrack(self);
    prehook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *prehook_vectorcall_entry(PyObject *self, PyObject *const *a, size_t nargsf, PyObject *kwnames) {
    return prehook_call((PreHook *)self, a, nargsf, kwnames);
}

static PyObject *prehook_tp_call(PyObject *self, PyObject *args, PyObject *kwargs) {
    return PyVectorcall_Call(self, args, kwargs);
}

static PyObject *prehook_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PreHook *self = (PreHook *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    *(vectorcallfunc *)((char *)self + type->tp_vectorcall_offset) = prehook_vectorcall_entry;
    return (PyObject *)self;
}

typedef struct {
    PreHook base;
    vectorcallfunc vectorcall;
} PreHookObject;

static PyMemberDef prehook_members[] = {
    {"shared", T_OBJECT, offsetof(PreHook, shared), READONLY, "the pass's _PassHooks"},
    {"nid", T_OBJECT, offsetof(PreHook, nid), READONLY, "the node's index in the pass"},
    {"name", T_OBJECT, offsetof(PreHook, name), READONLY, "the node's name"},
    {"outs", T_OBJECT, offsetof(PreHook, outs), READONLY, "[(output index, record id)] it receives for"},
    {"nexts", T_OBJECT, offsetof(PreHook, nexts), READONLY, "the node each edge leads to, or None"},
    {"fed", T_OBJECT, offsetof(PreHook, fed), READONLY, "[(slot, sender, edge)] it fills in"},
    {"leaf", T_OBJECT, offsetof(PreHook, leaf), READONLY, "AccumulateGrad's leaf, else None"},
    {"no_post", T_BOOL, offsetof(PreHook, no_post), READONLY, "the node has no post-hook"},
    {NULL},
};

static PyTypeObject PreHookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "autograd_magic.capture._graph.PreHook",
    .tp_basicsize = sizeof(PreHookObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "backward.py's _PreHook, compiled: PreHook(shared, nid, name, outs, nexts, fed, no_post, leaf).",
    .tp_vectorcall_offset = offsetof(PreHookObject, vectorcall),
    .tp_call = prehook_tp_call,
    .tp_new = prehook_new,
    .tp_init = (initproc)prehook_init,
    .tp_traverse = (traverseproc)prehook_traverse,
    .tp_clear = (inquiry)prehook_clear,
    .tp_dealloc = (destructor)prehook_dealloc,
    .tp_members = prehook_members,
};

/* configure(BackwardStep, DisableTorchFunction, torch.strided): what PreHook makes and reads (backward.py, once). */
static PyObject *configure(PyObject *module, PyObject *const *a, Py_ssize_t n) {
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "configure(BackwardStep, DisableTorchFunction, strided)");
        return NULL;
    }
    Py_XSETREF(step_type, Py_NewRef(a[0]));
    Py_XSETREF(no_torch_fn, Py_NewRef(a[1]));
    Py_XSETREF(strided, Py_NewRef(a[2]));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"plan", (PyCFunction)(void (*)(void))plan, METH_FASTCALL,
     "plan(start, max_walk, all_run, names, name_of, sends_views, py_node) -> (nodes, names, variables, keys, "
     "edges_of, all_edges, handoffs, posts, fed): backward.py's _plan_py, compiled."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(BackwardStep, DisableTorchFunction, strided): what PreHook makes and reads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_graph", NULL, -1, module_methods};

static int intern(PyObject **slot, const char *text) {
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC PyInit__graph(void) {
    if (intern(&str_next_functions, "next_functions") < 0 || intern(&str_variable, "variable") < 0 ||
        intern(&str_sequence_nr, "_sequence_nr") < 0 || intern(&str_accumulate, "AccumulateGrad") < 0 ||
        intern(&str_get, "get") < 0 || intern(&str_by_node, "by_node") < 0 || intern(&str_held, "held") < 0 ||
        intern(&str_steps, "steps") < 0 || intern(&str_recorder, "recorder") < 0 || intern(&str_p, "p") < 0 ||
        intern(&str_accumulated, "accumulated") < 0 || intern(&str_version_seen, "version_seen") < 0 ||
        intern(&str_grad_out, "grad_out") < 0 || intern(&str_missed, "_missed") < 0 ||
        intern(&str_store, "_store") < 0 || intern(&str_layout, "layout") < 0 ||
        intern(&str_data_ptr, "data_ptr") < 0 || intern(&str_shape, "shape") < 0 ||
        intern(&str_enter, "__enter__") < 0 || intern(&str_exit, "__exit__") < 0)
        return NULL;
    if (PyType_Ready(&PreHookType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "PreHook", (PyObject *)&PreHookType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
