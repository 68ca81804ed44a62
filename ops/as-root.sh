# Sourced by ops/bootstrap, ops/test and ops/demo: re-execute the calling script as root.
# Root (namespaces, BPF, TCP_REPAIR) is required; as root nothing happens and sudo is never
# needed; as another user the script re-executes itself through sudo and says so.
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    echo "$(basename "$0"): needs root (namespaces, BPF, TCP_REPAIR); re-executing through sudo" >&2
    exec sudo -E -- "$0" "$@"
  fi
  echo "$(basename "$0"): needs root and sudo is not installed; run it as root" >&2
  exit 1
fi
