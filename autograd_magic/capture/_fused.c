/* One pass over a dense float32/float64 block: min, max, sum and sum of squares.
 *
 * A preview's exact statistics are four reductions over each tensor the traced
 * cell makes. numpy runs them as four passes over memory (min, max, sum, dot);
 * here they are one, in SIMD lanes, with the sums kept in float64 (float32
 * inputs are widened lane by lane).
 *
 * Kernels for x86-64 with AVX2+FMA or AVX-512, picked at import by what the CPU
 * runs. Elsewhere (another architecture, an older CPU, a compiler without these
 * intrinsics) `kernels()` is empty and preview.py keeps numpy's four passes: a
 * plain C loop there measured slower than numpy's own vectorized reductions.
 *
 * `stats(buffer)` takes any C-contiguous buffer of format 'f' or 'd' and
 * returns (min, max, sum, sum of squares) as Python floats, or None when the
 * block holds a NaN or an Inf, or squares large enough that the tensor's own
 * dtype would overflow: the caller's exact numpy path handles those, so torch's
 * inf/nan results are reproduced there and only there. It never raises for a
 * C-contiguous buffer; any other (a strided view) raises BufferError, so
 * preview.py passes only contiguous blocks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <math.h>

/* Below these, no finite sum of squares in the dtype can have overflowed (as preview.py's _SAFE_SQUARES). */
#define SAFE_F32 1e37
#define SAFE_F64 1e300

/* The elements past the last full vector, one at a time, then the four results. */
#define TAIL(T)                      \
    for (; i < n; i++) {             \
        T v = x[i];                  \
        if (v < lo) lo = v;          \
        if (v > hi) hi = v;          \
        double d = v;                \
        s += d;                      \
        q += d * d;                  \
    }                                \
    out[0] = lo;                     \
    out[1] = hi;                     \
    out[2] = s;                      \
    out[3] = q

/* x86-64 with AVX2 and FMA, or AVX-512 (checked at import). min/max are NaN-blind (a NaN never
 * wins a comparison), but a NaN still reaches the sum of squares, which is what the caller tests. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(AUTOGRAD_MAGIC_NO_SIMD)
#include <immintrin.h>
#define HAVE_AVX2_KERNELS 1

__attribute__((target("avx2,fma"))) static void stats_f32_avx2(const float *x, Py_ssize_t n, double out[4]) {
    float lo = x[0], hi = x[0];
    double s = 0.0, q = 0.0;
    Py_ssize_t i = 0;
    if (n >= 16) {
        __m256 vlo = _mm256_loadu_ps(x), vhi = vlo;
        __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0;
        for (; i + 16 <= n; i += 16) {
            __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
            vlo = _mm256_min_ps(vlo, _mm256_min_ps(a, b));
            vhi = _mm256_max_ps(vhi, _mm256_max_ps(a, b));
            __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
            __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
            __m256d d2 = _mm256_cvtps_pd(_mm256_castps256_ps128(b));
            __m256d d3 = _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1));
            s0 = _mm256_add_pd(s0, d0);
            s1 = _mm256_add_pd(s1, d1);
            s2 = _mm256_add_pd(s2, d2);
            s3 = _mm256_add_pd(s3, d3);
            q0 = _mm256_fmadd_pd(d0, d0, q0);
            q1 = _mm256_fmadd_pd(d1, d1, q1);
            q2 = _mm256_fmadd_pd(d2, d2, q2);
            q3 = _mm256_fmadd_pd(d3, d3, q3);
        }
        float l[8], h[8];
        double ss[4], qq[4];
        _mm256_storeu_ps(l, vlo);
        _mm256_storeu_ps(h, vhi);
        _mm256_storeu_pd(ss, _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
        _mm256_storeu_pd(qq, _mm256_add_pd(_mm256_add_pd(q0, q1), _mm256_add_pd(q2, q3)));
        lo = l[0];
        hi = h[0];
        for (int k = 0; k < 8; k++) {
            if (l[k] < lo) lo = l[k];
            if (h[k] > hi) hi = h[k];
        }
        s = (ss[0] + ss[1]) + (ss[2] + ss[3]);
        q = (qq[0] + qq[1]) + (qq[2] + qq[3]);
    }
    TAIL(float);
}

__attribute__((target("avx2,fma"))) static void stats_f64_avx2(const double *x, Py_ssize_t n, double out[4]) {
    double lo = x[0], hi = x[0], s = 0.0, q = 0.0;
    Py_ssize_t i = 0;
    if (n >= 8) {
        __m256d vlo = _mm256_loadu_pd(x), vhi = vlo;
        __m256d s0 = _mm256_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
        for (; i + 8 <= n; i += 8) {
            __m256d a = _mm256_loadu_pd(x + i), b = _mm256_loadu_pd(x + i + 4);
            vlo = _mm256_min_pd(vlo, _mm256_min_pd(a, b));
            vhi = _mm256_max_pd(vhi, _mm256_max_pd(a, b));
            s0 = _mm256_add_pd(s0, a);
            s1 = _mm256_add_pd(s1, b);
            q0 = _mm256_fmadd_pd(a, a, q0);
            q1 = _mm256_fmadd_pd(b, b, q1);
        }
        double l[4], h[4], ss[4], qq[4];
        _mm256_storeu_pd(l, vlo);
        _mm256_storeu_pd(h, vhi);
        _mm256_storeu_pd(ss, _mm256_add_pd(s0, s1));
        _mm256_storeu_pd(qq, _mm256_add_pd(q0, q1));
        lo = l[0];
        hi = h[0];
        for (int k = 0; k < 4; k++) {
            if (l[k] < lo) lo = l[k];
            if (h[k] > hi) hi = h[k];
        }
        s = (ss[0] + ss[1]) + (ss[2] + ss[3]);
        q = (qq[0] + qq[1]) + (qq[2] + qq[3]);
    }
    TAIL(double);
}

/* AVX-512 (F and DQ): twice the lanes, so half the instructions per element. */
__attribute__((target("avx512f,avx512dq"))) static void stats_f32_avx512(const float *x, Py_ssize_t n, double out[4]) {
    float lo = x[0], hi = x[0];
    double s = 0.0, q = 0.0;
    Py_ssize_t i = 0;
    if (n >= 32) {
        __m512 vlo = _mm512_loadu_ps(x), vhi = vlo;
        __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0;
        for (; i + 32 <= n; i += 32) {
            __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
            vlo = _mm512_min_ps(vlo, _mm512_min_ps(a, b));
            vhi = _mm512_max_ps(vhi, _mm512_max_ps(a, b));
            __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
            __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
            __m512d d2 = _mm512_cvtps_pd(_mm512_castps512_ps256(b));
            __m512d d3 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
            s0 = _mm512_add_pd(s0, d0);
            s1 = _mm512_add_pd(s1, d1);
            s2 = _mm512_add_pd(s2, d2);
            s3 = _mm512_add_pd(s3, d3);
            q0 = _mm512_fmadd_pd(d0, d0, q0);
            q1 = _mm512_fmadd_pd(d1, d1, q1);
            q2 = _mm512_fmadd_pd(d2, d2, q2);
            q3 = _mm512_fmadd_pd(d3, d3, q3);
        }
        lo = _mm512_reduce_min_ps(vlo);
        hi = _mm512_reduce_max_ps(vhi);
        s = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3)));
        q = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(q0, q1), _mm512_add_pd(q2, q3)));
    }
    TAIL(float);
}

__attribute__((target("avx512f,avx512dq"))) static void stats_f64_avx512(const double *x, Py_ssize_t n, double out[4]) {
    double lo = x[0], hi = x[0], s = 0.0, q = 0.0;
    Py_ssize_t i = 0;
    if (n >= 16) {
        __m512d vlo = _mm512_loadu_pd(x), vhi = vlo;
        __m512d s0 = _mm512_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
        for (; i + 16 <= n; i += 16) {
            __m512d a = _mm512_loadu_pd(x + i), b = _mm512_loadu_pd(x + i + 8);
            vlo = _mm512_min_pd(vlo, _mm512_min_pd(a, b));
            vhi = _mm512_max_pd(vhi, _mm512_max_pd(a, b));
            s0 = _mm512_add_pd(s0, a);
            s1 = _mm512_add_pd(s1, b);
            q0 = _mm512_fmadd_pd(a, a, q0);
            q1 = _mm512_fmadd_pd(b, b, q1);
        }
        lo = _mm512_reduce_min_pd(vlo);
        hi = _mm512_reduce_max_pd(vhi);
        s = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
        q = _mm512_reduce_add_pd(_mm512_add_pd(q0, q1));
    }
    TAIL(double);
}
#endif

typedef void (*f32_kernel)(const float *, Py_ssize_t, double[4]);
typedef void (*f64_kernel)(const double *, Py_ssize_t, double[4]);

/* The kernels, best last: import picks the last one the CPU runs. */
struct kernel {
    const char *name;
    f32_kernel f32;
    f64_kernel f64;
};
#ifdef HAVE_AVX2_KERNELS
static const struct kernel KERNELS[] = {
    {"avx2", stats_f32_avx2, stats_f64_avx2},
    {"avx512", stats_f32_avx512, stats_f64_avx512},
};
#define N_KERNELS ((int)(sizeof KERNELS / sizeof KERNELS[0]))
#else
static const struct kernel KERNELS[1] = {{"none", NULL, NULL}};
#define N_KERNELS 0
#endif
static int current = -1; /* none runs here: stats() always answers None */

static int runs_here(int k) {
#ifdef HAVE_AVX2_KERNELS
    if (strcmp(KERNELS[k].name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(KERNELS[k].name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#endif
    (void)k;
    return 0;
}

static PyObject *fused_stats(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    const char *fmt = view.format ? view.format : "B";
    if (*fmt == '=' || *fmt == '@' || (*fmt == '<' && PY_LITTLE_ENDIAN)) fmt++;
    double out[4];
    double safe;
    Py_ssize_t n;
    if (current < 0) goto none;
    if (fmt[0] == 'f' && fmt[1] == 0 && view.itemsize == 4) {
        n = view.len / 4;
        if (n == 0) goto none;
        Py_BEGIN_ALLOW_THREADS
        KERNELS[current].f32((const float *)view.buf, n, out);
        Py_END_ALLOW_THREADS
        safe = SAFE_F32;
    } else if (fmt[0] == 'd' && fmt[1] == 0 && view.itemsize == 8) {
        n = view.len / 8;
        if (n == 0) goto none;
        Py_BEGIN_ALLOW_THREADS
        KERNELS[current].f64((const double *)view.buf, n, out);
        Py_END_ALLOW_THREADS
        safe = SAFE_F64;
    } else {
        goto none;
    }
    PyBuffer_Release(&view);
    {
        double big = out[0] < 0 ? -out[0] : out[0];
        double top = out[1] < 0 ? -out[1] : out[1];
        if (top > big) big = top;
        /* a NaN or an Inf makes the sum of squares NaN or Inf: not below `safe` */
        if (!(out[3] < safe) || !(big * big * (double)n < safe))
            Py_RETURN_NONE;
    }
    return Py_BuildValue("(dddd)", out[0], out[1], out[2], out[3]);
none:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* use(name): switch to another kernel this CPU runs; returns the name of the one it replaced. For tests. */
static PyObject *fused_use(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    for (int k = 0; k < N_KERNELS; k++) {
        if (strcmp(name, KERNELS[k].name) == 0 && runs_here(k)) {
            const char *was = current < 0 ? "none" : KERNELS[current].name;
            current = k;
            return PyUnicode_FromString(was);
        }
    }
    PyErr_Format(PyExc_ValueError, "no kernel %R on this machine", arg);
    return NULL;
}

/* kernels() -> the names of the kernels this CPU runs, best last (import picks that one). */
static PyObject *fused_kernels(PyObject *self, PyObject *unused) {
    PyObject *names = PyList_New(0);
    if (names == NULL) return NULL;
    for (int k = 0; k < N_KERNELS; k++) {
        if (!runs_here(k)) continue;
        PyObject *one = PyUnicode_FromString(KERNELS[k].name);
        if (one == NULL || PyList_Append(names, one) < 0) {
            Py_XDECREF(one);
            Py_DECREF(names);
            return NULL;
        }
        Py_DECREF(one);
    }
    return names;
}

/* ---- a whole preview of a dense CPU float tensor (preview.py's common case) ----
 *
 * `preview_quiet` spends ~5 us per tensor around the one pass the statistics need (detach,
 * numpy, the edge block's indices, the Preview object). For an exact torch.Tensor or Parameter,
 * float32/float64, on the CPU, strided, one dense block of memory in any axis order (C-contiguous,
 * or transposed or permuted) and not a negative view, `preview(t, with_stats)` reads its memory in place through `data_ptr()` and makes the same Preview the
 * numpy path makes: every element up to PREVIEW_FULL, else the edge block torch prints (first
 * and last PREVIEW_EDGE items along each longer dimension), with min/max/mean/norm. It answers
 * None for anything else, and for what the numpy path alone handles (a NaN or an Inf, squares
 * near the dtype's overflow, more elements than STATS_ELEMENTS, an edge block past
 * PREVIEW_EDGE_BLOCK, a tensor with no memory: a ZeroTensor's data_ptr() is 0): preview.py then
 * runs that path. `configure_preview` hands it the objects it compares with and makes, once at
 * import. */

static PyObject *pv_cls, *pv_empty, *pv_f32, *pv_f64, *pv_np32, *pv_np64, *pv_name32, *pv_name64, *pv_strided,
    *pv_tensor, *pv_param, *pv_kwnames;
static Py_ssize_t pv_full = 64, pv_edge = 3, pv_block = 512, pv_stats_limit = 50000000;
#define PV_MAX_DIMS 16

/* The attribute and method names `preview` reads, interned once (a name made per call, and a
 * bound method per call, cost more than the read). */
enum { N_DTYPE, N_IS_CPU, N_LAYOUT, N_IS_NEG, N_IS_CONTIGUOUS, N_SHAPE, N_STRIDE, N_DATA_PTR, N_NAMES };
static PyObject *pv_names[N_NAMES];

static int names_ready(void) {
    static const char *text[N_NAMES] = {"dtype", "is_cpu", "layout", "is_neg", "is_contiguous", "shape", "stride", "data_ptr"};
    for (int i = 0; i < N_NAMES; i++)
        if (pv_names[i] == NULL && (pv_names[i] = PyUnicode_InternFromString(text[i])) == NULL) return -1;
    return 0;
}

static PyObject *fused_configure_preview(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    if (n != 15) {
        PyErr_SetString(PyExc_TypeError, "configure_preview(Preview, np.empty, torch.float32, torch.float64, "
                                         "np.float32, np.float64, name32, name64, torch.strided, torch.Tensor, "
                                         "torch.nn.Parameter, full, edge, edge_block, stats_limit)");
        return NULL;
    }
    Py_ssize_t ints[4];
    for (int i = 0; i < 4; i++) {
        ints[i] = PyLong_AsSsize_t(a[11 + i]);
        if (ints[i] == -1 && PyErr_Occurred()) return NULL;
    }
    if (names_ready() < 0) return NULL;  /* first: once pv_cls is set, `preview` reads them */
    PyObject **slots[] = {&pv_cls, &pv_empty, &pv_f32, &pv_f64, &pv_np32, &pv_np64, &pv_name32, &pv_name64,
                          &pv_strided, &pv_tensor, &pv_param};
    for (int i = 0; i < 11; i++) Py_XSETREF(*slots[i], Py_NewRef(a[i]));
    if (pv_kwnames == NULL) {
        pv_kwnames = Py_BuildValue("(ssssss)", "values", "summarized", "min", "max", "mean", "norm");
        if (pv_kwnames == NULL) return NULL;
    }
    pv_full = ints[0], pv_edge = ints[1], pv_block = ints[2], pv_stats_limit = ints[3];
    Py_RETURN_NONE;
}

/* t.<name>() (no arguments): a new reference, or NULL (an error) */
static PyObject *call0(PyObject *t, int name) {
    PyObject *self_arg = t;
    return PyObject_VectorcallMethod(pv_names[name], &self_arg, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* getattr(t, name) is `expected` (1), is not (0), or an error (-1) */
static int attr_is(PyObject *t, int name, PyObject *expected) {
    PyObject *v = PyObject_GetAttr(t, pv_names[name]);
    if (v == NULL) return -1;
    int r = v == expected;
    Py_DECREF(v);
    return r;
}

/* t.name() is True (1), False (0), or an error (-1) */
static int method_true(PyObject *t, int name) {
    PyObject *v = call0(t, name);
    if (v == NULL) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* The values a preview shows, in C order, into `dst`: with `summarize`, the edge block (first/last
 * `edge` items along each dimension longer than 2*edge, every item along the others), else every
 * item. `bstride`: each dimension's stride in bytes (a transpose's as much as a contiguous one's). */
static void gather(const char *src, char *dst, Py_ssize_t itemsize, int nd, const Py_ssize_t *shape,
                   const Py_ssize_t *bstride, int summarize) {
    Py_ssize_t bshape[PV_MAX_DIMS], idx[PV_MAX_DIMS];
    for (int d = 0; d < nd; d++) {
        bshape[d] = summarize && shape[d] > 2 * pv_edge ? 2 * pv_edge : shape[d];
        idx[d] = 0;
    }
    for (;;) {
        Py_ssize_t off = 0;
        for (int d = 0; d < nd; d++) {
            Py_ssize_t i = idx[d];
            if (summarize && shape[d] > 2 * pv_edge && i >= pv_edge) i = shape[d] - 2 * pv_edge + i;  /* the last `edge` items */
            off += i * bstride[d];
        }
        memcpy(dst, src + off, itemsize);
        dst += itemsize;
        int d = nd - 1;
        while (d >= 0 && ++idx[d] == bshape[d]) idx[d--] = 0;
        if (d < 0) break;
    }
}

/* Whether the strides (in elements), sorted, are a contiguous tensor's: its elements fill one block
 * of memory with no gap and no overlap, in some axis order (a transpose, a permute); preview.py's
 * `_dense_permutation`. Size-1 dimensions are left out, as there. */
static int dense_permutation(int nd, const Py_ssize_t *shape, const Py_ssize_t *stride) {
    Py_ssize_t st[PV_MAX_DIMS], sz[PV_MAX_DIMS];
    int m = 0;
    for (int d = 0; d < nd; d++) {
        if (shape[d] == 1) continue;
        /* insertion sort by (stride, size), as Python's sorted() of the pairs */
        int j = m++;
        while (j > 0 && (st[j - 1] > stride[d] || (st[j - 1] == stride[d] && sz[j - 1] > shape[d]))) {
            st[j] = st[j - 1], sz[j] = sz[j - 1];
            j--;
        }
        st[j] = stride[d], sz[j] = shape[d];
    }
    Py_ssize_t expected = 1;
    for (int k = 0; k < m; k++) {
        if (st[k] != expected) return 0;
        expected *= sz[k];
    }
    return 1;
}

/* min, max, sum and sum of squares of `n` elements from `ptr` into `out`: 1, or 0 when the block
 * holds a NaN or an Inf or squares near the dtype's overflow (numpy's path reproduces torch there) */
static int block_stats(const char *ptr, Py_ssize_t n, int is64, double out[4]) {
    double safe = is64 ? SAFE_F64 : SAFE_F32;
    if (n >= (1 << 20)) {
        Py_BEGIN_ALLOW_THREADS
        if (is64) KERNELS[current].f64((const double *)ptr, n, out);
        else KERNELS[current].f32((const float *)ptr, n, out);
        Py_END_ALLOW_THREADS
    } else if (is64) {
        KERNELS[current].f64((const double *)ptr, n, out);
    } else {
        KERNELS[current].f32((const float *)ptr, n, out);
    }
    double big = out[0] < 0 ? -out[0] : out[0];
    double top = out[1] < 0 ? -out[1] : out[1];
    if (top > big) big = top;
    return out[3] < safe && big * big * (double)n < safe;
}

/* A tensor `read_block` could read in place: its memory, size, dtype and layout. */
struct block {
    const char *ptr;
    Py_ssize_t n, itemsize;
    int is64, nd, contiguous;
    Py_ssize_t dims[PV_MAX_DIMS], bstride[PV_MAX_DIMS]; /* each dimension's size, and stride in bytes */
    PyObject *shape;                                     /* t.shape as a plain tuple (a new reference) */
};

/* Whether `t` is one dense block of float32/float64 CPU memory (see `preview`): 1 with `b` filled
 * (b->shape is then the caller's to release), 0 for anything else (no error set), -1 on an error. */
static int read_block(PyObject *t, struct block *b) {
    b->shape = NULL;
    if (pv_cls == NULL || current < 0) return 0;
    if (Py_TYPE(t) != (PyTypeObject *)pv_tensor && Py_TYPE(t) != (PyTypeObject *)pv_param) return 0;
    PyObject *dtype = PyObject_GetAttr(t, pv_names[N_DTYPE]);
    if (dtype == NULL) return -1;
    b->is64 = dtype == pv_f64;
    int known = b->is64 || dtype == pv_f32;
    Py_DECREF(dtype);
    if (!known) return 0;
    int r;
    if ((r = attr_is(t, N_IS_CPU, Py_True)) <= 0) return r;
    if ((r = attr_is(t, N_LAYOUT, pv_strided)) <= 0) return r;
    if ((r = method_true(t, N_IS_NEG)) != 0) return r < 0 ? -1 : 0;
    b->contiguous = method_true(t, N_IS_CONTIGUOUS);
    if (b->contiguous < 0) return -1;
    PyObject *size = PyObject_GetAttr(t, pv_names[N_SHAPE]);
    if (size == NULL) return -1;
    b->shape = PySequence_Tuple(size); /* a plain tuple, as numpy's `a.shape` */
    Py_DECREF(size);
    if (b->shape == NULL) return -1;
    int nd = b->nd = (int)PyTuple_GET_SIZE(b->shape);
    if (nd > PV_MAX_DIMS) goto refuse;
    Py_ssize_t n = 1;
    for (int d = 0; d < nd; d++) {
        b->dims[d] = PyLong_AsSsize_t(PyTuple_GET_ITEM(b->shape, d));
        if (b->dims[d] == -1 && PyErr_Occurred()) goto error;
        n *= b->dims[d];
    }
    b->n = n;
    if (n == 0) goto refuse;
    Py_ssize_t itemsize = b->itemsize = b->is64 ? 8 : 4;
    if (b->contiguous) {
        Py_ssize_t st = itemsize;
        for (int d = nd - 1; d >= 0; d--) {
            b->bstride[d] = st;
            st *= b->dims[d];
        }
    } else {
        /* a dense permutation (a weight's gradient as TBackward sends it) is one block too: the
         * statistics over memory order, the values by its strides */
        PyObject *strides = call0(t, N_STRIDE);
        if (strides == NULL) goto error;
        if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != nd) {
            Py_DECREF(strides);
            goto refuse;
        }
        Py_ssize_t es[PV_MAX_DIMS];
        for (int d = 0; d < nd; d++) {
            es[d] = PyLong_AsSsize_t(PyTuple_GET_ITEM(strides, d));
            if (es[d] == -1 && PyErr_Occurred()) {
                Py_DECREF(strides);
                goto error;
            }
            if (es[d] < 0) {
                Py_DECREF(strides);
                goto refuse;
            }
            b->bstride[d] = es[d] * itemsize;
        }
        Py_DECREF(strides);
        if (!dense_permutation(nd, b->dims, es)) goto refuse;
    }
    PyObject *ptr_obj = call0(t, N_DATA_PTR);
    if (ptr_obj == NULL) { /* no storage to point at (functorch's wrapped tensors): numpy's path says why */
        if (!PyErr_ExceptionMatches(PyExc_Exception)) goto error; /* a Ctrl-C goes on */
        PyErr_Clear();
        goto refuse;
    }
    b->ptr = (const char *)PyLong_AsVoidPtr(ptr_obj);
    Py_DECREF(ptr_obj);
    if (b->ptr == NULL) {
        if (PyErr_Occurred()) goto error;
        goto refuse;
    }
    return 1;
refuse:
    Py_CLEAR(b->shape);
    return 0;
error:
    Py_CLEAR(b->shape);
    return -1;
}

/* The Preview of the block `b` read (b->shape is released here): with `with_stats`, its statistics
 * taken now, or, where `given` is not NULL, those four (min, max, mean, norm) already known. A new
 * reference; None for what preview.py's numpy path alone handles; NULL on an error. */
static PyObject *preview_block(struct block *b, int with_stats, PyObject *const *given) {
    PyObject *shape = b->shape, *values = NULL, *result = NULL;
    int nd = b->nd, is64 = b->is64;
    Py_ssize_t n = b->n, block = 1;
    for (int d = 0; d < nd; d++) block *= b->dims[d] > 2 * pv_edge ? 2 * pv_edge : b->dims[d];
    int summarized = n > pv_full;
    if ((with_stats && n > pv_stats_limit) || (summarized && block > pv_block)) goto none;
    double out[4] = {0, 0, 0, 0};
    if (with_stats && !block_stats(b->ptr, n, is64, out)) goto none; /* NaN, Inf, overflow: numpy's */
    PyObject *vshape;
    if (summarized) {
        vshape = PyTuple_New(nd);
        if (vshape == NULL) goto error;
        for (int d = 0; d < nd; d++) {
            PyObject *v = PyLong_FromSsize_t(b->dims[d] > 2 * pv_edge ? 2 * pv_edge : b->dims[d]);
            if (v == NULL) {
                Py_DECREF(vshape);
                goto error;
            }
            PyTuple_SET_ITEM(vshape, d, v);
        }
    } else {
        vshape = Py_NewRef(shape);
    }
    values = PyObject_CallFunctionObjArgs(pv_empty, vshape, is64 ? pv_np64 : pv_np32, NULL);
    Py_DECREF(vshape);
    if (values == NULL) goto error;
    Py_buffer view;
    if (PyObject_GetBuffer(values, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto error;
    if (b->contiguous && !summarized) memcpy(view.buf, b->ptr, (size_t)(n * b->itemsize));
    else gather(b->ptr, (char *)view.buf, b->itemsize, nd, b->dims, b->bstride, summarized);
    PyBuffer_Release(&view);
    /* Preview(shape, dtype, values=, summarized=, min=, max=, mean=, norm=) */
    PyObject *floats[4] = {NULL, NULL, NULL, NULL};
    if (with_stats) {
        floats[0] = PyFloat_FromDouble(out[0]);
        floats[1] = PyFloat_FromDouble(out[1]);
        floats[2] = PyFloat_FromDouble(out[2] / (double)n);
        floats[3] = PyFloat_FromDouble(sqrt(out[3]));
        if (!floats[0] || !floats[1] || !floats[2] || !floats[3]) {
            for (int i = 0; i < 4; i++) Py_XDECREF(floats[i]);
            goto error;
        }
    }
    PyObject *stack[8] = {shape, is64 ? pv_name64 : pv_name32, values, summarized ? Py_True : Py_False};
    for (int i = 0; i < 4; i++) stack[4 + i] = floats[i] != NULL ? floats[i] : given != NULL ? given[i] : Py_None;
    result = PyObject_Vectorcall(pv_cls, stack, 2, pv_kwnames);
    for (int i = 0; i < 4; i++) Py_XDECREF(floats[i]);
    goto done;
none:
    result = Py_NewRef(Py_None);
    goto done;
error:
    result = NULL;
done:
    Py_XDECREF(shape);
    Py_XDECREF(values);
    return result;
}

static PyObject *fused_preview(PyObject *self, PyObject *const *a, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "preview(t, with_stats)");
        return NULL;
    }
    int with_stats = PyObject_IsTrue(a[1]);
    if (with_stats < 0) return NULL;
    struct block b;
    int r = read_block(a[0], &b);
    if (r <= 0) {
        if (r < 0) return NULL;
        Py_RETURN_NONE;
    }
    return preview_block(&b, with_stats, NULL);
}

/* ---- a backward pass's preview cache (preview.py's PreviewCache.get) ----
 *
 * Every gradient a pass's hooks see is looked up here: about twenty a pass on the MLP benchmark,
 * each a handful of Python reads and calls around the kernel when done in Python. The common case
 * (an exact torch.Tensor of CPU float32/float64 memory, one dense block, no CPU preview queue) is
 * answered here with the same entries in the same two dicts; anything else, and any error, goes to
 * preview.py's `_cached_preview(seen, dense, t)`, which answers every case. */
static PyObject *pc_globals, *pc_fallback, *str_active_queue, *str_include_cpu, *str_version_attr, *str_fused_preview_name;

static PyObject *fused_configure_cache(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    if (n != 2 || !PyDict_Check(a[0])) {
        PyErr_SetString(PyExc_TypeError, "configure_cache(preview module's globals, _cached_preview)");
        return NULL;
    }
    if ((str_active_queue == NULL && (str_active_queue = PyUnicode_InternFromString("_active_queue")) == NULL) ||
        (str_include_cpu == NULL && (str_include_cpu = PyUnicode_InternFromString("include_cpu")) == NULL) ||
        (str_version_attr == NULL && (str_version_attr = PyUnicode_InternFromString("_version")) == NULL) ||
        (str_fused_preview_name == NULL && (str_fused_preview_name = PyUnicode_InternFromString("_fused_preview")) == NULL))
        return NULL;
    Py_XSETREF(pc_globals, Py_NewRef(a[0]));
    Py_XSETREF(pc_fallback, Py_NewRef(a[1]));
    Py_RETURN_NONE;
}

/* `a` and `b` are equal ints (1), not (0), or an error (-1) */
static int same_int(PyObject *a, PyObject *b) { return a == b ? 1 : PyObject_RichCompareBool(a, b, Py_EQ); }

/* The compiled case of cache_get: 1 with *result set (a new reference), 0 where preview.py answers
 * (nothing was stored), -1 on an error. */
static int cache_fast(PyObject *seen, PyObject *dense, PyObject *t, PyObject **result) {
    *result = NULL;
    if (pv_cls == NULL || current < 0 || Py_TYPE(t) != (PyTypeObject *)pv_tensor) return 0;
    /* preview.py's switch (None: numpy's path, as where this is not built; tests flip it) */
    PyObject *on = PyDict_GetItemWithError(pc_globals, str_fused_preview_name); /* borrowed */
    if (on == NULL || on == Py_None) return PyErr_Occurred() ? -1 : 0;
    PyObject *queue = PyDict_GetItemWithError(pc_globals, str_active_queue); /* borrowed */
    if (queue == NULL) return PyErr_Occurred() ? -1 : 0;
    if (queue != Py_None) {
        PyObject *inc = PyObject_GetAttr(queue, str_include_cpu);
        if (inc == NULL) return -1;
        int on = PyObject_IsTrue(inc);
        Py_DECREF(inc);
        if (on != 0) return on < 0 ? -1 : 0; /* CPU tensors are queued: preview.py's */
    }
    PyObject *version = PyObject_GetAttr(t, str_version_attr);
    if (version == NULL) return -1; /* an inference tensor raises: preview.py's */
    int r = -1;
    PyObject *ident = PyLong_FromVoidPtr(t), *shown = NULL, *ref = NULL, *entry = NULL, *key = NULL;
    if (ident == NULL) goto done;
    PyObject *hit = PyDict_GetItemWithError(seen, ident); /* borrowed */
    if (hit == NULL && PyErr_Occurred()) goto done;
    if (hit != NULL && PyTuple_Check(hit) && PyTuple_GET_SIZE(hit) == 3 && PyWeakref_Check(PyTuple_GET_ITEM(hit, 0)) &&
        PyWeakref_GET_OBJECT(PyTuple_GET_ITEM(hit, 0)) == t) {
        int same = same_int(PyTuple_GET_ITEM(hit, 2), version);
        if (same < 0) goto done;
        if (same) { /* the engine sums a node's incoming grads in place into the first: a new version */
            *result = Py_NewRef(PyTuple_GET_ITEM(hit, 1));
            r = 1;
            goto done;
        }
    }
    struct block b;
    int got = read_block(t, &b);
    if (got <= 0) {
        r = got; /* 0: not one dense float block of CPU memory: preview.py's */
        goto done;
    }
    if (b.n <= pv_full) {
        shown = preview_block(&b, 1, NULL);
    } else { /* a tensor and its transpose hold the same elements: the same statistics */
        PyObject *dtype = PyObject_GetAttr(t, pv_names[N_DTYPE]);
        PyObject *ptr = dtype != NULL ? PyLong_FromVoidPtr((void *)b.ptr) : NULL;
        PyObject *numel = ptr != NULL ? PyLong_FromSsize_t(b.n) : NULL;
        key = numel != NULL ? PyTuple_Pack(3, ptr, numel, dtype) : NULL;
        Py_XDECREF(dtype);
        Py_XDECREF(ptr);
        Py_XDECREF(numel);
        if (key == NULL) {
            Py_DECREF(b.shape);
            goto done;
        }
        PyObject *dh = PyDict_GetItemWithError(dense, key); /* borrowed: (ref, (min, max, mean, norm), version) */
        if (dh == NULL && PyErr_Occurred()) {
            Py_DECREF(b.shape);
            goto done;
        }
        PyObject *const *given = NULL;
        if (dh != NULL && PyTuple_Check(dh) && PyTuple_GET_SIZE(dh) == 3 && PyWeakref_Check(PyTuple_GET_ITEM(dh, 0)) &&
            PyTuple_Check(PyTuple_GET_ITEM(dh, 1)) && PyTuple_GET_SIZE(PyTuple_GET_ITEM(dh, 1)) == 4) {
            int same = same_int(PyTuple_GET_ITEM(dh, 2), version);
            PyObject *src = same == 1 ? PyWeakref_GET_OBJECT(PyTuple_GET_ITEM(dh, 0)) : Py_None;
            if (same < 0) {
                Py_DECREF(b.shape);
                goto done;
            }
            if (src != Py_None) { /* alive (its block was not handed on), at that version, still there */
                Py_INCREF(src);
                PyObject *sv = PyObject_GetAttr(src, str_version_attr);
                int ok = sv != NULL ? same_int(sv, version) : -1;
                Py_XDECREF(sv);
                PyObject *sp = ok == 1 ? call0(src, N_DATA_PTR) : NULL;
                if (ok == 1) ok = sp != NULL ? (PyLong_AsVoidPtr(sp) == (void *)b.ptr) : -1;
                Py_XDECREF(sp);
                Py_DECREF(src);
                if (ok < 0) {
                    Py_DECREF(b.shape);
                    goto done;
                }
                if (ok) given = &PyTuple_GET_ITEM(PyTuple_GET_ITEM(dh, 1), 0);
            }
        }
        shown = given != NULL ? preview_block(&b, 0, given) : preview_block(&b, 1, NULL);
        if (shown != NULL && shown != Py_None && given == NULL) {
            PyObject *four = PyTuple_New(4);
            static const char *fields[4] = {"min", "max", "mean", "norm"};
            int ok = four != NULL;
            for (int i = 0; ok && i < 4; i++) {
                PyObject *v = PyObject_GetAttrString(shown, fields[i]);
                if (v == NULL) ok = 0;
                else PyTuple_SET_ITEM(four, i, v);
            }
            PyObject *sref = ok ? PyWeakref_NewRef(t, NULL) : NULL;
            PyObject *item = sref != NULL ? PyTuple_Pack(3, sref, four, version) : NULL;
            ok = item != NULL && PyDict_SetItem(dense, key, item) == 0;
            Py_XDECREF(four);
            Py_XDECREF(sref);
            Py_XDECREF(item);
            if (!ok) goto done;
        }
    }
    if (shown == NULL) goto done;
    if (shown == Py_None) { /* what the numpy path alone handles (a NaN, an Inf): preview.py's, nothing stored */
        Py_CLEAR(shown);
        r = 0;
        goto done;
    }
    ref = PyWeakref_NewRef(t, NULL);
    entry = ref != NULL ? PyTuple_Pack(3, ref, shown, version) : NULL;
    if (entry == NULL || PyDict_SetItem(seen, ident, entry) < 0) goto done;
    *result = shown;
    shown = NULL;
    r = 1;
done:
    Py_XDECREF(shown);
    Py_XDECREF(ref);
    Py_XDECREF(entry);
    Py_XDECREF(key);
    Py_XDECREF(ident);
    Py_DECREF(version);
    return r;
}

/* cache_get(seen, dense, t): PreviewCache.get. Never raises but for a KeyboardInterrupt and the like. */
static PyObject *fused_cache_get(PyObject *self, PyObject *const *a, Py_ssize_t n) {
    if (n != 3 || !PyDict_Check(a[0]) || !PyDict_Check(a[1])) {
        PyErr_SetString(PyExc_TypeError, "cache_get(seen, dense, t)");
        return NULL;
    }
    if (pc_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cache_get before configure_cache");
        return NULL;
    }
    PyObject *result;
    int r = cache_fast(a[0], a[1], a[2], &result);
    if (r == 1) return result;
    if (r < 0) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL; /* a Ctrl-C goes on */
        PyErr_Clear(); /* preview.py's path answers, as it would have */
    }
    return PyObject_Vectorcall(pc_fallback, a, 3, NULL);
}

/* ---- a pass's gradient norm past --limit (finite.py's LeafNorms.add_all) ----
 *
 * `squares(grads)` sums the squares of every gradient `read_block` reads in place, in float64 in
 * one pass each, in order: a training loop's leaves, four or more per iteration, at a call each
 * instead of four reads through numpy. Returns (sum, how many, the rest): the rest are those it
 * leaves to finite.py's exact paths (not a tensor is skipped there too; a NaN, an Inf, squares
 * near overflow, another dtype or layout, a device, no elements). */
static PyObject *fused_squares(PyObject *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "squares(grads): a list of tensors");
    if (seq == NULL) return NULL;
    PyObject *rest = PyList_New(0), *result = NULL;
    if (rest == NULL) goto done;
    double total = 0;
    Py_ssize_t count = 0, len = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < len; i++) {
        struct block b;
        int r = read_block(items[i], &b);
        if (r < 0) goto done;
        double out[4];
        if (r == 1) {
            Py_DECREF(b.shape);
            if (block_stats(b.ptr, b.n, b.is64, out)) {
                total += out[3];
                count++;
                continue;
            }
        }
        if (PyList_Append(rest, items[i]) < 0) goto done;
    }
    result = Py_BuildValue("(dnO)", total, count, rest);
done:
    Py_XDECREF(rest);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"use", fused_use, METH_O, "use(name) -> the name of the kernel it replaces (tests)."},
    {"kernels", fused_kernels, METH_NOARGS, "kernels() -> the names of the kernels this CPU runs, best last."},
    {"configure_preview", (PyCFunction)(void (*)(void))fused_configure_preview, METH_FASTCALL,
     "configure_preview(...): the objects `preview` compares with and makes (preview.py, at import)."},
    {"preview", (PyCFunction)(void (*)(void))fused_preview, METH_FASTCALL,
     "preview(t, with_stats) -> the Preview of a dense CPU float tensor, or None: preview.py's path then."},
    {"configure_cache", (PyCFunction)(void (*)(void))fused_configure_cache, METH_FASTCALL,
     "configure_cache(preview module's globals, _cached_preview): what cache_get reads and falls back on."},
    {"cache_get", (PyCFunction)(void (*)(void))fused_cache_get, METH_FASTCALL,
     "cache_get(seen, dense, t) -> PreviewCache.get's answer: the common case here, the rest by _cached_preview."},
    {"stats", fused_stats, METH_O,
     "stats(buffer) -> (min, max, sum, sum of squares) of a C-contiguous float32/float64 block in one pass, "
     "or None (a NaN/Inf, squares that would overflow the dtype, another format, no elements)."},
    {"squares", fused_squares, METH_O,
     "squares(grads) -> (sum of their squares, how many, [the rest]): those `preview` reads in place, "
     "summed in float64; the rest (any other, or a NaN/Inf/overflow) for finite.py's exact paths."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) {
#ifdef HAVE_AVX2_KERNELS
    __builtin_cpu_init();
#endif
    for (int k = N_KERNELS - 1; k >= 0; k--) {
        if (runs_here(k)) {
            current = k;
            break;
        }
    }
    return PyModule_Create(&module);
}
