"""zspa_kernels.builder, the on-demand build of ``csrc/`` (no GPU needed): compile, cache, lock,
fallbacks, CMake, and no process-wide side effects.

Compiling needs a CUDA build of torch and an nvcc toolkit; CI has both (SPEC §6).
The real compiles (one with torch's ninja driver, one with CMake) run once per session
for a single architecture to keep CI short; the other tests reuse them.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

import zspa_kernels
from zspa_kernels import builder, cuda_ext
from zspa_kernels.builder import CUDA_EXTENSION, cache, extension, toolkit

REPO = Path(zspa_kernels.__file__).resolve().parent.parent
TEST_ARCH = "8.0"  # one architecture: a CI compile costs minutes per architecture
needs_toolkit = pytest.mark.skipif(
    not torch.version.cuda or builder.find_cuda_home() is None,
    reason="needs a CUDA build of torch and an nvcc toolkit",
)


def _env(cache: Path, **extra: str) -> dict:
    env = dict(os.environ, ZSPA_CACHE_DIR=str(cache), TORCH_CUDA_ARCH_LIST=TEST_ARCH,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("MAX_JOBS", "2")
    env.update(extra)
    return env


def _zspa(*args: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zspa_kernels.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def _leave_stale_locks(directory: Path, env: dict) -> None:
    """What a build killed mid-way leaves: our lock taken by a dead process, torch's lock file."""
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom zspa_kernels.builder.cache import build_lock\n"
            "with build_lock(Path(sys.argv[1])):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(directory)], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    (directory / "lock").write_text("")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two ``zspa build`` started together into a cache folder holding a killed build's locks."""
    cache = tmp_path_factory.mktemp("zspa-cache") / "cache"
    env = _env(cache)
    directory = cache / extension.cache_key(CUDA_EXTENSION, [TEST_ARCH])
    _leave_stale_locks(directory, env)
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "zspa_kernels.cli", "build"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=1200) + (p.returncode,) for p in procs]
    return {"env": env, "dir": directory, "results": results, "seconds": time.monotonic() - start}


@needs_toolkit
def test_concurrent_builds_compile_once_and_both_load(built):
    for out, err, rc in built["results"]:
        assert rc == 0, err
        assert "zspa::select_tokens_cuda ready" in out
    stderr = [err for _, err, _ in built["results"]]
    assert sum("compiling the CUDA kernels" in err for err in stderr) == 1, stderr
    assert sum("waiting for another process" in err for err in stderr) == 1, stderr
    message = next(line for err in stderr for line in err.splitlines() if "compiling the CUDA kernels" in line)
    assert " ... done in " in message, message  # one line, with its duration
    assert extension.library_path(CUDA_EXTENSION, built["dir"]).is_file()


@needs_toolkit
def test_second_build_is_a_cache_hit(built):
    start = time.monotonic()
    result = _zspa("build", env=built["env"])
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "compiling" not in result.stderr
    assert elapsed < min(30.0, built["seconds"] / 3), f"cache hit took {elapsed:.1f} s"


@needs_toolkit
def test_library_registers_cuda_and_meta_kernels(built):
    code = """
import torch, zspa_kernels
from zspa_kernels import builder
builder.load()
for key in ("CUDA", "Meta"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("zspa::select_tokens_cuda", key), key
visual = torch.empty(3, 10, 8, device="meta", dtype=torch.bfloat16)
prompt = torch.empty(3, 5, 8, device="meta", dtype=torch.bfloat16)
out = torch.ops.zspa.select_tokens_cuda(visual, prompt, 4, 0.5, None, None, "max", True)
assert out.shape == (3, 4) and out.dtype == torch.int64, out
print(builder.status())
"""
    result = _python(code, built["env"])
    assert result.returncode == 0, result.stderr
    assert "compiled (" in result.stdout


@needs_toolkit
def test_info_reports_the_compiled_extension(built, tmp_path):
    assert "cuda        compiled (" in _zspa("info", env=built["env"]).stdout
    fresh = _zspa("info", env=_env(tmp_path / "empty-cache")).stdout
    assert "cuda        not compiled yet" in fresh


@needs_toolkit
def test_read_only_cache_holding_the_library_is_used_as_is(built, monkeypatch, capsys):
    monkeypatch.setenv("ZSPA_CACHE_DIR", built["env"]["ZSPA_CACHE_DIR"])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", TEST_ARCH)
    monkeypatch.setattr(cache, "_writable_dir", lambda path: False)  # as if mounted read-only
    assert builder.build() == extension.library_path(CUDA_EXTENSION, built["dir"])
    assert capsys.readouterr().err == ""


def test_lock_left_by_a_killed_build_is_free(tmp_path):
    env = _env(tmp_path)
    _leave_stale_locks(tmp_path, env)
    start = time.monotonic()
    with cache.build_lock(tmp_path, timeout=10):
        pass
    assert time.monotonic() - start < 5


def test_lock_excludes_a_live_holder(tmp_path):
    with cache.build_lock(tmp_path):
        code = ("import sys\nfrom pathlib import Path\nfrom zspa_kernels.builder import BuildFailed, cache\n"
                "try:\n    cache.build_lock(Path(sys.argv[1]), timeout=1).__enter__()\n"
                "except BuildFailed as exc:\n    print(exc)\n")
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=_env(tmp_path),
                                capture_output=True, text=True, timeout=300)
    assert "timed out after 1 s waiting for the build lock" in result.stdout, result.stderr
    assert "waiting for another process" in result.stderr


@pytest.mark.parametrize("blocker", ["file-in-path", "read-only"])
def test_unwritable_cache_folder_falls_back_to_temp(blocker, tmp_path, monkeypatch, capsys):
    if blocker == "file-in-path":
        (tmp_path / "file").write_text("")
        configured = tmp_path / "file" / "cache"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        configured = tmp_path / "ro"
        configured.mkdir(mode=0o555)
    monkeypatch.setenv("ZSPA_CACHE_DIR", str(configured))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    root = cache.cache_root()
    assert root == tmp_path / "tmp" / f"zspa_kernels-{os.getuid()}" and root.is_dir()
    assert "is not writable" in capsys.readouterr().err


def test_missing_toolkit_warns_once_and_build_exits_nonzero(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    monkeypatch.setattr(cuda_ext, "_fallback_reason", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cuda_ext.extension_available()
        assert not cuda_ext.extension_available()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "using backend 'triton' instead" in messages[0], messages
    result = _zspa("build", env=_env(tmp_path, CUDA_HOME=str(tmp_path / "no-toolkit")))
    assert result.returncode == 1
    assert "zspa build: cannot build the CUDA extension: no CUDA toolkit found" in result.stderr


@needs_toolkit
def test_toolkit_is_found_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    real = builder.find_cuda_home()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{real}/bin/nvcc" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    host_compiler = shutil.which("c++") or shutil.which("gcc")  # nvcc needs one, even for --dryrun
    monkeypatch.setenv("PATH", os.pathsep.join([str(wrapper.parent), os.path.dirname(host_compiler or "")]))
    assert shutil.which("nvcc") == str(wrapper)
    assert builder.find_cuda_home() == Path(os.path.realpath(real))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # CUDA_HOME set to the wrapper's folder
    assert builder.find_cuda_home() == Path(os.path.realpath(real))


def test_arch_list_and_gencode_flags(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 9.0+PTX")
    archs = builder.arch_list()
    assert builder.gencode_flags(archs) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert extension.cache_key(CUDA_EXTENSION, archs).endswith("-sm80-sm90a-sm90ptx")
    assert f"torch{torch.__version__}-cuda{torch.version.cuda}" in extension.cache_key(CUDA_EXTENSION, archs)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(builder.BuildFailed, match="TORCH_CUDA_ARCH_LIST"):
        builder.arch_list()


def test_every_translation_unit_is_in_the_shared_source_list():
    listed = {p.name for p in CUDA_EXTENSION.source_files()}
    on_disk = {p.name for p in CUDA_EXTENSION.source_dir().iterdir() if p.suffix in (".cu", ".cpp")}
    assert listed == on_disk


def test_wheel_ships_the_sources(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, ZSPA_BUILD_EXT="0"))
    assert result.returncode == 0, result.stderr
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    for source in ["sources.txt", *(p.name for p in CUDA_EXTENSION.source_files())]:
        assert f"zspa_kernels/csrc/{source}" in names, names


@needs_toolkit
@pytest.mark.skipif(shutil.which("cmake") is None or toolkit.ninja_path() is None, reason="needs cmake and ninja")
def test_cmake_builds_the_same_sources(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=TEST_ARCH)
    configure = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-G", "Ninja",
                                f"-DCMAKE_MAKE_PROGRAM={toolkit.ninja_path()}", *builder.cmake_args()],
                               env=env, capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run(["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")],
                              env=env, capture_output=True, text=True, timeout=1200)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    code = (f"import torch\ntorch.ops.load_library({str(build / 'zspa_cuda.so')!r})\n"
            "assert torch._C._dispatch_has_kernel_for_dispatch_key('zspa::select_tokens_cuda', 'CUDA')\n")
    loaded = _python(code, dict(os.environ))
    assert loaded.returncode == 0, loaded.stderr


def test_a_build_leaves_path_and_torch_cuda_home_as_they_were(tmp_path, monkeypatch):
    """The compile sees ninja on PATH and the toolkit as torch's CUDA_HOME; nothing outlives it."""
    from torch.utils import cpp_extension

    seen = {}

    def fake_load(**kwargs):
        seen.update(path=os.environ["PATH"], cuda_home=cpp_extension.CUDA_HOME, kwargs=kwargs)
        extension.library_path(CUDA_EXTENSION, Path(kwargs["build_directory"])).write_text("")

    monkeypatch.setenv("ZSPA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", TEST_ARCH)
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(toolkit, "ninja_path", lambda: str(tmp_path / "tools" / "ninja"))
    monkeypatch.setattr(extension, "ninja_path", lambda: str(tmp_path / "tools" / "ninja"))
    home = tmp_path / "toolkit"
    monkeypatch.setattr(extension, "require_cuda_home", lambda: home)
    path_before, home_before = os.environ.get("PATH"), cpp_extension.CUDA_HOME
    builder.build(force=True)
    assert seen["path"].split(os.pathsep)[0] == str(tmp_path / "tools") and seen["cuda_home"] == str(home)
    assert seen["kwargs"]["with_cuda"] and "-gencode=arch=compute_80,code=sm_80" in seen["kwargs"]["extra_cuda_cflags"]
    assert os.environ.get("PATH") == path_before and cpp_extension.CUDA_HOME == home_before


def _headers(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"// {folder.name}/{name}\n")
    return folder


@pytest.mark.parametrize("layout", ["cuda13", "cuda12"])
def test_wheel_headers_never_shadow_the_toolkits(tmp_path, monkeypatch, layout):
    """Only what the toolkit lacks comes from the pip wheels: their copy of the runtime's
    headers (another minor version, say) must not reach nvcc before the toolkit's own."""
    monkeypatch.setenv("ZSPA_CACHE_DIR", str(tmp_path / "cache"))
    home = tmp_path / "toolkit"
    _headers(home / "include", "cuda_runtime_api.h", "crt/host_defines.h")
    root = tmp_path / "site" / "nvidia"
    if layout == "cuda13":  # one folder for every library, the runtime's headers included
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        _headers(root / "cu13" / "include", "cuda_runtime_api.h", "crt/host_defines.h", "cublas_v2.h", "cusparse.h")
    else:  # a folder per library
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        _headers(root / "cuda_runtime" / "include", "cuda_runtime_api.h", "crt/host_defines.h")
        _headers(root / "cublas" / "include", "cublas_v2.h")
        _headers(root / "cusparse" / "include", "cusparse.h")
    monkeypatch.setattr(toolkit, "_nvidia_roots", lambda: [root])

    [shim] = toolkit.library_headers(home)
    assert sorted(p.name for p in Path(shim).iterdir()) == ["cublas_v2.h", "cusparse.h"]
    assert (Path(shim) / "cublas_v2.h").resolve().parent.parent.parent == root.resolve()
    assert toolkit.library_headers(home) == [shim]  # made once, then reused
    _headers(home / "include", "cublas_v2.h", "cusparse.h")  # a full toolkit: nothing from the wheels
    assert toolkit.library_headers(home) == []


CPU_SOURCE = """
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor plus_one(const at::Tensor& x) { return x + 1; }
TORCH_LIBRARY_FRAGMENT(zspa_builder_test, m) { m.def("plus_one(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(zspa_builder_test, CPU, m) { m.impl("plus_one", &plus_one); }
"""


@pytest.mark.skipif(toolkit.ninja_path() is None, reason="needs ninja")
def test_a_cpu_extension_builds_and_loads_without_any_cuda(tmp_path):
    """The same machinery with another source list and no CUDA: no toolkit, no CUDA flags."""
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "sources.txt").write_text("plus_one.cpp\n")
    (tmp_path / "csrc" / "cpu" / "plus_one.cpp").write_text(CPU_SOURCE)
    code = ("import sys, torch\nfrom pathlib import Path\nfrom zspa_kernels import builder\n"
            "ext = builder.Extension('zspa_builder_test', 'cpu/sources.txt', cuda=False, csrc=Path(sys.argv[1]))\n"
            "builder.load(ext)\nprint(torch.ops.zspa_builder_test.plus_one(torch.ones(2)).tolist())\n")
    env = _env(tmp_path / "cache", CUDA_HOME=str(tmp_path / "no-toolkit"), TORCH_CUDA_ARCH_LIST="not-an-arch")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "csrc")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[2.0, 2.0]"
    assert "zspa: compiling the zspa_builder_test kernels" in done.stderr
    assert list((tmp_path / "cache").glob("zspa_builder_test-*-cpu/zspa_builder_test.so"))
