# Source this: reuse a prebuilt RocksDB static library across clean builds.
#
# librocksdb-sys compiles RocksDB's C++ (most of a clean build). Its build script also
# accepts a prebuilt librocksdb.a of the same version through ROCKSDB_LIB_DIR. We keep the
# one it built in a cache directory keyed by the librocksdb-sys version (and features, which
# Cargo.toml pins), and point every build at it, so a cold target directory links it in
# seconds. The first build on a machine compiles it and `save_rocksdb_lib` keeps it.
rocksdb_sys_version=$(sed -n '/^name = "librocksdb-sys"$/{n;s/^version = "\(.*\)"$/\1/p}' Cargo.lock)
ROCKSDB_CACHE="${SEEDCAST_ROCKSDB_CACHE:-$HOME/.cache/seedcast-rocksdb}/librocksdb-sys-${rocksdb_sys_version}"
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
