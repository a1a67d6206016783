"""One process of tests/test_torch_eager_node.py: syncbn.torch's eager training path on a
set of layer configurations, saved to OUT (torch.save). Run once with the C++ autograd node
and once with SYNCBN_TORCH_EAGER=python; the two must agree bit for bit (both call the same
core with the same arrays).

    python torch_eager_paths.py OUT
"""

import sys

import torch

import syncbn.torch as sbt

CASES = {
    # name: (input shape, dtype, module kwargs, channels_last)
    "nchw_f32": ((4, 3, 5, 6), torch.float32, {}, False),
    "channels_last_f32": ((4, 3, 5, 6), torch.float32, {}, True),
    "bn1d_f64": ((7, 5), torch.float64, {}, False),
    "bn3d_f32_momentum_none": ((2, 3, 2, 3, 4), torch.float32, {"momentum": None}, False),
    "no_affine": ((4, 3, 5), torch.float32, {"affine": False}, False),
    "no_bias": ((4, 3, 5), torch.float32, {"bias": False}, False),
    "no_running_stats": ((4, 3, 5), torch.float32, {"track_running_stats": False}, False),
    "bf16_input": ((6, 3, 8), torch.bfloat16, {}, False),
    "empty": ((0, 3, 4), torch.float32, {}, False),
}


def run():
    out = {"native": sbt._native is not None}
    for name, (shape, dtype, kw, cl) in CASES.items():
        g = torch.Generator().manual_seed(len(name))
        m = sbt.SyncBatchNorm(shape[1], **kw)
        if m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5, generator=g)
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
            dy = dy.contiguous(memory_format=torch.channels_last)
        res = {}
        for step in range(2):
            xs = x.clone().requires_grad_()
            y = m(xs)
            y.backward(dy)
            res[f"y{step}"] = y.detach()
            res[f"dx{step}"] = xs.grad
            res[f"cl{step}"] = y.is_contiguous(memory_format=torch.channels_last)
            res[f"grad_fn{step}"] = y.grad_fn.name()
            for p in ("weight", "bias"):
                t = getattr(m, p)
                if t is not None:
                    res[f"d{p}{step}"] = t.grad.clone()
                    t.grad = None
        res["state"] = {k: v.clone() for k, v in m.state_dict().items()}
        out[name] = res
    return out


if __name__ == "__main__":
    torch.save(run(), sys.argv[1])
