# Source this for plain cargo commands: `. ./env.sh` (the Makefile does the same).
export DEFUSE_CACHE="${DEFUSE_CACHE:-$HOME/.cache/defuse}"
export LIBTORCH="$DEFUSE_CACHE/libtorch-2.11.0/torch"
export LIBTORCH_BYPASS_VERSION_CHECK=1
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$DEFUSE_CACHE/target}"
