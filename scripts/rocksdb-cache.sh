# Source this: reuse a prebuilt RocksDB static library across clean builds.
#
# librocksdb-sys compiles RocksDB's C++ (most of a clean build). Its build script also
# accepts a prebuilt librocksdb.a of the same version through ROCKSDB_LIB_DIR. We keep the
# one it built in a cache directory keyed by the librocksdb-sys version (and features, which
# Cargo.toml pins) and by .cargo/config.toml (its target features decide how RocksDB's C++ is
# compiled, e.g. hardware CRC32C), and point every build at it, so a cold target directory
# links it in seconds. The first build on a machine compiles it and `save_rocksdb_lib` keeps it.
rocksdb_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rocksdb_sys_version=$(sed -n '/^name = "librocksdb-sys"$/{n;s/^version = "\(.*\)"$/\1/p}' "$rocksdb_root/Cargo.lock")
rocksdb_flags=$(cat "$rocksdb_root/.cargo/config.toml" 2>/dev/null | sha256sum | cut -c1-12)
ROCKSDB_CACHE="${SEEDCAST_ROCKSDB_CACHE:-$HOME/.cache/seedcast-rocksdb}/librocksdb-sys-${rocksdb_sys_version}-${rocksdb_flags}"
if [ -f "$ROCKSDB_CACHE/librocksdb.a" ]; then
  export ROCKSDB_LIB_DIR="$ROCKSDB_CACHE" ROCKSDB_STATIC=1
fi

save_rocksdb_lib() {
  [ -f "$ROCKSDB_CACHE/librocksdb.a" ] && return 0
  local built
  built=$(ls -t "$CARGO_TARGET_DIR"/*/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -n 1 || true)
  [ -n "$built" ] || return 0
  mkdir -p "$ROCKSDB_CACHE" && cp "$built" "$ROCKSDB_CACHE/librocksdb.a.tmp" &&
    mv "$ROCKSDB_CACHE/librocksdb.a.tmp" "$ROCKSDB_CACHE/librocksdb.a"
}
