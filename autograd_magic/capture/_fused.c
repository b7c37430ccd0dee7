/* One pass over a dense float32/float64 block: min, max, sum and sum of squares.
 *
 * A preview's exact statistics are four reductions over each tensor the traced
 * cell makes. numpy runs them as four passes over memory (min, max, sum, dot);
 * here they are one, in SIMD lanes, with the sums kept in float64 (float32
 * inputs are widened lane by lane). Pure C with GCC/Clang vector extensions:
 * no intrinsics, so any architecture the compiler targets gets the same code.
 *
 * `stats(buffer)` takes any C-contiguous buffer of format 'f' or 'd' and
 * returns (min, max, sum, sum of squares) as Python floats, or None when the
 * block holds a NaN or an Inf, or squares large enough that the tensor's own
 * dtype would overflow: the caller's exact numpy path handles those, so torch's
 * inf/nan results are reproduced there and only there. It never raises for a
 * well-formed buffer; a buffer it cannot read is a TypeError/BufferError, which
 * the caller treats as "use numpy".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int i32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef long long i64x4 __attribute__((vector_size(32)));

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

/* NaN-blind min/max (a NaN never wins a comparison): a NaN still reaches the
 * sum of squares, which is what the caller tests. */
static inline f32x8 min_f32(f32x8 a, f32x8 b) {
    i32x8 m = a < b;
    return (f32x8)(((i32x8)a & m) | ((i32x8)b & ~m));
}

static inline f32x8 max_f32(f32x8 a, f32x8 b) {
    i32x8 m = a > b;
    return (f32x8)(((i32x8)a & m) | ((i32x8)b & ~m));
}

static inline f64x4 min_f64(f64x4 a, f64x4 b) {
    i64x4 m = a < b;
    return (f64x4)(((i64x4)a & m) | ((i64x4)b & ~m));
}

static inline f64x4 max_f64(f64x4 a, f64x4 b) {
    i64x4 m = a > b;
    return (f64x4)(((i64x4)a & m) | ((i64x4)b & ~m));
}

static inline f64x4 widen(const float *p) {
    f32x4 v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, f64x4);
}

static void stats_f32_portable(const float *x, Py_ssize_t n, double out[4]) {
    float lo = x[0], hi = x[0];
    double s = 0.0, q = 0.0;
    Py_ssize_t i = 0;
    if (n >= 16) {
        f32x8 vlo, vhi;
        memcpy(&vlo, x, sizeof vlo);
        vhi = vlo;
        f64x4 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
        for (; i + 16 <= n; i += 16) {
            f32x8 a, b;
            memcpy(&a, x + i, sizeof a);
            memcpy(&b, x + i + 8, sizeof b);
            vlo = min_f32(vlo, min_f32(a, b));
            vhi = max_f32(vhi, max_f32(a, b));
            f64x4 d0 = widen(x + i), d1 = widen(x + i + 4), d2 = widen(x + i + 8), d3 = widen(x + i + 12);
            s0 += d0;
            q0 += d0 * d0;
            s1 += d1;
            q1 += d1 * d1;
            s2 += d2;
            q2 += d2 * d2;
            s3 += d3;
            q3 += d3 * d3;
        }
        s0 = (s0 + s1) + (s2 + s3);
        q0 = (q0 + q1) + (q2 + q3);
        lo = vlo[0];
        hi = vhi[0];
        for (int k = 0; k < 8; k++) {
            if (vlo[k] < lo) lo = vlo[k];
            if (vhi[k] > hi) hi = vhi[k];
        }
        for (int k = 0; k < 4; k++) {
            s += s0[k];
            q += q0[k];
        }
    }
    TAIL(float);
}

static void stats_f64_portable(const double *x, Py_ssize_t n, double out[4]) {
    double lo = x[0], hi = x[0], s = 0.0, q = 0.0;
    Py_ssize_t i = 0;
    if (n >= 8) {
        f64x4 vlo, vhi, s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
        memcpy(&vlo, x, sizeof vlo);
        vhi = vlo;
        for (; i + 8 <= n; i += 8) {
            f64x4 a, b;
            memcpy(&a, x + i, sizeof a);
            memcpy(&b, x + i + 4, sizeof b);
            vlo = min_f64(vlo, min_f64(a, b));
            vhi = max_f64(vhi, max_f64(a, b));
            s0 += a;
            q0 += a * a;
            s1 += b;
            q1 += b * b;
        }
        s0 += s1;
        q0 += q1;
        lo = vlo[0];
        hi = vhi[0];
        for (int k = 0; k < 4; k++) {
            if (vlo[k] < lo) lo = vlo[k];
            if (vhi[k] > hi) hi = vhi[k];
            s += s0[k];
            q += q0[k];
        }
    }
    TAIL(double);
}

/* x86-64 with AVX2 and FMA (checked at import): the same loops in intrinsics, whose min/max
 * are single instructions where the portable code needs a compare and a blend. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
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
#endif

typedef void (*f32_kernel)(const float *, Py_ssize_t, double[4]);
typedef void (*f64_kernel)(const double *, Py_ssize_t, double[4]);
static f32_kernel stats_f32 = stats_f32_portable;
static f64_kernel stats_f64 = stats_f64_portable;


static PyObject *fused_stats(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    const char *fmt = view.format ? view.format : "B";
    if (*fmt == '=' || *fmt == '@' || (*fmt == '<' && PY_LITTLE_ENDIAN)) fmt++;
    double out[4];
    double safe;
    Py_ssize_t n;
    if (fmt[0] == 'f' && fmt[1] == 0 && view.itemsize == 4) {
        n = view.len / 4;
        if (n == 0) goto none;
        Py_BEGIN_ALLOW_THREADS
        stats_f32((const float *)view.buf, n, out);
        Py_END_ALLOW_THREADS
        safe = SAFE_F32;
    } else if (fmt[0] == 'd' && fmt[1] == 0 && view.itemsize == 8) {
        n = view.len / 8;
        if (n == 0) goto none;
        Py_BEGIN_ALLOW_THREADS
        stats_f64((const double *)view.buf, n, out);
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

/* use(name): switch kernels ("portable" or "avx2", where the CPU has it); returns the one it replaced. For tests. */
static PyObject *fused_use(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL) return NULL;
    const char *was = stats_f32 == stats_f32_portable ? "portable" : "avx2";
    if (strcmp(name, "portable") == 0) {
        stats_f32 = stats_f32_portable;
        stats_f64 = stats_f64_portable;
#ifdef HAVE_AVX2_KERNELS
    } else if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        stats_f32 = stats_f32_avx2;
        stats_f64 = stats_f64_avx2;
#endif
    } else {
        PyErr_Format(PyExc_ValueError, "no kernel %R on this machine (portable%s)", arg,
#ifdef HAVE_AVX2_KERNELS
                     __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? ", avx2" : ""
#else
                     ""
#endif
        );
        return NULL;
    }
    return PyUnicode_FromString(was);
}

static PyMethodDef methods[] = {
    {"use", fused_use, METH_O, "use(name) -> the kernel it replaces: 'portable', or 'avx2' where the CPU has it (tests)."},
    {"stats", fused_stats, METH_O,
     "stats(buffer) -> (min, max, sum, sum of squares) of a C-contiguous float32/float64 block in one pass, "
     "or None (a NaN/Inf, squares that would overflow the dtype, another format, no elements)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) {
#ifdef HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        stats_f32 = stats_f32_avx2;
        stats_f64 = stats_f64_avx2;
    }
#endif
    return PyModule_Create(&module);
}
