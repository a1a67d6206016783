// The fingerprint every all-reduce carries, and the checks of what comes back.
//
// Slots behind the payload and count (ops.h), as this rank writes them:
//   [0] 1            the ranks that contributed (reduced: the world size)
//   [1] 0 or 1       whether this rank's payload is not finite (reduced: how many)
//   [2 .. 2+K)       v_j, K = kChunks small integers: v_0 = the operation (1 forward,
//                    2 backward), v_1.. = bytes of a hash of (operation, C, channel axis,
//                    layer, the layer's call count)
//   [2+K .. 2+2K)    v_j^2
// After the SUM, with W = slot 0: all ranks had the same v_j iff W * sum(v_j^2) ==
// (sum v_j)^2 (Cauchy-Schwarz, equality only for equal terms). Every term is an integer
// below 2^53 for W < 2^18 (v_j <= 255), so the test is exact in float64 and every rank,
// holding the same reduced values, reaches the same verdict. One summed value would not
// do: fingerprints (0, 2, 1) sum to 3 times the third rank's.
#pragma once

#include <cstdint>
#include <string>

#include "syncbn/communicator.h"
#include "syncbn/math.h"
#include "syncbn/ops.h"

namespace syncbn {

enum class CollectiveOp : int { Forward = 1, Backward = 2 };

namespace fp {
constexpr int kChunks = 7;  // the operation + 6 bytes (48 bits) of the hash
constexpr int kRanks = 0, kNonFinite = 1, kSum = 2, kSumSq = 2 + kChunks;
static_assert(2 + 2 * kChunks == kFingerprintSlots, "fingerprint layout");
constexpr double kMaxWorld = 262143;  // 2^18 - 1: keeps W * sum(v^2) below 2^53

// The verdict on reduced fingerprint slots `s` (device code too): 0 agreed; 1 the
// contributions are not a whole number of ranks (or not `ranks` when ranks > 0); 2 the
// ranks' fingerprints differ; 3 they agree, on another operation than `op`.
SYNCBN_HD int verdict(const double* s, double ranks, int op) {
  const double w = s[kRanks];
  if (!(w >= 1 && w <= kMaxWorld && w == double(int64_t(w))) || (ranks > 0 && w != ranks)) return 1;
  for (int j = 0; j < kChunks; ++j)
    if (w * s[kSumSq + j] != s[kSum + j] * s[kSum + j]) return 2;
  return s[kSum] == w * double(op) ? 0 : 3;
}

// Where the host cannot look (a device buffer reduced on the stream, no host sync), the
// kernels that consume a reduced buffer run this check instead and, when it fails, write
// NaN where they would have written results and leave running statistics alone.
struct DeviceCheck {
  int op = 1;               // CollectiveOp
  double ranks = 0;         // the communicator's size (0: unknown, primitives)
  double local_count = -1;  // this rank's count per channel (-1: unknown)
  bool verify = true;       // judge the fingerprint (the rank and count checks always run)
};

// The whole-buffer part of the check (every thread of a kernel reaches the same answer):
// the fingerprint, the number of ranks, the count. The per-channel part is finite(c).
SYNCBN_HD bool reduced_ok(const double* buf, int64_t C, const DeviceCheck& k) {
  const double* s = buf + 2 * C + 1;
  const int v = verdict(s, k.ranks, k.op);
  if (v == 1 || (v != 0 && k.verify)) return false;
  const double n = buf[2 * C], nf = s[kNonFinite];  // range first: int64_t(huge) is UB
  return n >= 0 && n <= 9007199254740992.0 && n == double(int64_t(n)) && n >= k.local_count &&
         nf >= 0 && nf <= s[kRanks] && nf == double(int64_t(nf));
}

// Channel c's sums are usable: finite, or not finite because some rank's were.
SYNCBN_HD bool reduced_channel_ok(const double* buf, int64_t C, int64_t c) {
  const double a = buf[c], b = buf[C + c];
  return (a - a == 0 && b - b == 0) || buf[2 * C + 1 + kNonFinite] > 0;
}
}  // namespace fp

// What this rank reduces in one all-reduce.
struct Fingerprint {
  CollectiveOp op = CollectiveOp::Forward;
  int64_t channels = 0;
  int axis = 0;
  int64_t layer = 0;
  int64_t call = 0;  // the layer's synchronized calls in this direction, this one included
  CallCounts* counts = nullptr;  // where `call` was counted (null: given by the caller)
  const char* layer_name = nullptr;
  bool verify = true;
  double slots[kFingerprintSlots] = {};  // what this rank contributes; [kNonFinite] is 0
};

// Builds the fingerprint of a call: counted on `comm` (per layer and direction), or, for
// the primitives (comm null), with the caller's key.call. `axis`: the non-negative axis.
Fingerprint next_fingerprint(CollectiveOp op, int64_t channels, int axis, const CollectiveKey& key,
                             Communicator* comm);

// True when none of p[0 .. n) is inf or NaN.
bool all_finite(const double* p, int64_t n);

// Writes fp's slots behind a host buffer's payload and count (buf[2C + 1 ...]), with the
// non-finite flag taken from buf[0 .. 2C).
void write_fingerprint(const Fingerprint& fp, double* buf);

// What a reduced buffer is checked against.
struct Expected {
  CollectiveOp op = CollectiveOp::Forward;
  int64_t channels = 0;
  const Fingerprint* mine = nullptr;   // this rank's fingerprint (names it in the error)
  CollectiveKey key{};                 // for the primitives, where `mine` is unknown
  const Communicator* comm = nullptr;  // its size is the expected number of ranks
  double local_count = -1;             // this rank's count per channel (-1: unknown)
  double count = -1;                   // backward: the forward's global count (-1: unknown)
};

// Throws CollectiveMismatchError when the ranks' fingerprints differ (or name another
// operation), CommError when the reduction is not what a sum of the ranks' buffers can
// be: contributions other than the communicator's size, a count that is not a whole
// number in [local count, 2^53], non-finite sums although no rank's were.
void check_reduced(const double* buf, const Expected& e);

// "<mpi rank 0 of 2>", for messages.
std::string describe(const Communicator& comm);

// "the forward statistics of layer 'net.bn1' (#3), its synchronized call 17", for messages.
std::string describe(const Fingerprint& f);

// comm.allreduce_sum, with a communicator's own failure (CommError: a timeout, an MPI
// error) rethrown naming the layer and call it happened in.
void allreduce_naming(Communicator& comm, double* buf, int64_t n, Device device, void* stream,
                      const Fingerprint& f);

}  // namespace syncbn
