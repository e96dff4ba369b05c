# Shared by the serving benchmarks (sourced, from the repository root): builds the server and the load tool, and
# gives `pid` (the server under test, killed on exit), `free_port` and `wait_ready URL`.
cargo build --release -p amlserve --bin amlserve >&2
cargo build --release -p amlserve-loadtest >&2

pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # url
  for _ in $(seq 1 300); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done
  echo "$(basename "$0"): $1 never became ready" >&2; return 1
}
