"""What a Python autograd node costs a BatchNorm layer inside a training step, against a
C++ one (issue 10, part 7: the in-situ tax).

syncbn's eager path is a Python ``torch.autograd.Function`` around the core. Timed where
the layers run (bench_torch.bn_in_situ: whole ResNet-18 training steps), its backward node
costs 1.4-2x torch's on the small layers, and the core's own backward about as much as
torch's whole node. This probe separates the node from the kernels: three ResNet-18s whose
BatchNorm layers all run torch's own kernels (``aten::native_batch_norm`` and its
backward) and differ only in how the autograd node is made:

* ``torch``: ``torch.nn.BatchNorm2d`` (torch's generated C++ node);
* ``cpp``: a ``torch::autograd::Function`` in C++, built here at run time against the
  installed torch with ``torch.utils.cpp_extension`` (about a minute on 2 cores);
* ``python``: a ``torch.autograd.Function`` in Python, shaped like syncbn's (saved
  tensors, a stats tuple on ctx, the kernels called from forward and backward).

The module around them is the same minimal training forward for ``cpp`` and ``python``.
So python/cpp is the in-situ price of the Python node, and cpp/torch what a C++ node of
syncbn's would add over torch's own. Nothing here is part of syncbn; it measures a
design option.

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

    torch::Tensor native_bn(torch::Tensor x, torch::Tensor w, torch::Tensor b,
                            torch::Tensor rm, torch::Tensor rv, double momentum,
                            double eps) {
      return NativeBN::apply(x, w, b, rm, rv, momentum, eps);
    }

    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("native_bn", &native_bn); }
    """)


def build_cpp(torch):
    from torch.utils import cpp_extension

    d = os.path.join(tempfile.gettempdir(), "syncbn_probe_autograd_node")  # rebuilt on change
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "native_bn.cpp")
    with open(src, "w") as f:
        f.write(CPP)
    return cpp_extension.load(name="probe_native_bn", sources=[src], build_directory=d,
                              extra_cflags=["-O2"])


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=24, help="measured steps per model")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import torch
    import torchvision

    cpp = build_cpp(torch).native_bn
    fns = {"cpp": cpp, "python": make_python_function(torch)}
    out = {}
    load = Contention().__enter__()
    for fmt_name, fmt in (("NCHW", torch.contiguous_format),
                          ("channels_last", torch.channels_last)):
        torch.manual_seed(0)
        models = {"torch": torchvision.models.resnet18(num_classes=10).to(memory_format=fmt)}
        for k, fn in fns.items():
            models[k] = swap_bn(copy.deepcopy(models["torch"]), fn, torch)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(8, 3, 96, 96, generator=g).contiguous(memory_format=fmt)
        target = torch.randint(0, 10, (8,), generator=g)
        # The same numbers from all three (so they run the same kernels on the same data).
        ref = models["torch"](x)
        for k in fns:
            assert torch.equal(models[k](x), ref), k
        t = bn_in_situ(models, x, target, args.reps, torch)
        for a, b in (("python", "cpp"), ("cpp", "torch"), ("python", "torch")):
            for shape, res in in_situ_ratios(t, a, b, RESNET18_BN).items():
                out[f"{fmt_name} {shape} {a}/{b}"] = res
    load.__exit__(None, None, None)
    busy = load.as_dict()

    print(f"in situ, us per layer and paired ratios (median of per-step ratios); other "
          f"processes took {busy['others_cpu_fraction']:.1%} of the CPUs")
    print(f"  {'layer input':38s} {'pair':13s} {'fwd':>6s} {'bwd':>6s} {'both':>6s}  us")
    for name, r in out.items():
        *where, pair = name.rsplit(" ", 1)
        a, b = pair.split("/")
        print(f"  {where[0]:38s} {pair:13s} {r['fwd']['ratio_paired']:6.2f} "
              f"{r['bwd']['ratio_paired']:6.2f} {r['fwd+bwd']['ratio_paired']:6.2f}  "
              f"{r['fwd+bwd'][a + '_us']:.0f} vs {r['fwd+bwd'][b + '_us']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"in_situ": out, "contention": busy}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
