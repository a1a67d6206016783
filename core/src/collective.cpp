#include "collective.h"

#include <cmath>
#include <cstring>

#include "syncbn/errors.h"

namespace syncbn {
namespace {

uint64_t mix(uint64_t z) {  // splitmix64's finalizer
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

const char* op_name(CollectiveOp op) {
  return op == CollectiveOp::Forward ? "forward statistics" : "backward sums";
}

bool whole(double v) {
  return std::isfinite(v) && v == std::floor(v);
}

std::string layer_str(const CollectiveKey& key) {
  if (key.layer == 0) return "functional call (layer 0)";
  if (key.layer_name && *key.layer_name)
    return detail::cat("layer '", key.layer_name, "' (#", key.layer, ")");
  return detail::cat("layer #", key.layer);
}

// A call whose collective the ranks disagreed on is not counted: every rank takes its own
// back, so ranks that agree again afterwards (the error was caught) are in step again.
void uncount(const Fingerprint& f) {
  if (f.counts) f.counts->forget(f.layer, f.op == CollectiveOp::Forward ? 0 : 1, f.call);
}

}  // namespace

Fingerprint next_fingerprint(CollectiveOp op, int64_t channels, int axis, const CollectiveKey& key,
                             Communicator* comm) {
  Fingerprint f;
  f.op = op;
  f.channels = channels;
  f.axis = axis;
  f.layer = key.layer;
  f.layer_name = key.layer_name;
  f.verify = key.verify;
  if (comm) {
    f.counts = &comm->call_counts();
    f.call = f.counts->next(key.layer, op == CollectiveOp::Forward ? 0 : 1);
  } else {
    f.call = key.call;
  }
  uint64_t h = mix(uint64_t(op));
  for (uint64_t v : {uint64_t(channels), uint64_t(axis), uint64_t(key.layer), uint64_t(f.call)})
    h = mix(h ^ v);
  f.slots[fp::kRanks] = 1;
  for (int j = 0; j < fp::kChunks; ++j) {
    const double v = j == 0 ? double(int(op)) : double((h >> (8 * (j - 1))) & 0xffu);
    f.slots[fp::kSum + j] = v;
    f.slots[fp::kSumSq + j] = v * v;
  }
  return f;
}

bool all_finite(const double* p, int64_t n) {
  // Branch-free, so it vectorizes: an exponent of all ones (inf, NaN) plus one carries
  // into bit 11.
  uint64_t carry = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t b;
    std::memcpy(&b, p + i, sizeof b);
    carry |= ((b >> 52) & 0x7ffu) + 1;
  }
  return !(carry & 0x800u);
}

void write_fingerprint(const Fingerprint& f, double* buf) {
  const int64_t C = f.channels;
  double* s = buf + 2 * C + 1;
  const bool finite = all_finite(buf, 2 * C);
  for (int64_t i = 0; i < kFingerprintSlots; ++i) s[i] = f.slots[i];
  s[fp::kNonFinite] = finite ? 0 : 1;
}

std::string describe(const Communicator& comm) {
  return detail::cat("<", comm.kind(), " rank ", comm.rank(), " of ", comm.size(), ">");
}

std::string describe(const Fingerprint& f) {
  return detail::cat("the ", op_name(f.op), " of ",
                     layer_str(CollectiveKey{f.layer, f.layer_name, f.verify}),
                     ", its synchronized call ", f.call);
}

void allreduce_naming(Communicator& comm, double* buf, int64_t n, Device device, void* stream,
                      const Fingerprint& f) {
  try {
    comm.allreduce_sum(buf, n, device, stream);
  } catch (const CollectiveMismatchError&) {
    throw;
  } catch (const CommError& e) {
    fail<CommError>("syncbn: the all-reduce of ", describe(f), " failed: ", e.what());
  }
}

namespace {

// A reduction that no sum of ranks' buffers can give: the communicator's fault
// (RuntimeError) in the composed ops, the caller's (ValueError) for a buffer handed to a
// primitive.
template <class... Args>
[[noreturn]] void bad_reduction(const Expected& e, const Args&... args) {
  if (e.comm) fail<CommError>(args...);
  fail<ValueError>(args...);
}

}  // namespace

void check_reduced(const double* buf, const Expected& e) {
  const int64_t C = e.channels;
  const double* s = buf + 2 * C + 1;
  // Named only when something fails: a string per call costs more than the checks.
  const auto who = [&] { return e.comm ? "comm " + describe(*e.comm) : std::string("buffer"); };
  const double ranks = e.comm ? double(e.comm->size()) : 0.0;
  const CollectiveKey key =
      e.mine ? CollectiveKey{e.mine->layer, e.mine->layer_name, e.mine->verify} : e.key;
  int v = fp::verdict(s, ranks, int(e.op));
  if (v == 1) {
    if (e.comm)
      fail<CommError>(who(), ": the all-reduce summed ", s[fp::kRanks],
                      " ranks' contributions, expected ", ranks,
                      " (the communicator's size): it must sum the buffer in place across all of "
                      "its ranks");
    fail(who(), ": expected an all-reduced buffer from batch_norm_",
         e.op == CollectiveOp::Forward ? "stats" : "backward_reduce",
         " (its rank slot holds a whole number of ranks >= 1), got ", s[fp::kRanks]);
  }
  if (v != 0 && key.verify) {
    if (v == 3 && !e.mine)
      fail(who(), ": expected ", op_name(e.op), " (from batch_norm_",
           e.op == CollectiveOp::Forward ? "stats" : "backward_reduce",
           ") all-reduced, got a buffer of ",
           e.op == CollectiveOp::Forward ? op_name(CollectiveOp::Backward)
                                         : op_name(CollectiveOp::Forward));
    std::string mine;
    if (e.mine)
      mine = detail::cat("this rank reduced ", describe(*e.mine), ", with C=", e.mine->channels,
                         " channels on axis ", e.mine->axis);
    else
      mine = detail::cat("this rank reduced the ", op_name(e.op), " of ", layer_str(key),
                         " with C=", C, " channels");
    if (e.mine) uncount(*e.mine);
    fail<CollectiveMismatchError>(
        "syncbn: ranks disagree on a collective (", e.comm ? describe(*e.comm) : "all-reduce",
        "): ", mine,
        "; at least one other rank reduced something else at this point (another layer, "
        "operation, channel axis, channel count or call count). Every rank must run the same "
        "SyncBN layers in the same order, all in training or all in eval mode, with the same "
        "channel axis. Nothing was written.");
  }
  const double N = buf[2 * C];
  if (!whole(N) || N < 0 || N > 9007199254740992.0 || (e.local_count >= 0 && N < e.local_count))
    bad_reduction(e, who(), ": the all-reduced count is ", N,
                  ", expected a whole number >= ", e.local_count >= 0 ? e.local_count : 0.0,
                  e.local_count >= 0 ? " (this rank's count)" : "",
                  ": the communicator must sum the buffer in place across its ranks");
  if (e.count >= 0 && N != e.count)
    fail<CommError>(who(), ": the backward all-reduce counted ", N,
                    " values per channel, but the forward counted ", e.count);
  const double nf = s[fp::kNonFinite];
  if (!whole(nf) || nf < 0 || nf > s[fp::kRanks])
    bad_reduction(e, who(), ": the all-reduced non-finite flag is ", nf,
                  ", expected a whole number in [0, ", s[fp::kRanks], "]");
  if (nf == 0 && !all_finite(buf, 2 * C))
    for (int64_t i = 0; i < 2 * C; ++i)
      if (!std::isfinite(buf[i]))
        bad_reduction(e, who(), ": the all-reduce returned a non-finite sum (", buf[i],
                      " at index ", i, ") although every rank's values were finite");
}

}  // namespace syncbn
