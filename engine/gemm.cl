// C = alpha * op(A) * op(B) + beta * C on row-major matrices (numpy's layout); op(A) is M x K, op(B) is K x N.
//
// Compile-time settings (-D):
//   TRANS_A, TRANS_B  0/1: A is stored K x M (lda = M) / B is stored N x K (ldb = K)
//   TS_M, TS_N, TS_K  the tile of C one work-group computes (TS_M x TS_N) and the depth of one K step
//   WPT_M, WPT_N      the register block of C one work-item computes: WPT_M x WPT_N values
//   SPLIT_K           0/1: the NDRange's third axis splits K into chunks of k_chunk; each chunk writes its partial
//                     product (times alpha) to C[chunk][m][n] (C is then a scratch of chunks x M x N floats) and
//                     gemm_split_reduce adds the chunks into the real C. For C too small to fill the device with
//                     tiles (a convolution's weight gradient: 20 x 25 outputs, K = 36864), chunks give the
//                     parallelism that tiles cannot.
//   BATCHED           0/1: the NDRange's third axis runs `batch` GEMMs instead, the z-th on A, B and C advanced by
//                     z * stride_a, stride_b, stride_c (e.g. a convolution's per-sample products written as NCHW)
//   BIAS              0, or 1: C[m][n] += bias[n] (InnerProduct), 2: C[m][n] += bias[m] (Convolution), added
//                     where C is written: the bias costs no launch of its own
//   ONES_COLUMN       0/1: op(B) has one more column than B holds, all ones, and that column of the product goes
//                     to bias[m] (beta applies there too) instead of C: a layer's bias gradient (the sums of the
//                     top diff's rows) comes out of its weight gradient's GEMM, in the same launch
//   A_K_BLOCK         0, or (with TRANS_A 0) op(A)[m][k] is at (k / A_K_BLOCK) * A_K_STRIDE + m * lda + k % A_K_BLOCK:
//                     K runs over blocks, e.g. the samples of an (N, O, L) array read as the (O, N * L) matrix
//                     of a convolution's weight gradient, without a regrouping pass
//   VEC_A, VEC_B      1, 2 or 4: width of the global loads along the contiguous axis of A / B; the host picks
//                     a width > 1 only when the leading dimension and the offset are multiples of it, so that
//                     every vector starts aligned
//   LOCAL_VEC         1 or 4: a work-item's register block is made of runs of LOCAL_VEC adjacent rows / columns,
//                     read from local memory as one float4 each (4: a quarter of the local-memory loads, which
//                     bound the scalar variant on GPUs; WPT_M and WPT_N must be multiples of it)
//   PREFETCH          0, 1: fetch the next K step's global values into registers before computing on the current
//                     tiles, so that global latency overlaps the arithmetic (costs registers), or 2: also two
//                     local buffers, the next tiles stored into the other while the current ones are read: one
//                     barrier per K step instead of two (costs twice the local memory)
//
// The work-group is (TS_N / WPT_N) x (TS_M / WPT_M) work-items. Each K step, the group copies a TS_M x TS_K
// slice of op(A) and a TS_K x TS_N slice of op(B) into local memory with coalesced reads, then every work-item
// accumulates its register block from there. A work-item's outputs are runs of LOCAL_VEC strided by the group's
// extent (rather than one block) so that neighbouring work-items touch neighbouring addresses: C stores coalesce
// and local reads spread over the banks.

#define RTS_M (TS_M / WPT_M)
#define BUFFERS (PREFETCH == 2 ? 2 : 1)
#define RTS_N (TS_N / WPT_N)
#define GROUP_SIZE (RTS_M * RTS_N)
// spare columns: the transposing copies into local memory would otherwise hit one bank per K row (LOCAL_VEC of
// them keep the float4 reads aligned)
#define LDS_M (TS_M + LOCAL_VEC)
#define LDS_N (TS_N + LOCAL_VEC)
// the tile row / column of a work-item's i-th register (as read_registers reads them)
#define BLOCK_POS(i, t, RTS) (((i) / LOCAL_VEC) * ((RTS) * LOCAL_VEC) + (t) * LOCAL_VEC + (i) % LOCAL_VEC)
// vector loads per work-item and tile; the last round may be partial
#define LOADS_A ((TS_M * TS_K / VEC_A + GROUP_SIZE - 1) / GROUP_SIZE)
#define LOADS_B ((TS_K * TS_N / VEC_B + GROUP_SIZE - 1) / GROUP_SIZE)

#if VEC_A == 4
typedef float4 float_a;
#define LOAD_A(p) vload4(0, p)
#elif VEC_A == 2
typedef float2 float_a;
#define LOAD_A(p) vload2(0, p)
#else
typedef float float_a;
#define LOAD_A(p) (*(p))
#endif

#if VEC_B == 4
typedef float4 float_b;
#define LOAD_B(p) vload4(0, p)
#elif VEC_B == 2
typedef float2 float_b;
#define LOAD_B(p) vload2(0, p)
#else
typedef float float_b;
#define LOAD_B(p) (*(p))
#endif

typedef union { float_a v; float s[VEC_A]; } vec_a;
typedef union { float_b v; float s[VEC_B]; } vec_b;

// A work-item's share of a tile is LOADS_* vectors, the r-th at index tid + r * GROUP_SIZE of the tile's vectors
// (the last round may be partial). The fetch (global -> registers) and the store (registers -> local memory)
// are apart so that PREFETCH can overlap a fetch with the arithmetic.
#if TRANS_A
#define A_RUN TS_M  // stored K x M: contiguous along m
#else
#define A_RUN TS_K  // stored M x K: contiguous along k
#endif
#if TRANS_B
#define B_RUN TS_K  // stored N x K: contiguous along k
#else
#define B_RUN TS_N  // stored K x N: contiguous along n
#endif

// op(A)[m0 : m0 + TS_M, k0 : k0 + TS_K] into registers, zero outside the matrix.
inline void fetch_a(__global const float* A, int lda, int M, int K, int m0, int k0, int tid, vec_a* x) {
    #pragma unroll
    for (int r = 0; r < LOADS_A; ++r) {
        const int l = tid + r * GROUP_SIZE;
        if (l >= TS_M * TS_K / VEC_A)
            break;
        const int run = (l % (A_RUN / VEC_A)) * VEC_A;  // position along the contiguous axis
        const int line = l / (A_RUN / VEC_A);           // position along the other axis
#if TRANS_A
        const int gline = k0 + line, grun = m0 + run, run_end = M, line_end = K;
#else
        const int gline = m0 + line, grun = k0 + run, run_end = K, line_end = M;
#endif
#if A_K_BLOCK
        __global const float* p = A + (size_t)(grun / A_K_BLOCK) * A_K_STRIDE + (size_t)gline * lda + grun % A_K_BLOCK;
#else
        __global const float* p = A + (size_t)gline * lda + grun;
#endif
        if (gline < line_end && grun + VEC_A <= run_end) {
            x[r].v = LOAD_A(p);
        } else {
            #pragma unroll
            for (int c = 0; c < VEC_A; ++c)
                x[r].s[c] = (gline < line_end && grun + c < run_end) ? p[c] : 0.0f;
        }
    }
}

// The fetched op(A) tile into As[k][m].
inline void store_a(const vec_a* x, __local float* As, int tid) {
    #pragma unroll
    for (int r = 0; r < LOADS_A; ++r) {
        const int l = tid + r * GROUP_SIZE;
        if (l >= TS_M * TS_K / VEC_A)
            break;
        const int run = (l % (A_RUN / VEC_A)) * VEC_A, line = l / (A_RUN / VEC_A);
        #pragma unroll
        for (int c = 0; c < VEC_A; ++c) {
#if TRANS_A
            As[line * LDS_M + run + c] = x[r].s[c];
#else
            As[(run + c) * LDS_M + line] = x[r].s[c];
#endif
        }
    }
}

// op(B)[k0 : k0 + TS_K, n0 : n0 + TS_N] into registers, zero outside the matrix.
inline void fetch_b(__global const float* B, int ldb, int N, int K, int n0, int k0, int tid, vec_b* x) {
    #pragma unroll
    for (int r = 0; r < LOADS_B; ++r) {
        const int l = tid + r * GROUP_SIZE;
        if (l >= TS_K * TS_N / VEC_B)
            break;
        const int run = (l % (B_RUN / VEC_B)) * VEC_B, line = l / (B_RUN / VEC_B);
#if TRANS_B
        const int gline = n0 + line, grun = k0 + run, run_end = K, line_end = N - ONES_COLUMN;
#else
        const int gline = k0 + line, grun = n0 + run, run_end = N - ONES_COLUMN, line_end = K;
#endif
        __global const float* p = B + (size_t)gline * ldb + grun;
        if (gline < line_end && grun + VEC_B <= run_end) {
            x[r].v = LOAD_B(p);
        } else {
            #pragma unroll
            for (int c = 0; c < VEC_B; ++c) {
                x[r].s[c] = (gline < line_end && grun + c < run_end) ? p[c] : 0.0f;
#if ONES_COLUMN && TRANS_B
                if (gline == N - 1 && grun + c < K)
                    x[r].s[c] = 1.0f;
#elif ONES_COLUMN
                if (grun + c == N - 1 && gline < K)
                    x[r].s[c] = 1.0f;
#endif
            }
        }
    }
}

// The fetched op(B) tile into Bs[k][n].
inline void store_b(const vec_b* x, __local float* Bs, int tid) {
    #pragma unroll
    for (int r = 0; r < LOADS_B; ++r) {
        const int l = tid + r * GROUP_SIZE;
        if (l >= TS_K * TS_N / VEC_B)
            break;
        const int run = (l % (B_RUN / VEC_B)) * VEC_B, line = l / (B_RUN / VEC_B);
        #pragma unroll
        for (int c = 0; c < VEC_B; ++c) {
#if TRANS_B
            Bs[(run + c) * LDS_N + line] = x[r].s[c];
#else
            Bs[line * LDS_N + run + c] = x[r].s[c];
#endif
        }
    }
}

// A work-item's wpt registers from one local row: runs of LOCAL_VEC values (one float4 read each when 4), one
// run per group extent rts (wpt and rts are constants once inlined, so the loop unrolls).
inline void read_registers(float* dst, __local const float* row, int t, const int wpt, const int rts) {
#if LOCAL_VEC == 4
    #pragma unroll
    for (int g = 0; g < wpt / 4; ++g) {
        const float4 v = *(__local const float4*)(row + (g * rts + t) * 4);
        dst[4 * g] = v.s0;
        dst[4 * g + 1] = v.s1;
        dst[4 * g + 2] = v.s2;
        dst[4 * g + 3] = v.s3;
    }
#else
    #pragma unroll
    for (int i = 0; i < wpt; ++i)
        dst[i] = row[t + i * rts];
#endif
}

__kernel __attribute__((reqd_work_group_size(RTS_N, RTS_M, 1)))
void gemm(const int M, const int N, const int K, const float alpha,
          __global const float* A, const int a_offset, const int lda,
          __global const float* B, const int b_offset, const int ldb,
          const float beta, __global float* C, const int c_offset, const int ldc, const int k_chunk,
          const int stride_a, const int stride_b, const int stride_c,
          __global float* bias, const int bias_offset) {
    __local float As[BUFFERS * TS_K * LDS_M] __attribute__((aligned(16)));
    __local float Bs[BUFFERS * TS_K * LDS_N] __attribute__((aligned(16)));

    const int tn = get_local_id(0), tm = get_local_id(1);
    const int tid = tm * RTS_N + tn;
    const int m0 = get_group_id(1) * TS_M, n0 = get_group_id(0) * TS_N;
    A += a_offset;
    B += b_offset;
    C += c_offset;
#if BATCHED
    A += get_group_id(2) * stride_a;
    B += get_group_id(2) * stride_b;
    C += get_group_id(2) * stride_c;
    const int k_begin = 0;
    const int k_end = K;
#else
    // k_chunk is a multiple of TS_K, so a tile never straddles two chunks
    const int k_begin = get_group_id(2) * k_chunk;
    const int k_end = min(K, k_begin + k_chunk);
#endif

    float acc[WPT_M][WPT_N];
    #pragma unroll
    for (int i = 0; i < WPT_M; ++i)
        #pragma unroll
        for (int j = 0; j < WPT_N; ++j)
            acc[i][j] = 0.0f;

    vec_a ra[LOADS_A];
    vec_b rb[LOADS_B];
    fetch_a(A, lda, M, K, m0, k_begin, tid, ra);
    fetch_b(B, ldb, N, K, n0, k_begin, tid, rb);
    store_a(ra, As, tid);
    store_b(rb, Bs, tid);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k0 = k_begin, buffer = 0; k0 < k_end; k0 += TS_K, buffer = (buffer + 1) % BUFFERS) {
        const bool more = k0 + TS_K < k_end;
#if PREFETCH
        if (more) {
            fetch_a(A, lda, M, K, m0, k0 + TS_K, tid, ra);
            fetch_b(B, ldb, N, K, n0, k0 + TS_K, tid, rb);
        }
#endif
        __local const float* as = As + buffer * (TS_K * LDS_M);
        __local const float* bs = Bs + buffer * (TS_K * LDS_N);
        #pragma unroll
        for (int k = 0; k < TS_K; ++k) {
            float a[WPT_M], b[WPT_N];
            read_registers(a, as + k * LDS_M, tm, WPT_M, RTS_M);
            read_registers(b, bs + k * LDS_N, tn, WPT_N, RTS_N);
            #pragma unroll
            for (int i = 0; i < WPT_M; ++i)
                #pragma unroll
                for (int j = 0; j < WPT_N; ++j)
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
#if BUFFERS == 1
        // the next tiles overwrite these
        barrier(CLK_LOCAL_MEM_FENCE);
#endif
        if (more) {
#if !PREFETCH
            fetch_a(A, lda, M, K, m0, k0 + TS_K, tid, ra);
            fetch_b(B, ldb, N, K, n0, k0 + TS_K, tid, rb);
#endif
            const int next = (buffer + 1) % BUFFERS;
            store_a(ra, As + next * (TS_K * LDS_M), tid);
            store_b(rb, Bs + next * (TS_K * LDS_N), tid);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    #pragma unroll
    for (int i = 0; i < WPT_M; ++i) {
        const int m = m0 + BLOCK_POS(i, tm, RTS_M);
        #pragma unroll
        for (int j = 0; j < WPT_N; ++j) {
            const int n = n0 + BLOCK_POS(j, tn, RTS_N);
            if (m < M && n < N) {
#if SPLIT_K
                C[((size_t)get_group_id(2) * M + m) * N + n] = alpha * acc[i][j];
#else
#if ONES_COLUMN
                if (n == N - 1) {
                    __global float* g = bias + bias_offset + m;
                    *g = (beta == 0.0f) ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *g;
                    continue;
                }
#endif
                __global float* c = C + (size_t)m * ldc + n;
                // beta == 0 must not read C: it may hold NaN or garbage (BLAS semantics)
#if BIAS == 1
                const float b = bias[bias_offset + n];
#elif BIAS == 2
                const float b = bias[bias_offset + m];
#else
                const float b = 0.0f;
#endif
                *c = ((beta == 0.0f) ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *c) + b;
#endif
            }
        }
    }
}

// C[m][n] = sum over the chunks of partial[chunk][m][n] + beta * C[m][n]: the second step of a split-K GEMM
// (with ONES_COLUMN, column N - 1 goes to bias[m]).
__kernel void gemm_split_reduce(const int count, const int N, const int chunks, __global const float* partial,
                                const float beta, __global float* C, const int c_offset, const int ldc,
                                __global float* bias, const int bias_offset) {
    const int i = get_global_id(0);  // count = M * N
    if (i >= count)
        return;
    float sum = 0.0f;
    for (int s = 0; s < chunks; ++s)
        sum += partial[(size_t)s * count + i];
    __global float* c = C + c_offset + (size_t)(i / N) * ldc + i % N;
#if ONES_COLUMN
    if (i % N == N - 1)
        c = bias + bias_offset + i / N;
#endif
    *c = (beta == 0.0f) ? sum : sum + beta * *c;
}
