"""Builds dgp_kernels._C (C++/OpenMP CPU kernels of the select ops and the wire codec)
against the torch installed in the build environment.

The extension uses torch's C++ API, whose ABI changes between torch minor releases, so a
built ``_C`` serves only the torch minor it was compiled against:

* a binary wheel (``bdist_wheel``, ``pip install`` from source) requires that torch minor
  (``torch==2.13.*`` when built against torch 2.13.x) and records it in ``_C_build.json``
  next to the library, which :mod:`dgp_kernels.native` compares with the running torch;
* the sdist requires only ``torch>=2.13`` (the oldest minor tested) and builds against
  whatever torch is installed.

Build with ``--no-build-isolation`` (``pip install --no-build-isolation .``,
``python -m build --no-isolation``): an isolated build would download its own torch (on
Linux PyPI's default torch is a multi-GB CUDA build) and compile against it instead of the
user's torch. ``[build-system].requires`` therefore does not list torch, and building the
extension without torch installed stops with a message saying what to run.

The C++ standard is the one the installed torch's extension builder picks for its own
headers (``-std=c++20`` on torch 2.13 and 2.14; torch 2.14's headers refuse C++17).
The library is linked stripped (``-s``) unless ``DGP_DEBUG=1``.
"""

import json
import os
import re
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
#: Oldest torch minor the package is tested with (tools/check_torch_versions.sh).
TORCH_MIN = "2.13"
#: setup.py commands that compile the extension or describe a compiled build (a wheel's
#: metadata): they need torch. sdist and egg_info (source archive, requirements) do not.
_BUILD_COMMANDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install",
                   "develop", "editable_wheel", "dist_info"}


def _needs_extension() -> bool:
    return any(a in _BUILD_COMMANDS for a in sys.argv[1:])


def _torch_minor(version: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        sys.exit(f"dgp_kernels: cannot read the torch version {version!r}")
    return f"{m.group(1)}.{m.group(2)}"


try:
    import torch
except ImportError:
    torch = None

if torch is None and _needs_extension():
    sys.exit(
        "dgp_kernels: building the C++ extension needs torch installed in the build "
        "environment, and the build must see it: install torch first (e.g. `pip install "
        "torch==2.13.0`), then `pip install --no-build-isolation .` (or `python -m build "
        "--no-isolation`). An isolated build would compile against a torch it downloads "
        "itself, not the one you run."
    )


def _requirements():
    if torch is None or not _needs_extension():
        torch_req = f"torch>={TORCH_MIN}"  # the sdist: builds against the installed torch
    else:  # a compiled build: tied to the torch minor it is compiled against
        torch_req = f"torch=={_torch_minor(torch.__version__)}.*"
    return [torch_req, "numpy"]


def _extensions_and_commands():
    if torch is None or not _needs_extension():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DGP_DEBUG", "0") == "1"
    asan = os.environ.get("DGP_ASAN", "0") == "1"
    # No -std flag: BuildExtension adds the standard the installed torch's headers need.
    cxx = ["-O1" if debug else "-O3", "-fopenmp", "-fvisibility=hidden",
           "-DPy_LIMITED_API=0x030b0000"]
    if debug:
        cxx += ["-g", "-fno-omit-frame-pointer"]
    if asan:
        cxx += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    ldflags = ["-fopenmp"]
    if asan:
        ldflags += ["-fsanitize=address"]
    if not (debug or asan):
        ldflags += ["-s"]  # no debug info / symbol table in the shipped library (~15x smaller)
    ext = CppExtension(
        name="dgp_kernels._C",
        sources=sorted(
            os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join(HERE, "csrc", "cpu"))
            if f.endswith(".cpp")
        ),
        extra_compile_args={"cxx": cxx},
        extra_link_args=ldflags,
        include_dirs=[os.path.join(HERE, "csrc")],
        py_limited_api=True,
    )

    base = BuildExtension.with_options(use_ninja=True)

    class build_ext(base):  # noqa: N801  (setuptools command name)
        """Also writes ``_C_build.json`` (the torch the library was compiled against)."""

        def run(self):
            super().run()
            path = os.path.join(os.path.dirname(self.get_ext_fullpath("dgp_kernels._C")),
                                "_C_build.json")
            with open(path, "w") as f:
                json.dump({"torch": torch.__version__,
                           "torch_minor": _torch_minor(torch.__version__)}, f)
                f.write("\n")

        def get_outputs(self):
            out = super().get_outputs()
            return out + [os.path.join(os.path.dirname(self.get_ext_fullpath("dgp_kernels._C")),
                                       "_C_build.json")]

    return [ext], {"build_ext": build_ext}


_ext_modules, _cmdclass = _extensions_and_commands()

setup(
    install_requires=_requirements(),
    ext_modules=_ext_modules,
    cmdclass=_cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
