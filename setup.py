"""Build and install tec_fast.

The pure-Python package ``tec_fast`` and the Triton kernels in ``kernels/`` (installed as
``tec_fast.kernels``) always install. The C++ extension (``csrc/``) builds with ninja through
``torch.utils.cpp_extension``; the CUDA part only where torch has CUDA and nvcc exists, or with
FORCE_CUDA=1. Install with ``pip install --no-build-isolation -e .``: torch must already be
installed, because the extension is compiled against it (``pyproject.toml`` does not list torch,
so an isolated build would not see it).

A CPU extension that cannot build fails the install with the compiler's message. To install
without it (the package then runs its plain-torch packing kernels, and ``python -m
tec_fast.info`` and a one-time warning say so), set TEC_FAST_NO_EXT_BUILD=1. A CUDA part that
cannot build is left out with a warning (and the reason in the build record), unless
FORCE_CUDA=1 asked for it.

Build knobs (environment): MAX_JOBS (parallel compile jobs, read by ninja through torch),
TORCH_CUDA_ARCH_LIST (e.g. "9.0"; default: the visible GPUs' archs), FORCE_CUDA=1 (build the CUDA
part without a GPU or a CUDA torch check), TEC_FAST_NO_EXT_BUILD=1 (skip the extension).
What was built is recorded in ``tec_fast/_build_info.json``.
"""
import json
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/packing_cpu.cpp", f"{CSRC}/plan_bins.cpp"]
CUDA_SOURCES = [f"{CSRC}/packing_cuda.cu", f"{CSRC}/packing_cuda_bind.cpp"]


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _is_metadata_only():
    """pip asks for metadata (egg_info / dist_info) in a separate call that builds nothing."""
    return any(cmd in sys.argv for cmd in ("egg_info", "dist_info", "--version", "--name"))


def _extension_build():
    """(ext_modules, cmdclass) for the C++/CUDA extension; empty when torch cannot build it."""
    info = {"cpu": {"built": False, "reason": ""}, "cuda": {"built": False, "reason": ""}}
    if _flag("TEC_FAST_NO_EXT_BUILD"):
        return [], {}, "TEC_FAST_NO_EXT_BUILD is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:
        if _is_metadata_only():
            return [], {}, "metadata only"
        sys.exit(
            f"tec_fast: cannot build the C++ extension: torch.utils.cpp_extension does not import "
            f"({type(exc).__name__}: {exc}).\nInstall torch first, then install tec_fast with "
            f"`pip install --no-build-isolation ...` (an isolated build environment has no torch).\n"
            f"To install without the extension, set TEC_FAST_NO_EXT_BUILD=1.")

    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, python=sys.version.split()[0])
    cxx = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for is inline and runs serially without it
    ext_modules = [CppExtension("tec_fast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx},
                                extra_link_args=["-fopenmp"])]
    nvcc = shutil.which("nvcc") or (CUDA_HOME and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if _flag("FORCE_CUDA") or (torch.version.cuda and nvcc):
        try:
            ext_modules.append(CUDAExtension(
                "tec_fast._C_cuda", CUDA_SOURCES,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}))
            info["cuda"]["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        except Exception as exc:  # e.g. no CUDA_HOME (a CPU-only torch finds none)
            info["cuda"]["reason"] = f"cannot set up the CUDA build: {type(exc).__name__}: {exc}"
            if _flag("FORCE_CUDA"):  # asked for: fail the install, as a failed build does
                sys.exit(f"tec_fast: FORCE_CUDA=1 but {info['cuda']['reason']}"
                         + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only "
                            "build: the CUDA part needs a CUDA torch)"))
            warnings.warn(f"tec_fast: {info['cuda']['reason']}")
    else:
        info["cuda"]["reason"] = ("torch has no CUDA (a CUDA build of torch is needed)" if not torch.version.cuda
                                  else "nvcc not found (FORCE_CUDA=1 builds with a CUDA_HOME)")

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """Builds each extension and writes the outcome to tec_fast/_build_info.json next to the
        built modules. The CPU extension must build (its failure fails the install); the CUDA
        part is optional only when it was not asked for with FORCE_CUDA=1."""

        def build_extension(self, ext):
            part = "cuda" if ext.name.endswith("_cuda") else "cpu"
            try:
                super().build_extension(ext)
                info[part].update(built=True, reason="")
            except Exception as exc:
                info[part].update(built=False, reason=f"build failed: {type(exc).__name__}: {exc}")
                if part == "cpu" or _flag("FORCE_CUDA"):
                    print(f"tec_fast: building {ext.name} failed (the compiler's messages are above). To "
                          "install without the C++ extension (the plain-torch packing kernels then run), "
                          "set TEC_FAST_NO_EXT_BUILD=1" + ("" if part == "cpu" else "; to skip only the CUDA "
                                                             "part, unset FORCE_CUDA"), file=sys.stderr)
                    raise
                warnings.warn(f"tec_fast: building {ext.name} failed ({exc}); installing without "
                              "the CUDA part (the CPU extension and the Triton kernels still work)")
                # what is installed (an editable install copies every listed extension's module
                # into the source tree) is the extensions that built; the build loop walks the
                # list it started with, so a new list leaves it alone
                self.extensions = [e for e in self.extensions if e is not ext]

        def run(self):
            try:
                super().run()
            finally:
                out_dir = os.path.dirname(self.get_ext_fullpath("tec_fast._C"))
                os.makedirs(out_dir, exist_ok=True)
                with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                    json.dump(info, f, indent=1)

    return ext_modules, {"build_ext": BuildExt}, ""


ext_modules, cmdclass, skipped = _extension_build()
if skipped:
    warnings.warn(f"tec_fast: not building the C++/CUDA extension: {skipped}")

setup(
    name="tec_fast",
    version="0.1.0",
    description="Fast TEC (Target-Enhanced Conditional) self-supervised ViT pretraining",
    python_requires=">=3.10",
    packages=find_packages(include=["tec_fast", "tec_fast.*"]) + ["tec_fast.kernels"],
    package_dir={"tec_fast": "tec_fast", "tec_fast.kernels": "kernels"},
    package_data={"tec_fast.demo": ["assets/demo_base.pth", "assets/demo_base.json"],
                  "tec_fast.ops": ["measured/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",  # --config FILE.yaml and the config.yaml every run writes
        "safetensors>=0.4",
        "triton>=3.0; platform_system=='Linux'",
    ],
    extras_require={
        "demo": ["scikit-learn>=1.3", "pillow", "matplotlib"],
        # data: libjpeg-turbo JPEG decode (simplejpeg) and Hugging Face dataset folders (pyarrow)
        "data": ["pillow", "simplejpeg", "pyarrow"],
        "test": ["pytest>=7", "pytest-randomly", "scikit-learn>=1.3", "pillow", "matplotlib", "simplejpeg", "pyarrow"],
    },
)
