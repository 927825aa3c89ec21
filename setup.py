"""Build: protobuf/gRPC stubs from proto/ and the native data-plane engine.

The engine (csrc/*.c, C only, no Python.h) is compiled as a static library
with strict warnings, then linked into the Cython extension
``scistream.dataplane._engine`` against the system OpenSSL 3.

Without a compiler the build falls back to the pure-Python engine with a
clear log line, unless SCISTREAM_REQUIRE_NATIVE=1 (CI), which makes that an error.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_clib import build_clib
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

log = logging.getLogger("scistream.setup")
HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_NATIVE = os.environ.get("SCISTREAM_REQUIRE_NATIVE", "") not in ("", "0")
DEBUG = os.environ.get("SCISTREAM_DEBUG_BUILD", "") not in ("", "0")

STRICT_CFLAGS = ["-std=gnu11", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE"]
if DEBUG:
    STRICT_CFLAGS += ["-DSCISTREAM_DEBUG=1", "-g"]


def have_ipsec_mb() -> bool:
    """Whether intel-ipsec-mb (Debian's libipsec-mb-dev, x86-64 only) can be compiled in: a test
    program that includes and links it. With it the engine seals TLS 1.3 AES-GCM records with
    VAES on CPUs that have it (csrc/aesgcm.c); without it OpenSSL does, as before."""
    if os.environ.get("SCISTREAM_NO_IPSEC_MB", "") not in ("", "0"):
        return False
    probe = "#include <intel-ipsec-mb.h>\nint main(void) { free_mb_mgr(alloc_mb_mgr(0)); return 0; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(probe)
        cmd = [os.environ.get("CC", "cc"), src, "-o", os.path.join(tmp, "probe"), "-lIPSec_MB"]
        try:
            return subprocess.run(cmd, capture_output=True, check=False).returncode == 0
        except OSError:
            return False


def generate_protos() -> None:
    """proto/*.proto -> scistream/_proto/*_pb2.py, *_pb2_grpc.py, *.pyi, and the pinned etcd
    protos proto/etcd/*.proto -> scistream/_proto/etcd/ (the etcd client's stubs)."""
    from grpc_tools import protoc  # build requirement

    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    out = HERE
    trees = [("scistream/_proto", os.path.join(HERE, "proto")),
             ("scistream/_proto/etcd", os.path.join(HERE, "proto", "etcd"))]
    for package_dir, src in trees:
        for proto in sorted(glob.glob(os.path.join(src, "*.proto"))):
            args = [
                "grpc_tools.protoc",
                f"-I{include}",
                f"-I{package_dir}={src}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                f"{package_dir}/{os.path.basename(proto)}",
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


class OptionalBuildClib(build_clib):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing or failing
            if REQUIRE_NATIVE:
                raise
            log.warning("native engine NOT built (%s): the pure-Python engine will be used", exc)
            sys.stderr.write(
                f"scistream: native engine not built ({exc}); falling back to the pure-Python engine\n"
            )
            self.distribution.ext_modules = []


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        generate_protos()  # editable installs skip build_py
        if not self.distribution.ext_modules:
            return
        # build_clib must have produced the engine archive first.
        self.run_command("build_clib")
        if not self.distribution.ext_modules:
            return
        clib = self.get_finalized_command("build_clib")
        for ext in self.extensions:
            ext.library_dirs.append(clib.build_clib)
        try:
            super().run()
        except Exception as exc:
            if REQUIRE_NATIVE:
                raise
            sys.stderr.write(
                f"scistream: native engine not built ({exc}); falling back to the pure-Python engine\n"
            )


def native_parts() -> tuple[list[tuple[str, dict[str, object]]], list[Extension]]:
    csources = sorted(glob.glob("csrc/*.c"))
    pyx = "scistream/dataplane/_engine.pyx"
    if not csources or not os.path.exists(pyx):
        return [], []
    try:
        from Cython.Build import cythonize
    except ImportError as exc:
        if REQUIRE_NATIVE:
            raise
        sys.stderr.write(f"scistream: Cython missing ({exc}); pure-Python engine only\n")
        return [], []
    cflags, link = list(STRICT_CFLAGS), ["s2engine", "ssl", "crypto", "pthread"]
    if have_ipsec_mb():
        cflags.append("-DSCISTREAM_HAVE_IPSEC_MB=1")
        link.insert(1, "IPSec_MB")
    else:
        sys.stderr.write("scistream: intel-ipsec-mb not found: TLS 1.3 AES-GCM by OpenSSL only\n")
    libs: list[tuple[str, dict[str, object]]] = [
        ("s2engine", {"sources": csources, "include_dirs": ["csrc"], "cflags": cflags})
    ]
    ext = Extension(
        "scistream.dataplane._engine",
        [pyx],
        include_dirs=["csrc"],
        libraries=link,
        # Relink when the engine changes: build_ext looks only at these for staleness.
        depends=csources + sorted(glob.glob("csrc/*.h")),
        extra_compile_args=["-O2"] + (["-DSCISTREAM_DEBUG=1"] if DEBUG else []),
    )
    return libs, cythonize([ext], language_level=3, compiler_directives={"embedsignature": True})


libraries, ext_modules = native_parts()

setup(
    libraries=libraries,
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithProtos, "build_clib": OptionalBuildClib, "build_ext": OptionalBuildExt},
)
