"""CPU benchmark of the torch adapter: syncbn.torch.SyncBatchNorm against torch's own
BatchNorm2d and against syncbn's core path alone, in one run.

    .venv/bin/python benchmarks/bench_torch.py [--quick] [--reps N] [--json PATH]
                                               [--malloc-keep]

What it measures (float32, training mode, affine, running stats tracked, single process):
  * for (32,64,56,56) NCHW and the same shape channels_last, fwd and fwd+bwd of
      adapter  syncbn.torch.SyncBatchNorm(64, comm=syncbn.comm.local()), a module with
               autograd (fwd+bwd: torch.autograd.grad(y, (x, weight, bias), dy));
      torch    torch.nn.BatchNorm2d(64), the same way;
      core     syncbn.batch_norm_forward/backward on the same torch tensors (functional
               API, no module, no autograd): what the adapter wraps.
    Contenders are interleaved (balanced orders, see bench_cpu.interleaved), medians over
    repetitions.
    The adapter's overhead over the core is adapter / core - 1 (target <= 10 %).
  * a small (4,16,8,8) case for scale: there the fixed per-call cost dominates, so it is
    reported in microseconds and not held to the target.
  * whether torch's own SyncBN runs on CPU: torch.nn.SyncBatchNorm with an initialized
    gloo process group of size 1, and the ATen chain it uses (batch_norm_stats,
    batch_norm_gather_stats_with_counts, batch_norm_elemt). Each outcome is recorded
    ("runs", or the exception's type and first sentence); none runs on CPU in torch 2.13,
    so there is nothing of torch's SyncBN to time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import (  # noqa: E402
    Contention,
    balanced_orders,
    mark,
    measure,
    reexec_with_malloc_keep,
)

TARGET_ADAPTER_OVERHEAD = 0.10  # adapter time / core time - 1
BIG = (32, 64, 56, 56)
SMALL = (4, 16, 8, 8)


# ---- torch's own SyncBN on CPU ----------------------------------------------------------


def _error(e: BaseException) -> str:
    """Exception type and first sentence (the dispatcher's message goes on for a page)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg.split('. ')[0].rstrip('.')}"


def probe_torch_syncbn(torch) -> dict:
    """Tries torch.nn.SyncBatchNorm (gloo group of size 1) and the ATen chain on CPU."""
    import torch.distributed as dist

    out = {}
    x = torch.randn(4, 8, 5, 5)
    w, b = torch.ones(8), torch.zeros(8)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0,
                                    world_size=1)
            out["process_group"] = f"gloo, world size {dist.get_world_size()}"
        except Exception as e:  # noqa: BLE001
            out["process_group"] = _error(e)
        try:
            m = torch.nn.SyncBatchNorm(8).train()
            m(x.requires_grad_())
            out["torch.nn.SyncBatchNorm"] = "runs"
        except Exception as e:  # noqa: BLE001
            out["torch.nn.SyncBatchNorm"] = _error(e)
        if dist.is_initialized():
            dist.destroy_process_group()

    mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    chain = {
        "torch.batch_norm_stats": lambda: torch.batch_norm_stats(x, 1e-5),
        "torch.batch_norm_gather_stats_with_counts": lambda:
            torch.batch_norm_gather_stats_with_counts(
                x, mean[None], invstd[None], None, None, 0.1, 1e-5,
                torch.tensor([x.numel() / 8.0])),
        "torch.batch_norm_elemt": lambda: torch.batch_norm_elemt(x, w, b, mean, invstd, 1e-5),
    }
    for name, fn in chain.items():
        try:
            fn()
            out[name] = "runs"
        except Exception as e:  # noqa: BLE001
            out[name] = _error(e)
    return out


# ---- one case -------------------------------------------------------------------------------


def run_case(shape, memory_format, reps, syncbn, torch) -> dict:
    C = shape[1]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=memory_format)
    w0, b0 = torch.rand(C, generator=g) + 0.5, torch.rand(C, generator=g) - 0.5
    xg = x.detach().requires_grad_()  # an activation: autograd records the forward
    local = syncbn.comm.local()

    adapter = syncbn.torch.SyncBatchNorm(C, comm=local).train()
    ref = torch.nn.BatchNorm2d(C).train()
    with torch.no_grad():
        for m in (adapter, ref):
            m.weight.copy_(w0)
            m.bias.copy_(b0)
    cw, cb = w0.clone(), b0.clone()  # the core's own parameters and running stats
    rm, rv = torch.zeros(C), torch.ones(C)

    def adapter_fwd():
        return adapter(xg)

    def adapter_fwdbwd():
        return torch.autograd.grad(adapter(xg), (xg, adapter.weight, adapter.bias), dy)

    def torch_fwd():
        return ref(xg)

    def torch_fwdbwd():
        return torch.autograd.grad(ref(xg), (xg, ref.weight, ref.bias), dy)

    def core_fwd():
        return syncbn.batch_norm_forward(x, cw, cb, rm, rv, training=True, comm=local)

    def core_fwdbwd():
        y, ctx = syncbn.batch_norm_forward(x, cw, cb, rm, rv, training=True, comm=local)
        return syncbn.batch_norm_backward(dy, ctx)

    # Sanity: the three compute the same y, dx, dweight, dbias, in the input's layout.
    ya = adapter(xg)
    ga = torch.autograd.grad(ya, (xg, adapter.weight, adapter.bias), dy)
    yt = ref(xg)
    gt = torch.autograd.grad(yt, (xg, ref.weight, ref.bias), dy)
    yc, ctx = core_fwd()
    gc = syncbn.batch_norm_backward(dy, ctx)
    diff = lambda a, b: float((a.detach() - b.detach()).abs().max())  # noqa: E731
    agree = {"adapter_vs_torch": {k: diff(ya if k == "y" else ga[i - 1],
                                          yt if k == "y" else gt[i - 1])
                                  for i, k in enumerate(("y", "dx", "dweight", "dbias"))},
             "adapter_vs_core": {k: diff(ya if k == "y" else ga[i - 1],
                                         yc if k == "y" else gc[i - 1])
                                 for i, k in enumerate(("y", "dx", "dweight", "dbias"))},
             "layout_kept": all(t.is_contiguous(memory_format=memory_format)
                                for t in (ya, ga[0], yc, gc[0]))}
    del ya, ga, yt, gt, yc, ctx, gc

    res = {"shape": list(shape), "memory_format": str(memory_format).split(".")[-1],
           "agree": agree}
    for op, fns in (("fwd", {"adapter": adapter_fwd, "torch": torch_fwd, "core": core_fwd}),
                    ("fwd+bwd", {"adapter": adapter_fwdbwd, "torch": torch_fwdbwd,
                                 "core": core_fwdbwd})):
        t, r = measure(fns, reps)

        def paired(a, b, t=t):
            return statistics.median(p / q for p, q in zip(t[a], t[b], strict=True))

        r["ratios"] = {
            "adapter/core": r["adapter"]["median_s"] / r["core"]["median_s"],
            "adapter/core_paired": paired("adapter", "core"),
            "adapter/torch": r["adapter"]["median_s"] / r["torch"]["median_s"],
            "adapter/torch_paired": paired("adapter", "torch"),
            "core/torch": r["core"]["median_s"] / r["torch"]["median_s"],
        }
        r["adapter_overhead_s"] = r["adapter"]["median_s"] - r["core"]["median_s"]
        res[op] = r
    return res


# ---- ResNet-18: every BatchNorm layer, and whole steps -----------------------------------------

# The BatchNorm2d inputs of torchvision's ResNet-18 at batch 8, 96 px: (shape, layers).
RESNET18_BN = [((8, 64, 48, 48), 1), ((8, 64, 24, 24), 4), ((8, 128, 12, 12), 5),
               ((8, 256, 6, 6), 5), ((8, 512, 3, 3), 5)]


def paired_ratio(t, a, b):
    return statistics.median(p / q for p, q in zip(t[a], t[b], strict=True))


def resnet18_layers(reps, syncbn, torch) -> dict:
    """Each distinct BatchNorm input of ResNet-18 (batch 8, 96 px), NCHW and channels_last:
    syncbn.torch.SyncBatchNorm (default communicator: a world of one here) against
    torch.nn.BatchNorm2d as modules, fwd+bwd in training and forward in eval."""
    out = {}
    for shape, count in RESNET18_BN:
        for fmt_name, fmt in (("NCHW", torch.contiguous_format),
                              ("channels_last", torch.channels_last)):
            C = shape[1]
            g = torch.Generator().manual_seed(1)
            x = torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_()
            dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
            ours, ref = syncbn.torch.SyncBatchNorm(C), torch.nn.BatchNorm2d(C)

            def train(m, x=x, dy=dy):
                return lambda: torch.autograd.grad(m(x), (x, m.weight, m.bias), dy)

            def evaluate(m, x=x):
                def f():
                    with torch.no_grad():
                        return m(x)
                return f

            res = {"layers": count}
            for mode in ("train fwd+bwd", "eval fwd"):
                for m in (ours, ref):
                    m.train(mode.startswith("train"))
                make = train if mode.startswith("train") else evaluate
                t, r = measure({"syncbn": make(ours), "torch": make(ref)}, reps)
                res[mode] = {"syncbn_us": r["syncbn"]["median_s"] * 1e6,
                             "torch_us": r["torch"]["median_s"] * 1e6,
                             "ratio": r["syncbn"]["median_s"] / r["torch"]["median_s"],
                             "ratio_paired": paired_ratio(t, "syncbn", "torch")}
            out[f"{fmt_name} {shape}"] = res
    return out


def bn_in_situ(models: dict, x, target, reps, torch) -> dict:
    """Every BatchNorm layer of each model in ``models`` timed where it runs: whole
    training steps of the models, in balanced orders (see bench_cpu.balanced_orders).
    Each layer's forward (forward pre-hook to hook) and backward (its autograd node,
    pre-hook to hook) are timed the same way in every model and summed per step over the
    layers of each input shape. Unlike the per-layer loop, the caches then hold what the
    rest of the step left there (convolution weights, other activations), as in training;
    the loop keeps one layer's code and data hot. Returns {model: {(shape, "fwd" | "bwd"):
    seconds per step, one per repetition}}."""
    pc = time.perf_counter
    step_sums = {}  # (shape, "fwd" | "bwd") -> seconds in the current step
    clock = {}
    handles = []

    def pre(mod, args, clock=clock):
        clock["fwd"] = pc()

    def post(mod, args, y, clock=clock, sums=step_sums):
        shape = tuple(args[0].shape)
        sums[shape, "fwd"] = sums.get((shape, "fwd"), 0.0) + pc() - clock["fwd"]
        node = y.grad_fn
        start = {}

        def node_pre(grad_outputs, start=start):
            start["t"] = pc()

        def node_post(grad_inputs, grad_outputs, start=start, shape=shape):
            sums[shape, "bwd"] = sums.get((shape, "bwd"), 0.0) + pc() - start["t"]

        node.register_prehook(node_pre)
        node.register_hook(node_post)

    for m in models.values():
        for layer in m.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                handles += [layer.register_forward_pre_hook(pre),
                            layer.register_forward_hook(post)]
    orders = balanced_orders(list(models))
    t = {k: {} for k in models}
    try:
        for r in range(len(orders) + reps):  # a warm-up round of every order first
            for k in orders[r % len(orders)]:
                m = models[k]
                for p in m.parameters():
                    p.grad = None
                step_sums.clear()
                torch.nn.functional.cross_entropy(m(x), target).backward()
                if r >= len(orders):
                    for key, v in step_sums.items():
                        t[k].setdefault(key, []).append(v)
    finally:
        for h in handles:
            h.remove()
    return t


def in_situ_ratios(t, a, b, shapes) -> dict:
    """Per layer input of bn_in_situ's timings: us per layer of a and b, and the median
    of the per-repetition ratios a / b, for the forward, the backward node and both."""
    out = {}
    for shape, count in shapes:
        res = {"layers": count}
        for d in ("fwd", "bwd", "fwd+bwd"):
            p, q = ([f + g for f, g in zip(t[k][shape, "fwd"], t[k][shape, "bwd"],
                                           strict=True)] if d == "fwd+bwd"
                    else t[k][shape, d] for k in (a, b))
            res[d] = {f"{a}_us": statistics.median(p) * 1e6 / count,
                      f"{b}_us": statistics.median(q) * 1e6 / count,
                      "ratio_paired": statistics.median(
                          u / v for u, v in zip(p, q, strict=True))}
        out[shape] = res
    return out


def resnet18_in_situ(reps, syncbn, torch) -> dict:
    """bn_in_situ over torchvision's ResNet-18 at batch 8, 96 px: its syncbn conversion
    against the plain model, NCHW and channels_last."""
    import copy

    import torchvision

    out = {}
    for fmt_name, fmt in (("NCHW", torch.contiguous_format),
                          ("channels_last", torch.channels_last)):
        torch.manual_seed(0)
        models = {"torch": torchvision.models.resnet18(num_classes=10).to(memory_format=fmt)}
        models["syncbn"] = syncbn.torch.convert_sync_batchnorm(copy.deepcopy(models["torch"]))
        g = torch.Generator().manual_seed(2)
        x = torch.randn(8, 3, 96, 96, generator=g).contiguous(memory_format=fmt)
        target = torch.randint(0, 10, (8,), generator=g)
        t = bn_in_situ(models, x, target, 2 * reps, torch)
        for shape, res in in_situ_ratios(t, "syncbn", "torch", RESNET18_BN).items():
            out[f"{fmt_name} {shape}"] = res
    return out


def resnet18_steps(reps, syncbn, torch) -> dict:
    """A whole training step (forward, backward, SGD) and an eval pass of torchvision's
    ResNet-18 at batch 8, 96 px, converted against plain, NCHW and channels_last. A third
    contender, a deep copy of the plain model (torch's BatchNorm2d too), is the control:
    copy/torch shows how far two identical models differ in this run (memory placement,
    drift), the noise floor of the syncbn/torch ratio."""
    import copy

    import torchvision

    out = {}
    for fmt_name, fmt in (("NCHW", torch.contiguous_format),
                          ("channels_last", torch.channels_last)):
        torch.manual_seed(0)
        plain = torchvision.models.resnet18(num_classes=10).to(memory_format=fmt)
        conv = syncbn.torch.convert_sync_batchnorm(copy.deepcopy(plain))
        twin = copy.deepcopy(plain)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(8, 3, 96, 96, generator=g).contiguous(memory_format=fmt)
        target = torch.randint(0, 10, (8,), generator=g)
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in
                (("syncbn", conv), ("torch", plain), ("torch copy", twin))}

        def step(name, m, x=x, target=target, opts=opts):
            def f():
                m.train()
                opts[name].zero_grad()
                torch.nn.functional.cross_entropy(m(x), target).backward()
                opts[name].step()
            return f

        def evaluate(m, x=x):
            def f():
                m.eval()
                with torch.no_grad():
                    return m(x)
            return f

        res = {}
        for mode, make in (("train step", step), ("eval pass", None)):
            models = {"syncbn": conv, "torch": plain, "torch copy": twin}
            fns = {k: step(k, m) if make else evaluate(m) for k, m in models.items()}
            t, r = measure(fns, reps)
            res[mode] = {"syncbn_ms": r["syncbn"]["median_s"] * 1e3,
                         "torch_ms": r["torch"]["median_s"] * 1e3,
                         "ratio": r["syncbn"]["median_s"] / r["torch"]["median_s"],
                         "ratio_paired": paired_ratio(t, "syncbn", "torch"),
                         "control_ratio_paired": paired_ratio(t, "torch copy", "torch")}
        out[fmt_name] = res
    return out


def report_resnet18(layers, in_situ, steps):
    print("\nResNet-18 (batch 8, 96 px), syncbn.torch.SyncBatchNorm vs torch.nn.BatchNorm2d, "
          "medians in us; ratio = syncbn/torch (paired: median of per-rep ratios)")
    print(f"  {'layer input':31s} {'n':>2s} {'train fwd+bwd':>27s} {'ratio':>6s} {'paired':>6s}"
          f" {'eval fwd':>19s} {'ratio':>6s} {'paired':>6s}")
    for name, r in layers.items():
        a, b = r["train fwd+bwd"], r["eval fwd"]
        print(f"  {name:31s} {r['layers']:2d} {a['syncbn_us']:12.0f} vs {a['torch_us']:9.0f}"
              f" {a['ratio']:6.2f} {a['ratio_paired']:6.2f} {b['syncbn_us']:7.0f} vs "
              f"{b['torch_us']:7.0f} {b['ratio']:6.2f} {b['ratio_paired']:6.2f}")
    print("  in situ (inside whole training steps of the converted and the plain model; us"
          " per layer, paired ratios):")
    print(f"  {'layer input':31s} {'n':>2s} {'fwd':>20s} {'ratio':>6s} {'bwd':>19s}"
          f" {'ratio':>6s} {'fwd+bwd':>6s}")
    for name, r in in_situ.items():
        f, b = r["fwd"], r["bwd"]
        print(f"  {name:31s} {r['layers']:2d} {f['syncbn_us']:8.0f} vs {f['torch_us']:7.0f}"
              f" {f['ratio_paired']:6.2f} {b['syncbn_us']:7.0f} vs {b['torch_us']:7.0f}"
              f" {b['ratio_paired']:6.2f} {r['fwd+bwd']['ratio_paired']:6.2f}")
    print("  whole model (ms):")
    for fmt, r in steps.items():
        for mode, d in r.items():
            print(f"    {fmt:13s} {mode:10s} {d['syncbn_ms']:8.1f} vs {d['torch_ms']:8.1f}"
                  f"  ratio {d['ratio']:.3f} (paired {d['ratio_paired']:.3f}; control: torch"
                  f" copy/torch {d['control_ratio_paired']:.3f})")


# ---- report ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (3 reps)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions after warm-up "
                    "(default 51, --quick 3)")
    ap.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    ap.add_argument("--malloc-keep", action="store_true",
                    help="rerun under glibc settings that keep freed memory (no page faults "
                    "from fresh 25 MB buffers), as bench_cpu.py --malloc-keep")
    ap.add_argument("--resnet18", action="store_true",
                    help="only the ResNet-18 section: every BatchNorm layer (train fwd+bwd, "
                    "eval) in a loop and in situ (inside whole training steps), and whole "
                    "steps against torch (needs torchvision)")
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 51)
    if args.malloc_keep:
        reexec_with_malloc_keep()

    import torch  # first, so its libgomp is the one process-wide OpenMP runtime

    import syncbn
    import syncbn.torch  # noqa: F401

    t_start = time.perf_counter()
    info = syncbn.build_info()
    if torch.get_num_threads() != info["threads"]:
        torch.set_num_threads(info["threads"])
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "syncbn_version": info["version"], "syncbn_threads": info["threads"],
            "reps": reps, "dtype": "float32",
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "argv": sys.argv}
    print(f"syncbn {info['version']} (threads={info['threads']}) vs torch {torch.__version__} "
          f"(threads={torch.get_num_threads()}); {os.cpu_count()} CPUs; {reps} reps after 2 "
          "warm-up calls, contenders interleaved"
          + (f"; {meta['malloc_env']}" if meta["malloc_env"] else ""))

    if args.resnet18:
        with Contention() as load:
            layers = resnet18_layers(reps, syncbn, torch)
            in_situ = resnet18_in_situ(max(6, reps // 4), syncbn, torch)
            # a multiple of the 6 orders of the 3 contenders (bench_cpu.balanced_orders)
            steps = resnet18_steps(max(6, -(-(reps // 2) // 6) * 6), syncbn, torch)
        report_resnet18(layers, in_situ, steps)
        print(f"  during the section: {load}")
        meta["wall_s"] = time.perf_counter() - t_start
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "resnet18_layers": layers, "resnet18_in_situ": in_situ,
                           "resnet18_steps": steps,
                           "contention": load.as_dict()}, f, indent=1)
            print(f"wrote {args.json}")
        return 0

    probe = probe_torch_syncbn(torch)
    print("\ntorch's own SyncBN on CPU:")
    for k, v in probe.items():
        print(f"  {k:42s} {v}")

    cases = {f"NCHW {BIG}": (BIG, torch.contiguous_format),
             f"channels_last {BIG}": (BIG, torch.channels_last),
             f"NCHW {SMALL}": (SMALL, torch.contiguous_format)}
    results, noisy = {}, []
    for name, (shape, fmt) in cases.items():
        with Contention() as load:
            results[name] = run_case(shape, fmt, reps, syncbn, torch)
        results[name]["contention"] = load.as_dict()
        if load.noisy:
            noisy.append(name)

    print("\nper-call time, median (min) over reps, in ms (small case: us); "
          "overhead = adapter/core - 1 (ratio of medians; paired: median of per-rep ratios)")
    print(f"  {'case':31s} {'op':7s} {'torch':>16s} {'core':>16s} {'adapter':>16s} "
          f"{'overhead':>8s} {'paired':>7s} {'adapt/torch':>11s} {'core/torch':>10s}")
    for name, r in results.items():
        unit = 1e6 if r["shape"] == list(SMALL) else 1e3
        for op in ("fwd", "fwd+bwd"):
            d, q = r[op], r[op]["ratios"]
            t = lambda k: f"{d[k]['median_s'] * unit:7.3f} ({d[k]['min_s'] * unit:6.3f})"  # noqa: B023, E731
            print(f"  {name:31s} {op:7s} {t('torch'):>16s} {t('core'):>16s} {t('adapter'):>16s} "
                  f"{q['adapter/core'] - 1:+8.1%} {q['adapter/core_paired'] - 1:+7.1%} "
                  f"{q['adapter/torch']:11.3f} {q['core/torch']:10.3f}")
    print("  absolute adapter overhead (adapter - core, medians): " + "; ".join(
        f"{n.split()[0]}{' small' if r['shape'] == list(SMALL) else ''} {op} "
        f"{r[op]['adapter_overhead_s'] * 1e6:.0f} us"
        for n, r in results.items() for op in ("fwd", "fwd+bwd")))
    # The adapter adds a per-call cost that does not depend on the tensor's size (Python,
    # autograd bookkeeping): measured where it dominates, the small case, it predicts the
    # big case's overhead more precisely than the big case's own noisy ratio.
    small, big = results[f"NCHW {SMALL}"], results[f"NCHW {BIG}"]
    fixed = {op: {"adapter_minus_core_s": small[op]["adapter_overhead_s"],
                  "fraction_of_big_core": small[op]["adapter_overhead_s"]
                  / big[op]["core"]["median_s"]} for op in ("fwd", "fwd+bwd")}
    print("  fixed per-call cost of the adapter (small case, adapter - core): " + "; ".join(
        f"{op} {d['adapter_minus_core_s'] * 1e6:.0f} us = {d['fraction_of_big_core']:.1%} of "
        f"the big NCHW core time" for op, d in fixed.items()))
    print("  during the cases: " + "; ".join(
        f"{n.split()[0]}{' small' if r['shape'] == list(SMALL) else ''} "
        f"{r['contention']['others_cpu_fraction']:.0%} other CPU use, "
        f"{r['contention']['steal_fraction']:.0%} steal" for n, r in results.items()))
    print("  minor page faults per call, median, torch/core/adapter: " + "; ".join(
        f"{n.split()[0]} {op} " + "/".join(
            f"{r[op][k]['page_faults_per_call_median']:.0f}" for k in ("torch", "core", "adapter"))
        for n, r in results.items() if r["shape"] == list(BIG) for op in ("fwd", "fwd+bwd")))
    print("  agreement, max abs diff adapter vs torch (y, dx): " + "; ".join(
        f"{n.split()[0]} {r['agree']['adapter_vs_torch']['y']:.1e}, "
        f"{r['agree']['adapter_vs_torch']['dx']:.1e}" for n, r in results.items())
        + "; adapter vs core: " + ", ".join(
        f"{max(r['agree']['adapter_vs_core'].values()):.1e}" for r in results.values())
        + "; layout kept: " + str(all(r["agree"]["layout_kept"] for r in results.values())))

    targets = []
    print("\ntargets")
    for name, r in results.items():
        if r["shape"] != list(BIG):
            continue
        for op in ("fwd", "fwd+bwd"):
            v = r[op]["ratios"]["adapter/core"] - 1
            ok = v <= TARGET_ADAPTER_OVERHEAD
            targets.append({"target": f"adapter overhead over core, {name} {op}", "value": v,
                            "goal": f"<= {TARGET_ADAPTER_OVERHEAD:.0%}", "status": mark(ok)})
            print(f"  {mark(ok)}  adapter overhead over core, {name.split()[0]:13s} {op:7s} "
                  f"{v:+7.1%}   target <= {TARGET_ADAPTER_OVERHEAD:.0%}")
    if noisy:
        print(f"  WARNING: other processes used > 10% of the CPUs during: {', '.join(noisy)}; "
              "those figures are unreliable, run again on a quiet machine")
    meta["noisy_sections"] = noisy
    meta["wall_s"] = time.perf_counter() - t_start
    print(f"\n(total {meta['wall_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "torch_syncbn_on_cpu": probe, "cases": results,
                       "adapter_fixed_cost": fixed, "targets": targets}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
