// MXFP4 kernels for XLA:CPU: the MoE's expert weights as stored in the checkpoint, blocks [.., N, K/32, 16]
// uint8 (two e2m1 codes a byte, the low nibble the even element) and scales [.., N, K/32] uint8 (E8M0:
// 2**(s - 127)). Codes become floats through a 16-entry table held in a register (vpermps).
//
// GptossMxfp4Rows (decode): y[r, n] = sum_k W_{e[r]}[n, k] * x[r, k], one routed row at a time. Each row
//   reads only its expert's packed bytes, once; each 32-element block's partial sum is multiplied by its
//   scale, as gptoss_jax.cpu_kernels.mxfp4_matvec does in XLA (the same products, summed in another order).
// GptossMxfp4Dequant (prefill tiles): W [N, K] in bfloat16 (exact: an e2m1 value times a power of two
//   needs two significant bits), for a library dot to multiply by a tile of rows.
//
// Work is split in chunks of output rows over XLA's intra-op thread pool, the calling thread working too.
// Built on first use by gptoss_jax/native/__init__.py (-O3 -march=native) and registered as XLA FFI
// targets; see docs/cpu.md.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;     // elements per scale block
constexpr int64_t kHalf = 16;      // bytes per block (one nibble plane)
constexpr int64_t kChunkRows = 64;  // output rows per task

alignas(64) const float kE2M1[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                     -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

inline float E8M0(uint8_t s) {  // 2**(s - 127); s = 0 (a subnormal) reads 0, as in cpu_kernels.e8m0_f32
  uint32_t bits = static_cast<uint32_t>(s) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Job {
  const float* xe;  // [R, G, 16]: the even elements of each block
  const float* xo;  // [R, G, 16]: the odd elements
  const uint8_t* blocks;
  const uint8_t* scales;
  const int32_t* experts;
  float* y;
  int64_t E, N, G, R, chunks_per_row;
  std::vector<float> split;  // owns xe / xo
};

// Rows [n0, n1) of output row r.
void RunRange(const Job& j, int64_t r, int64_t n0, int64_t n1) {
  const int64_t G = j.G;
  const int64_t e = std::clamp<int64_t>(j.experts[r], 0, j.E - 1);  // as XLA's gather clamps
  const uint8_t* blocks = j.blocks + (e * j.N) * G * kHalf;
  const uint8_t* scales = j.scales + (e * j.N) * G;
  const float* xe = j.xe + r * G * kHalf;
  const float* xo = j.xo + r * G * kHalf;
  float* y = j.y + r * j.N;
  int64_t n = n0;
#if defined(__AVX512F__)
  const __m512 lut = _mm512_load_ps(kE2M1);
  const __m128i low = _mm_set1_epi8(0x0F);
  constexpr int kRows = 4;  // rows at a time: the activation loads are shared, four chains in flight
  for (; n + kRows <= n1; n += kRows) {
    __m512 acc[kRows];
    for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const __m512 ve = _mm512_loadu_ps(xe + g * kHalf), vo = _mm512_loadu_ps(xo + g * kHalf);
      for (int i = 0; i < kRows; ++i) {
        const int64_t row = (n + i) * G + g;
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + row * kHalf));
        const __m512 wl = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, low)), lut);
        const __m512 wh = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low)), lut);
        const __m512 t = _mm512_fmadd_ps(wh, vo, _mm512_mul_ps(wl, ve));
        acc[i] = _mm512_fmadd_ps(t, _mm512_set1_ps(E8M0(scales[row])), acc[i]);
      }
    }
    for (int i = 0; i < kRows; ++i) y[n + i] = _mm512_reduce_add_ps(acc[i]);
  }
#elif defined(__AVX2__)
  const __m256 mag = _mm256_setr_ps(0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f);
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  auto decode = [&](__m128i codes8) {  // 8 codes (low bytes) -> 8 floats
    const __m256i c = _mm256_cvtepu8_epi32(codes8);
    const __m256 m = _mm256_permutevar8x32_ps(mag, c);  // uses c & 7
    return _mm256_xor_ps(m, _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(c, 28), sign)));
  };
  for (; n < n1; ++n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = n * G + g;
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + row * kHalf));
      const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
      const float* ve = xe + g * kHalf;
      const float* vo = xo + g * kHalf;
      __m256 t = _mm256_mul_ps(decode(lo), _mm256_loadu_ps(ve));
      t = _mm256_fmadd_ps(decode(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(ve + 8), t);
      t = _mm256_fmadd_ps(decode(hi), _mm256_loadu_ps(vo), t);
      t = _mm256_fmadd_ps(decode(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(vo + 8), t);
      acc = _mm256_fmadd_ps(t, _mm256_set1_ps(E8M0(scales[row])), acc);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float s = 0.f;
    for (float l : lanes) s += l;
    y[n] = s;
  }
#endif
  for (; n < n1; ++n) {  // the remainder, or every row without AVX
    float s = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = n * G + g;
      const uint8_t* b = blocks + row * kHalf;
      float t = 0.f;
      for (int64_t i = 0; i < kHalf; ++i) {
        t += kE2M1[b[i] & 15] * xe[g * kHalf + i] + kE2M1[b[i] >> 4] * xo[g * kHalf + i];
      }
      s += t * E8M0(scales[row]);
    }
    y[n] = s;
  }
}

// Runs work(chunk) for chunk in [0, chunks) on the pool's threads and this one; returns when all are done.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, F work) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, chunks, work] {
    for (;;) {
      const int64_t c = state->next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      work(c);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Rows [n0, n1) of W (blocks [N, G, 16], scales [N, G]) into out [N, G * 32] bfloat16.
void DequantRange(const uint8_t* blocks, const uint8_t* scales, uint16_t* out, int64_t G, int64_t n0, int64_t n1) {
  for (int64_t row = n0 * G; row < n1 * G; ++row) {  // one 32-element block a step
    const uint8_t* b = blocks + row * kHalf;
    uint16_t* o = out + row * kBlock;
    const float scale = E8M0(scales[row]);
#if defined(__AVX512F__)
    const __m512 lut = _mm512_load_ps(kE2M1);
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    const __m512 s = _mm512_set1_ps(scale);
    const __m512i wl = _mm512_castps_si512(
        _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, low)), lut), s));
    const __m512i wh = _mm512_castps_si512(
        _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low)), lut), s));
    // each 32-bit lane j: element 2j (low half) and 2j + 1 (high half) as bfloat16: the top bits of the floats
    const __m512i pairs = _mm512_or_si512(_mm512_srli_epi32(wl, 16),
                                          _mm512_and_si512(wh, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    _mm512_storeu_si512(o, pairs);
#else
    for (int64_t i = 0; i < kHalf; ++i) {
      for (int half = 0; half < 2; ++half) {
        const float f = kE2M1[half ? b[i] >> 4 : b[i] & 15] * scale;
        uint32_t bits;
        std::memcpy(&bits, &f, sizeof bits);
        o[2 * i + half] = static_cast<uint16_t>(bits >> 16);
      }
    }
#endif
  }
}

ffi::Error Mxfp4DequantImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales,
                            ffi::ResultBuffer<ffi::BF16> out) {
  const auto bd = blocks.dimensions(), sd = scales.dimensions();
  if (bd.size() != 3 || sd.size() != 2 || bd[2] != kHalf || sd[0] != bd[0] || sd[1] != bd[1]) {
    return ffi::Error::InvalidArgument("mxfp4_dequant: expected blocks [N, K/32, 16] and scales [N, K/32]");
  }
  const int64_t N = bd[0], G = bd[1];
  const uint8_t* b = blocks.typed_data();
  const uint8_t* s = scales.typed_data();
  uint16_t* o = reinterpret_cast<uint16_t*>(out->untyped_data());
  ParallelFor(pool, (N + kChunkRows - 1) / kChunkRows, [=](int64_t c) {
    DequantRange(b, s, o, G, c * kChunkRows, std::min(N, (c + 1) * kChunkRows));
  });
  return ffi::Error::Success();
}

ffi::Error Mxfp4RowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> blocks,
                         ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> experts,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), bd = blocks.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || bd.size() != 4 || sd.size() != 3 || bd[3] != kHalf) {
    return ffi::Error::InvalidArgument("mxfp4_rows: expected x [R, K], blocks [E, N, K/32, 16], scales [E, N, K/32]");
  }
  const int64_t R = xd[0], K = xd[1], E = bd[0], N = bd[1], G = bd[2];
  if (K != G * kBlock || sd[0] != E || sd[1] != N || sd[2] != G || experts.element_count() != static_cast<size_t>(R)) {
    return ffi::Error::InvalidArgument("mxfp4_rows: x, blocks, scales and experts disagree in shape");
  }
  auto job = std::make_shared<Job>();
  job->split.resize(2 * R * G * kHalf);
  const float* xs = x.typed_data();
  for (int64_t i = 0; i < R * G * kHalf; ++i) {  // even / odd elements of each block
    job->split[i] = xs[2 * i];
    job->split[R * G * kHalf + i] = xs[2 * i + 1];
  }
  job->xe = job->split.data();
  job->xo = job->split.data() + R * G * kHalf;
  job->blocks = blocks.typed_data();
  job->scales = scales.typed_data();
  job->experts = experts.typed_data();
  job->y = y->typed_data();
  job->E = E, job->N = N, job->G = G, job->R = R;
  job->chunks_per_row = (N + kChunkRows - 1) / kChunkRows;
  ParallelFor(pool, R * job->chunks_per_row, [job](int64_t c) {
    const int64_t r = c / job->chunks_per_row, n0 = (c % job->chunks_per_row) * kChunkRows;
    RunRange(*job, r, n0, std::min(n0 + kChunkRows, job->N));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4Rows, Mxfp4RowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // blocks [E, N, K/32, 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // scales [E, N, K/32]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // experts [R]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [R, N]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4Dequant, Mxfp4DequantImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()    // blocks [N, K/32, 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // scales [N, K/32]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // W [N, K]
);
