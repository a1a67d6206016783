"""Copies core/src/cuda into $EMU_OUT/src/cuda with every kernel<<<cfg>>>(args) launch
turned into ::emu::launch(cfg, [&] { kernel(args); }) and *.cu renamed *.cpp, so g++ can
build and run them: the kernels (build_emu.sh) and ops.cu, the orchestration, whose CUDA
runtime calls the shim emulates too (build_emu_ops.sh). The headers they include from
core/src (dispatch.h, layout.h, collective.h) are copied beside."""
import os
import shutil

src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "core", "src")
out = os.environ.get("EMU_OUT", "/tmp/syncbn_emu") + "/src"
os.makedirs(out + "/cuda", exist_ok=True)
for h in ("dispatch.h", "layout.h", "collective.h"):
    shutil.copy(src + "/" + h, out + "/" + h)

def kernel_start(s, i):
    # scan back from i (the '<<<') over whitespace, then over a name with <...> args
    j = i
    while s[j - 1].isspace():
        j -= 1
    if s[j - 1] == ">":
        depth = 0
        while True:
            j -= 1
            if s[j] == ">":
                depth += 1
            elif s[j] == "<":
                depth -= 1
                if depth == 0:
                    break
    while s[j - 1].isalnum() or s[j - 1] in "_:":
        j -= 1
    return j

def rewrite(s):
    while "<<<" in s:
        i = s.index("<<<")
        k0 = kernel_start(s, i)
        kern = s[k0:i].strip()
        e = s.index(">>>", i)
        cfg = s[i + 3:e]
        a = s.index("(", e)
        depth, b = 0, a
        while True:
            if s[b] == "(":
                depth += 1
            elif s[b] == ")":
                depth -= 1
                if depth == 0:
                    break
            b += 1
        args = s[a + 1:b]
        s = s[:k0] + "::emu::launch(" + cfg + ", [&] { " + kern + "(" + args + "); })" + s[b + 1:]
    return s

for f in sorted(os.listdir(src + "/cuda")):
    t = open(os.path.join(src, "cuda", f)).read()
    t = rewrite(t)
    # Cap grids so grid-stride loops take several steps in the tests.
    t = t.replace(", kMaxGridX)", ", int64_t(EMU_GRID_CAP))")
    t = t.replace(", detail::kMaxGridX)", ", int64_t(EMU_GRID_CAP))")
    t = t.replace("int64_t(4096)", "int64_t(EMU_GRID_CAP)")
    name = f[:-3] + ".cpp" if f.endswith(".cu") else f
    open(os.path.join(out, "cuda", name), "w").write(t)
print("ok")
