# Sourced by the per-run /job.sh inside the Soft-RoCE guest (see tests/rxe/run). busybox sh.
# Each step prints "RXE-RESULT <name> <exit status>"; measurements print
# "RXE-METRIC <name> <value> <unit> [<value> <unit>]". The host parses nothing else.

# step NAME SECONDS CMD [ARGS...]: run CMD bounded by a guest-side timeout so that a hung
# step is reported with a status (timeout's 143) instead of eating the host's whole budget.
step() {
  _name=$1 _secs=$2
  shift 2
  echo "RXE-BEGIN $_name: $*"
  timeout "$_secs" "$@"
  _rc=$?
  echo "RXE-RESULT $_name $_rc"
  return $_rc
}

# missing NAME WHAT: a step whose binary was not built; it fails, it is never skipped silently.
missing() {
  echo "RXE-BEGIN $1: $2 is not in the initramfs (not built)"
  echo "RXE-RESULT $1 missing"
}

# perftest NAME TOOL [ARGS...]: TOOL's server in the background and its client to 127.0.0.2,
# both on rxe0 with the looked-up GID. The client retries while the server is not yet listening
# (under emulation the server can take seconds to start). perftest converts TSC cycles to time
# with a CPU frequency it measures itself; under emulation that measurement sometimes fails
# ("Correlation coefficient r^2 < 0.9"; the figures are then 0 or on a wrong scale): such a
# run is repeated, twice at most, and fails if it still has no trustworthy figure.
perftest() {
  _name=$1 _tool=$2
  shift 2
  echo "RXE-BEGIN $_name: $_tool $* (server + client on $RXE_DEVICE, gid $RXE_GID_INDEX)"
  _attempt=1
  while :; do
    perftest_once "$@"
    _metric=$(perftest_metric "$_name")
    [ $_rc -ne 0 ] && break
    if grep -q "Correlation coefficient" "/tmp/$_name.client"; then
      _rc=3
    else
      case "$_metric" in
        "RXE-METRIC $_name 0.00 "*|"") _rc=3 ;;
        *) break ;;
      esac
    fi
    [ $_attempt -ge 3 ] && break
    echo "--- $_name: no valid figure (perftest's clock calibration failed?), running it again"
    _attempt=$((_attempt + 1))
  done
  [ -n "$_metric" ] && echo "$_metric"
  echo "RXE-RESULT $_name $_rc"
  return $_rc
}

perftest_once() {
  "$_tool" -d "$RXE_DEVICE" -x "$RXE_GID_INDEX" -F "$@" > "/tmp/$_name.server" 2>&1 &
  _srv=$!
  _try=0
  while :; do
    timeout 300 "$_tool" -d "$RXE_DEVICE" -x "$RXE_GID_INDEX" -F "$@" "$RXE_ADDRESS" \
      > "/tmp/$_name.client" 2>&1
    _rc=$?
    [ $_rc -eq 0 ] && break
    grep -q "Couldn't connect" "/tmp/$_name.client" || break
    _try=$((_try + 1))
    [ $_try -ge 30 ] && break
    sleep 0.5
  done
  # The server exits once the client is done; bound the wait all the same.
  _w=0
  while kill -0 $_srv 2>/dev/null && [ $_w -lt 100 ]; do sleep 0.1; _w=$((_w + 1)); done
  kill $_srv 2>/dev/null
  wait $_srv 2>/dev/null
  cat "/tmp/$_name.client"
  if [ $_rc -ne 0 ]; then
    echo "--- $_name server output:"
    cat "/tmp/$_name.server"
  fi
}

perftest_metric() {
  case "$_tool" in
    *lat*)
      # #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
      awk -v n="$1" '$1 ~ /^[0-9]+$/ && NF >= 9 { print "RXE-METRIC " n " " $5 " us" }' \
        "/tmp/$1.client" ;;
    *)
      # #bytes #iterations BW_peak BW_average MsgRate
      awk -v n="$1" '$1 ~ /^[0-9]+$/ && NF >= 5 { print "RXE-METRIC " n " " $4 " MB/s " $5 " Mpps" }' \
        "/tmp/$1.client" ;;
  esac
}
