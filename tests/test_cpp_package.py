"""The C++ package: `cmake --install` and the pip-installed package (`python -m syncbn
--cmake-dir`) give C++ users headers, the core library and syncbnConfig.cmake; the C++
examples (examples/cpp) and unit test (tests/cpp) build against both as a consumer would,
train like one process on the whole batch, and run clean under ASan+UBSan; the one-command
GPU install builds the CUDA module with NCCL.

Builds are shared: one `cmake --install` prefix (built with ASan+UBSan in its own build
directory) and one consumer build per package location, made once per session."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, mpiexec_path

JOBS = "2"
SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}

CMAKE = shutil.which("cmake") or "cmake"
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake on PATH")


def run(cmd, *, timeout, env=None, cwd=None, check=True) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=e,
                          cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout ---\n"
                    f"{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def mpirun(n: int, exe, *args, env=None, timeout: int = 120) -> subprocess.CompletedProcess:
    e = {"MPIEXEC_TIMEOUT": str(timeout), **(env or {})}
    return run([mpiexec_path(), "-n", n, exe, *args], env=e, timeout=timeout + 30, check=False)


def differences(out: str) -> dict[str, float]:
    """The examples' `max |<what> - <reference>| = <x>` lines, by <what>."""
    return {m[1]: float(m[2]) for m in re.finditer(r"max \|(.+?) - .+?\| = (\S+)", out)}


def assert_trains_like_one_process(proc: subprocess.CompletedProcess, contrast=True):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK" in proc.stdout, out
    d = differences(proc.stdout)
    assert d["SyncBN"] < 1e-10, out
    if contrast:  # the same check tells data parallelism without SyncBN apart
        assert d["per-rank BN"] > 1e-3, out


def consumer(build: Path, cmake_args: list[str], env=None) -> Path:
    """Configures and builds tests/cpp (the unit test and the examples) as a consumer."""
    run([CMAKE, "-S", ROOT / "tests" / "cpp", "-B", build, *cmake_args], timeout=300, env=env)
    run([CMAKE, "--build", build, "-j", JOBS], timeout=900, env=env)
    return build


# ---- the package locations -----------------------------------------------------------------


@pytest.fixture(scope="session")
def install_prefix(tmp_path_factory) -> Path:
    """`cmake -S . -B build && cmake --build build && cmake --install build --prefix P`, no
    Python involved; built with ASan+UBSan (a build directory of its own) so that what is
    built against it runs under the sanitizers. MPI: the mpich wheel of this environment."""
    tmp = tmp_path_factory.mktemp("cmake_install")
    build, prefix = tmp / "build", tmp / "prefix"
    run([CMAKE, "-S", ROOT, "-B", build, "-DSYNCBN_WITH_CUDA=OFF", f"-DMPI_HOME={sys.prefix}",
         "-DCMAKE_BUILD_TYPE=Debug", f"-DCMAKE_CXX_FLAGS={SANITIZE}"], timeout=300)
    run([CMAKE, "--build", build, "-j", JOBS], timeout=900)
    run([CMAKE, "--install", build, "--prefix", prefix], timeout=120)
    return prefix


@pytest.fixture(scope="session")
def install_build(install_prefix, tmp_path_factory) -> Path:
    return consumer(tmp_path_factory.mktemp("consumer_install") / "build",
                    [f"-DCMAKE_PREFIX_PATH={install_prefix}", f"-DCMAKE_CXX_FLAGS={SANITIZE}",
                     f"-DCMAKE_EXE_LINKER_FLAGS={SANITIZE}"])


@pytest.fixture(scope="session")
def pip_cmake_dir() -> Path:
    out = run([sys.executable, "-m", "syncbn", "--cmake-dir"], timeout=60, cwd=ROOT).stdout
    return Path(out.strip())


@pytest.fixture(scope="session")
def pip_build(pip_cmake_dir, tmp_path_factory) -> Path:
    """Against the pip-installed package, with the libtorch example (torch's CMake package
    from the torch wheel). No MPI hint: the package's config finds the mpich wheel itself."""
    torch = pytest.importorskip("torch")
    env = {"PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                   if Path(p).resolve() != Path(sys.prefix, "bin").resolve())}
    return consumer(tmp_path_factory.mktemp("consumer_pip") / "build",
                    [f"-Dsyncbn_DIR={pip_cmake_dir}", "-DSYNCBN_EXAMPLES_LIBTORCH=ON",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                     *torch_cuda_hints(torch)], env=env)


def torch_cuda_hints(torch):
    """A CUDA build of torch (the wheel the timm tests need) makes Torch's CMake package
    find the CUDA toolkit (FindCUDA) and NVRTC again: the toolkit of the nvcc on PATH, and
    the NVRTC of the nvidia wheels beside torch."""
    if not torch.version.cuda:
        return []
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.fail("this torch is a CUDA build: its CMake package needs a CUDA toolkit (nvcc "
                    "on PATH) to configure the libtorch example")
    # nvcc (or a wrapper standing in for it) does not print its toolkit's path: try the
    # folder above its bin/, then the usual place.
    root = Path(nvcc).resolve().parent.parent
    for cand in (root, Path("/usr/local/cuda")):
        if (cand / "include" / "cuda_runtime.h").exists():
            root = cand
            break
    hints = [f"-DCUDA_TOOLKIT_ROOT_DIR={root}"]
    site = Path(torch.__file__).resolve().parent.parent
    nvrtc = sorted(site.glob("nvidia/*/lib/libnvrtc.so*")) + sorted(
        site.glob("nvidia/cuda_nvrtc/lib/libnvrtc.so*"))
    nvrtc = [p for p in nvrtc if "builtins" not in p.name and ".alt." not in p.name]
    if nvrtc:
        hints.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return hints


# ---- what the packages hold ------------------------------------------------------------------

PUBLIC = {"build_config.h", "communicator.h", "dlpack.h", "errors.h", "ops.h", "tensor.h",
          "mpi_communicator.h"}
INTERNAL = {"math.h", "device_backend.h"}


def test_cmake_install_has_public_headers_static_library_and_config(install_prefix):
    headers = {p.name for p in (install_prefix / "include" / "syncbn").iterdir()}
    assert PUBLIC <= headers and not headers & INTERNAL, headers
    assert (install_prefix / "lib" / "libsyncbn_core.a").is_file()
    cmake = install_prefix / "lib" / "cmake" / "syncbn"
    for f in ("syncbnConfig.cmake", "syncbnConfigVersion.cmake", "syncbnTargets.cmake"):
        assert (cmake / f).is_file(), f
    assert not (install_prefix / "lib" / "libsyncbn_cuda.a").exists()  # CUDA OFF


def test_static_core_links_into_a_shared_library(built):
    """Position independent: tests/cpp links the ops into a shared library."""
    assert (built / "libsyncbn_in_a_shared_library.so").is_file()


def test_pip_package_carries_the_cpp_package_and_says_where(pip_cmake_dir):
    assert (pip_cmake_dir / "syncbnConfig.cmake").is_file()
    pkg = pip_cmake_dir.parent
    headers = {p.name for p in (pkg / "include" / "syncbn").iterdir()}
    assert PUBLIC <= headers and not headers & INTERNAL, headers
    assert (pkg / "lib" / "libsyncbn_core.a").is_file()
    # The files sit beside the compiled module, also in an editable install (where
    # syncbn.__file__ is the source folder).
    import syncbn

    assert Path(syncbn._core.__file__).parent == pkg
    out = run([sys.executable, "-m", "syncbn", "--include-dir"], timeout=60).stdout.strip()
    assert Path(out) == pkg / "include"
    if syncbn.build_info()["cuda"]:
        assert (pkg / "lib" / "libsyncbn_cuda.a").is_file()
        assert (pip_cmake_dir / "syncbnCudaTargets.cmake").is_file()


def test_config_version_and_components_are_checked(install_prefix, tmp_path):
    """find_package(syncbn 0.2) refuses 0.1 (0.x minors may break the API; 0.1 is accepted by
    every consumer build here); asking for the cuda component of a build without CUDA fails
    saying so."""
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(p LANGUAGES CXX)\n"
        "find_package(syncbn ${WANT} CONFIG REQUIRED ${COMPONENTS})\n")
    base = [CMAKE, "-S", tmp_path, f"-DCMAKE_PREFIX_PATH={install_prefix}"]
    old = run([*base, "-B", tmp_path / "b2", "-DWANT=0.2"], timeout=120, check=False)
    assert old.returncode != 0 and "0.1.0" in old.stderr, old.stderr
    cuda = run([*base, "-B", tmp_path / "b3", "-DWANT=0.1", "-DCOMPONENTS=COMPONENTS;cuda"],
               timeout=120, check=False)
    assert cuda.returncode != 0 and "built without CUDA" in cuda.stderr, cuda.stderr


# ---- the examples and the unit test, against both --------------------------------------------


@pytest.fixture(params=["cmake-install", "pip"])
def built(request) -> Path:
    name = {"cmake-install": "install_build", "pip": "pip_build"}[request.param]
    return request.getfixturevalue(name)


@pytest.mark.parametrize("nranks", [2, 3])
def test_mlp_mpi_trains_like_one_process(built, nranks):
    assert_trains_like_one_process(mpirun(nranks, built / "examples" / "mlp_mpi", env=SAN_ENV))


@pytest.mark.parametrize("nranks", [2, 3])
def test_custom_communicator_trains_like_one_process(built, nranks):
    proc = run([built / "examples" / "custom_communicator", nranks], timeout=120, env=SAN_ENV,
               check=False)
    assert_trains_like_one_process(proc)


def test_cpp_unit_test_passes(built):
    proc = run([built / "test_core"], timeout=120, env=SAN_ENV, check=False)
    assert proc.returncode == 0 and ", 0 failures" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("nranks", [2, 3])
def test_libtorch_example_equals_batchnorm2d_on_the_whole_batch(pip_build, nranks):
    proc = mpirun(nranks, pip_build / "examples" / "libtorch_syncbn", timeout=180)
    assert_trains_like_one_process(proc)


def test_sanitizers_are_on_in_the_install_build(install_build):
    """The cmake-install runs above are the ASan+UBSan runs: check the binaries carry them."""
    for exe in ("test_core", "examples/mlp_mpi", "examples/custom_communicator"):
        syms = run(["nm", "-D", "--undefined-only", install_build / exe], timeout=60).stdout
        assert "__asan_init" in syms and "__ubsan_handle" in syms, exe


# ---- errors and the one-command GPU install ------------------------------------------------


def test_nccl_asked_for_and_not_buildable_fails_the_configure(tmp_path):
    """SYNCBN_WITH_NCCL=ON never quietly builds without NCCL."""
    base = [CMAKE, "-S", ROOT, "-DSYNCBN_WITH_MPI=OFF", "-DSYNCBN_WITH_NCCL=ON"]
    no_cuda = run([*base, "-B", tmp_path / "a", "-DSYNCBN_WITH_CUDA=OFF"], timeout=120,
                  check=False)
    assert no_cuda.returncode != 0 and "SYNCBN_WITH_NCCL=ON needs the CUDA module" in \
        no_cuda.stderr, no_cuda.stderr
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the NCCL-not-found half needs a CUDA build")
    missing = run([*base, "-B", tmp_path / "b", "-DSYNCBN_WITH_CUDA=ON",
                   f"-DNCCL_ROOT={tmp_path / 'nowhere'}", "-DCMAKE_CUDA_ARCHITECTURES=80"],
                  timeout=300, check=False)
    assert missing.returncode != 0, missing.stdout
    if "SYNCBN_WITH_NCCL=ON but NCCL was not found" not in missing.stderr:
        pytest.fail(missing.stderr)


def copy_checkout(dst: Path):
    """The working tree as git sees it (tracked and untracked, not ignored), or a plain copy."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                               capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "__pycache__", "*.so", ".pytest_cache"))
        return
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
@pytest.mark.timeout(1500)
def test_one_command_gpu_install_builds_cuda_with_nccl_from_a_comma_path(tmp_path):
    """README's GPU command, `SYNCBN_WITH_NCCL=ON pip install -e '.[cuda]'`, in a fresh venv
    and pip's default isolated build: the CUDA module comes with NCCL. The checkout sits in
    a folder whose name has a comma and a space (nvcc splits -I values at commas). Then a
    C++ consumer finds syncbn::cuda (and NCCL) in the installed package, links and runs.

    For speed only: one CUDA architecture (CUDAARCHS=80; the default builds 80 and 90), and
    the wheels come from a wheelhouse filled once, so the 300 MB NCCL wheel is downloaded
    once for the build environment and the install."""
    src = tmp_path / "a,b c" / "syncbn"
    src.mkdir(parents=True)
    copy_checkout(src)
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d",
         wheels, "scikit-build-core>=0.11", "nanobind>=2.4", "mpich", "nvidia-nccl-cu13",
         "numpy>=1.24", "mpi4py>=4.1", "ninja"], timeout=900)
    # The venv lies outside the comma folder: FindMPI and rpath flags (-Wl,-rpath,a,b) cannot
    # take commas or spaces in the paths of the libraries a C++ consumer links.
    run([sys.executable, "-m", "venv", tmp_path / "venv"], timeout=120)
    py = tmp_path / "venv" / "bin" / "python"
    env = {"SYNCBN_WITH_NCCL": "ON", "CUDAARCHS": "80", "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(wheels)}
    run([py, "-m", "pip", "install", "--disable-pip-version-check", "-e", ".[cuda]"], cwd=src,
        env=env, timeout=1200)

    code = "import json, syncbn; print(json.dumps(syncbn.build_info()))"
    info = json.loads(run([py, "-c", code], timeout=120, cwd=tmp_path).stdout)
    assert info["cuda"] and info["nccl"] and info["nccl_version"], info
    cuda_so = next((tmp_path / "venv").glob("lib/python*/site-packages/syncbn/_cuda*.so"))
    dyn = run(["readelf", "-d", cuda_so], timeout=60).stdout
    assert "libnccl.so.2" in dyn and "pip-build-env" not in dyn, dyn  # NCCL of the venv

    # C++: find_package(syncbn COMPONENTS cuda) in a C++-only project, link, run.
    app = tmp_path / "app"
    app.mkdir()
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(app LANGUAGES CXX)\n"
        "find_package(syncbn 0.1 CONFIG REQUIRED COMPONENTS cuda)\n"
        "add_executable(app app.cpp)\ntarget_link_libraries(app PRIVATE syncbn::cuda)\n")
    (app / "app.cpp").write_text(
        '#include <cstdio>\n#include "syncbn/cuda_backend.h"\n'
        '#include "syncbn/nccl_communicator.h"\n'
        "int main() {\n  syncbn::register_cuda_backend();\n"
        '  std::printf("nccl %s\\n", syncbn::nccl_version().c_str());\n}\n')
    cmake_dir = run([py, "-m", "syncbn", "--cmake-dir"], timeout=60, cwd=tmp_path).stdout.strip()
    run([CMAKE, "-S", app, "-B", app / "build", f"-Dsyncbn_DIR={cmake_dir}"], timeout=300)
    run([CMAKE, "--build", app / "build"], timeout=300)
    out = run([app / "build" / "app"], timeout=60).stdout
    assert out.strip() == f"nccl {info['nccl_version']}", out
