#!/bin/sh
# An AArch64 Python with TVM 0.27 and numpy that runs on an x86 Debian 12 machine under qemu-user:
# "a Raspberry Pi 4 without a Pi" for exported TVM programs (tests/backends/test_tvm.py uses it).
#
#   tools/aarch64-python.sh [DIR]      (default ~/.cache/pipecomp/aarch64; run as root: it uses apt)
#   DIR/python3 FOLDER/run.py FOLDER   (runs the board-side runner of an exported program)
#
# Nothing is installed for arm64: the packages are only downloaded and unpacked into DIR/root,
# and qemu's -L prefix makes the emulated python find its loader, libraries and stdlib there.
set -eu
DIR=${1:-$HOME/.cache/pipecomp/aarch64}
PY=${PY:-python3}
[ -e "$PY" ] && PY=$(realpath "$PY")  # a path to a python with pip (the venv's), or a command
command -v qemu-aarch64 >/dev/null || { apt-get update -q && apt-get install -y -q qemu-user; }
dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64 && apt-get update -q; }
mkdir -p "$DIR/debs" "$DIR/root" "$DIR/wheels"
cd "$DIR/debs"
# python3.11-minimal:arm64 and libpython3.11-stdlib:arm64 with their dependencies
# (apt-cache depends --recurse --no-recommends), plus libstdc++6 for libtvm.
apt-get download python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
  libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 gcc-12-base:arm64 zlib1g:arm64 libexpat1:arm64 \
  libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libncursesw6:arm64 \
  libtinfo6:arm64 libreadline8:arm64 libuuid1:arm64 libcrypt1:arm64 libnsl2:arm64 libtirpc3:arm64 \
  libdb5.3:arm64 libgssapi-krb5-2:arm64 libk5crypto3:arm64 libkeyutils1:arm64 libkrb5-3:arm64 \
  libkrb5support0:arm64 libcom-err2:arm64 libacl1:arm64 libmd0:arm64 libpcre2-8-0:arm64 \
  libselinux1:arm64 libzstd1:arm64 media-types
for d in *.deb; do dpkg -x "$d" "$DIR/root"; done
# apache-tvm-ffi 0.1.15 makes TVM 0.27 segfault when it serializes IR; the runtime is pinned to
# the same version as on the host. cloudpickle and psutil: TVM's RPC server (the board's end of
# tuning over RPC) runs its sessions in a worker process that needs them.
$PY -m pip download -q --platform manylinux_2_28_aarch64 --only-binary=:all: --python-version 3.11 \
  --implementation cp -d "$DIR/wheels" 'apache-tvm==0.27.*' 'apache-tvm-ffi==0.1.14.post1' numpy cloudpickle psutil
$PY -m pip install -q --upgrade --no-deps --no-index --target "$DIR/site" --platform manylinux_2_28_aarch64 \
  --only-binary=:all: --python-version 3.11 --implementation cp "$DIR"/wheels/*.whl
cat > "$DIR/python3" <<WRAP
#!/bin/sh
exec qemu-aarch64 -L "$DIR/root" -E PYTHONPATH="$DIR/site" -E PIPECOMP_EXECUTABLE="$DIR/python3" \
  "$DIR/root/usr/bin/python3.11" "\$@"
WRAP
# The emulated python's sys.executable is the aarch64 binary, which this machine cannot exec;
# subprocesses it starts (TVM's RPC server runs its sessions in one) must go through the wrapper.
cat > "$DIR/site/sitecustomize.py" <<SITE
import os, sys
sys.executable = os.environ.get("PIPECOMP_EXECUTABLE", sys.executable)
SITE
chmod +x "$DIR/python3"
"$DIR/python3" -c "import platform, tvm, numpy, cloudpickle, psutil; print(platform.machine(), 'python', platform.python_version(), 'tvm', tvm.__version__)"
