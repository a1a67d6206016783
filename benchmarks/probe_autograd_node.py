"""What a Python autograd node costs a BatchNorm layer inside a training step, against a
C++ one (issue 10, part 7: the in-situ tax).

syncbn's eager path was a Python ``torch.autograd.Function`` around the core. Timed where
the layers run (bench_torch.bn_in_situ: whole ResNet-18 training steps), its backward node
cost 1.4-2x torch's on the small layers, while the core's own backward costs about what
torch's whole node does. This probe separates the node from the kernels (it led to the
adapter's C++ node, libsyncbn_torch_eager), with five ResNet-18s that differ only in their
BatchNorm layers' training forward and backward:

* ``torch``: ``torch.nn.BatchNorm2d`` (torch's generated C++ node);
* ``python``: torch's own kernels (``aten::native_batch_norm`` and its backward) behind a
  ``torch.autograd.Function`` in Python, shaped like syncbn's (saved tensors, a stats
  tuple on ctx);
* ``cpp``: the same kernels behind a ``torch::autograd::Function`` in C++;
* ``syncbn``: ``syncbn.torch.convert_sync_batchnorm`` (the adapter as it is: since the
  seventh session its C++ node where it was built, else the Python Function);
* ``syncbn_cpp``: syncbn's core (its installed C++ package: headers and the static core
  library) behind a ``torch::autograd::Function`` in C++, on a world of one (a
  ``LocalCommunicator``), float32 only.

The C++ nodes are built here at run time against the installed torch with
``torch.utils.cpp_extension`` (about a minute on 2 cores; cached in the temp folder). The
module around ``python``, ``cpp`` and ``syncbn_cpp`` is the same minimal training
forward, leaner than the adapter's (no checks, no routing). python/cpp is the in-situ
price of a Python node; syncbn_cpp/torch what syncbn's core with a C++ node would give.
Nothing here is part of syncbn: it measures a design option.

    .venv/bin/python benchmarks/probe_autograd_node.py [--reps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import Contention  # noqa: E402
from bench_torch import RESNET18_BN, bn_in_situ, in_situ_ratios  # noqa: E402

CPP = textwrap.dedent("""
    #include <torch/extension.h>

    #include "syncbn/communicator.h"
    #include "syncbn/ops.h"

    using torch::autograd::AutogradContext;
    using torch::autograd::variable_list;

    // torch's batch-norm kernels behind a custom C++ autograd node.
    struct NativeBN : public torch::autograd::Function<NativeBN> {
      static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w,
                                   torch::Tensor b, torch::Tensor rm, torch::Tensor rv,
                                   double momentum, double eps) {
        auto out = at::native_batch_norm(x, w, b, rm, rv, true, momentum, eps);
        ctx->save_for_backward({x, w, std::get<1>(out), std::get<2>(out)});
        ctx->saved_data["eps"] = eps;
        return std::get<0>(out);
      }
      static variable_list backward(AutogradContext* ctx, variable_list grads) {
        auto s = ctx->get_saved_variables();
        auto r = at::native_batch_norm_backward(grads[0], s[0], s[1], {}, {}, s[2], s[3],
                                                true, ctx->saved_data["eps"].toDouble(),
                                                {true, true, true});
        return {std::get<0>(r), std::get<1>(r), std::get<2>(r), torch::Tensor(),
                torch::Tensor(), torch::Tensor(), torch::Tensor()};
      }
    };

    // syncbn's core (installed C++ package) behind the same kind of node, on a world of one.
    syncbn::TensorView view(const at::Tensor& t) {
      syncbn::TensorView v;
      v.data = t.data_ptr();
      v.dtype = t.scalar_type() == at::kDouble ? syncbn::DType::Float64
                                                : syncbn::DType::Float32;
      v.ndim = static_cast<int>(t.dim());
      for (int i = 0; i < v.ndim; ++i) {
        v.shape[i] = t.size(i);
        v.strides[i] = t.stride(i);
      }
      return v;
    }

    syncbn::LocalCommunicator world_of_one;

    struct CoreBN : public torch::autograd::Function<CoreBN> {
      static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w,
                                   torch::Tensor b, torch::Tensor rm, torch::Tensor rv,
                                   double momentum, double eps) {
        TORCH_CHECK(x.scalar_type() == at::kFloat, "the probe takes float32");
        auto stats = x.options().dtype(at::kDouble);
        at::Tensor y = at::empty_like(x), mean = at::empty({x.size(1)}, stats),
                   invstd = at::empty({x.size(1)}, stats);
        syncbn::ForwardOptions opt;
        opt.momentum = momentum;
        opt.eps = eps;
        auto vw = view(w), vb = view(b), vrm = view(rm), vrv = view(rv);
        double count = syncbn::forward(view(x), &vw, &vb, &vrm, &vrv, opt, world_of_one,
                                       view(y), view(mean), view(invstd));
        ctx->save_for_backward({x, w, mean, invstd});
        ctx->saved_data["count"] = count;
        return y;
      }
      static variable_list backward(AutogradContext* ctx, variable_list grads) {
        auto s = ctx->get_saved_variables();
        at::Tensor dx = at::empty_like(s[0]), dw = at::empty_like(s[1]),
                   db = at::empty_like(s[1]);
        syncbn::BackwardOptions opt;
        opt.count = ctx->saved_data["count"].toDouble();
        auto vw = view(s[1]), vdx = view(dx), vdw = view(dw), vdb = view(db);
        syncbn::backward(view(grads[0]), view(s[0]), view(s[2]), view(s[3]), &vw, opt,
                         world_of_one, &vdx, &vdw, &vdb);
        return {dx, dw, db, torch::Tensor(), torch::Tensor(), torch::Tensor(),
                torch::Tensor()};
      }
    };

    torch::Tensor native_bn(torch::Tensor x, torch::Tensor w, torch::Tensor b,
                            torch::Tensor rm, torch::Tensor rv, double momentum,
                            double eps) {
      return NativeBN::apply(x, w, b, rm, rv, momentum, eps);
    }

    torch::Tensor core_bn(torch::Tensor x, torch::Tensor w, torch::Tensor b,
                          torch::Tensor rm, torch::Tensor rv, double momentum, double eps) {
      return CoreBN::apply(x, w, b, rm, rv, momentum, eps);
    }

    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
      m.def("native_bn", &native_bn);
      m.def("core_bn", &core_bn);
    }
    """)


def build_cpp():
    from torch.utils import cpp_extension

    d = os.path.join(tempfile.gettempdir(), "syncbn_probe_autograd_node")  # rebuilt on change
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "native_bn.cpp")
    with open(src, "w") as f:
        f.write(CPP)
    from syncbn.__main__ import cmake_dir

    # syncbn's C++ package as the wheel installs it (python -m syncbn --cmake-dir).
    pkg = cmake_dir().parent
    return cpp_extension.load(name="probe_autograd_node", sources=[src], build_directory=d,
                              extra_include_paths=[os.path.join(pkg, "include")],
                              extra_cflags=["-O2"],
                              extra_ldflags=[os.path.join(pkg, "lib", "libsyncbn_core.a"),
                                             "-fopenmp"])


def make_python_function(torch):
    aten = torch.ops.aten

    class NativeBN(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
            y, mean, invstd = aten.native_batch_norm(x, weight, bias, running_mean,
                                                     running_var, True, momentum, eps)
            ctx.save_for_backward(x, weight)
            ctx.stats = (mean, invstd, eps)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, weight = ctx.saved_tensors
            mean, invstd, eps = ctx.stats
            dx, dw, db = aten.native_batch_norm_backward(dy, x, weight, None, None, mean,
                                                         invstd, True, eps,
                                                         [True, True, True])
            return dx, dw, db, None, None, None, None

    return NativeBN.apply


def swap_bn(model, fn, torch):
    """model with every BatchNorm2d's training forward calling fn (eval: torch's)."""

    class Layer(torch.nn.BatchNorm2d):
        def forward(self, input):
            if not self.training:
                return super().forward(input)
            self.num_batches_tracked.add_(1)
            return fn(input, self.weight, self.bias, self.running_mean, self.running_var,
                      self.momentum, self.eps)

    for m in model.modules():
        for name, child in m.named_children():
            if type(child) is torch.nn.BatchNorm2d:
                new = Layer(child.num_features, child.eps, child.momentum)
                new.load_state_dict(child.state_dict())
                setattr(m, name, new)
    return model


PAIRS = (("python", "cpp"), ("cpp", "torch"), ("syncbn", "torch"), ("syncbn_cpp", "torch"),
         ("syncbn", "syncbn_cpp"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20, help="measured steps per model")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import torch
    import torchvision

    import syncbn.torch

    ext = build_cpp()
    fns = {"python": make_python_function(torch), "cpp": ext.native_bn,
           "syncbn_cpp": ext.core_bn}
    out = {}
    with Contention() as load:
        for fmt_name, fmt in (("NCHW", torch.contiguous_format),
                              ("channels_last", torch.channels_last)):
            torch.manual_seed(0)
            plain = torchvision.models.resnet18(num_classes=10).to(memory_format=fmt)
            models = {"torch": plain,
                      "syncbn": syncbn.torch.convert_sync_batchnorm(copy.deepcopy(plain))}
            for k, fn in fns.items():
                models[k] = swap_bn(copy.deepcopy(plain), fn, torch)
            g = torch.Generator().manual_seed(2)
            x = torch.randn(8, 3, 96, 96, generator=g).contiguous(memory_format=fmt)
            target = torch.randint(0, 10, (8,), generator=g)
            # torch's kernels behind either node give torch's numbers; the core's agree
            # with them to float32 rounding.
            ref = plain(x)
            for k, m in models.items():
                y = m(x)
                assert (torch.equal(y, ref) if k in ("python", "cpp")
                        else torch.allclose(y, ref, rtol=1e-4, atol=1e-4)), k
            t = bn_in_situ(models, x, target, args.reps, torch)
            for a, b in PAIRS:
                for shape, res in in_situ_ratios(t, a, b, RESNET18_BN).items():
                    out[f"{fmt_name} {shape} {a}/{b}"] = res
    busy = load.as_dict()

    print(f"in situ, us per layer and paired ratios (median of per-step ratios); other "
          f"processes took {busy['others_cpu_fraction']:.1%} of the CPUs")
    print(f"  {'layer input':30s} {'pair':18s} {'fwd':>5s} {'bwd':>5s} {'both':>5s}  us")
    for name, r in out.items():
        where, pair = name.rsplit(" ", 1)
        a, b = pair.split("/")
        print(f"  {where:30s} {pair:18s} {r['fwd']['ratio_paired']:5.2f} "
              f"{r['bwd']['ratio_paired']:5.2f} {r['fwd+bwd']['ratio_paired']:5.2f}  "
              f"{r['fwd+bwd'][a + '_us']:.0f} vs {r['fwd+bwd'][b + '_us']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"in_situ": out, "contention": busy}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
