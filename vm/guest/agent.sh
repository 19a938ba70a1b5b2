#!/bin/sh
# Xenon compute VM agent: PID 1 of the guest once the initramfs has mounted everything. Talks to
# the host driver (vm/qemu.ts) over the virtio-serial port `xenon.agent`, one line per message.
#
#   host → guest   start [<dir>]    start Postgres on /xenon/data/pgdata, with one `-c` setting
#                                   per line of /xenon/data/xenon-start.conf; /xenon/data is
#                                   <dir> of the 9p share (default: the share itself; a VM of
#                                   the warm pool gets its compute's data bind-mounted at `data`)
#                  stop             fast shutdown of Postgres (the reply is its `exited`)
#                  online <n>       wait (up to 20 s) until <n> CPUs are present, online every
#                                   offline one (the Debian kernel has no uevent helper to do
#                                   it), reply `cpus <online>`
#                  mem              reply `mem <MemTotal kB>`
#                  stat             reply `stat <busy> <total> <MemTotal kB> <MemAvailable kB>`: CPU
#                                   jiffies of all CPUs since boot (the autoscaler's load; shell
#                                   builtins only, so that sampling costs the guest nothing)
#                  ping             reply `pong`
#   guest → host   booted <cpus> <MemTotal kB>   once, when the agent is up
#                  ready            Postgres accepts connections
#                  exited <status>  Postgres exited (`none` when none was running)
#
# Postgres runs as the owner of the data directory (the host's compute user: the 9p share keeps
# ownership), logs to the console, which the host captures per compute.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
PGBIN=/usr/lib/postgresql/15/bin
SHARE=/xenon/share
DATA=/xenon/data # → /run/xenon-data (the image's symlink) → the data in the share
PIDFILE=/run/xenon-postgres.pid

port=
for d in /sys/class/virtio-ports/*; do
  [ "$(cat "$d/name" 2>/dev/null)" = xenon.agent ] && port="/dev/${d##*/}"
done
if [ -z "$port" ]; then
  echo "xenon-agent: no virtio-serial port named xenon.agent" > /dev/console
  echo 1 > /proc/sys/kernel/sysrq
  echo o > /proc/sysrq-trigger
fi
exec 3<>"$port"
say() { echo "$*" >&3; }

mem_kb() { awk '/^MemTotal:/ { print $2 }' /proc/meminfo; }
present_cpus() { ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l; }
online_count() { grep -c '^processor' /proc/cpuinfo; }
online_cpus() {
  want=${1:-0}
  case "$want" in ''|*[!0-9]*) want=0 ;; esac
  tries=0
  # The guest sees a hot-plugged CPU once it handled the ACPI event: wait for it.
  while [ "$(present_cpus)" -lt "$want" ] && [ $tries -lt 200 ]; do sleep 0.1; tries=$((tries + 1)); done
  for c in /sys/devices/system/cpu/cpu[0-9]*; do
    [ -f "$c/online" ] && [ "$(cat "$c/online")" = 0 ] && echo 1 > "$c/online" 2>/dev/null
  done
}

start_postgres() {
  if [ -f "$PIDFILE" ]; then say "exited already-running"; return; fi
  case "$1" in
    ''|.) ln -sfn "$SHARE" /run/xenon-data ;;
    *[!a-z0-9-]*) say "exited bad-directory"; return ;;
    *) ln -sfn "$SHARE/$1" /run/xenon-data ;;
  esac
  if [ ! -f "$DATA/pgdata/PG_VERSION" ]; then say "exited no-data"; return; fi
  uid=$(stat -c %u "$DATA/pgdata")
  gid=$(stat -c %g "$DATA/pgdata")
  mkdir -p /run/postgresql && chown "$uid:$gid" /run/postgresql
  set --
  if [ -f "$DATA/xenon-start.conf" ]; then
    while IFS= read -r line || [ -n "$line" ]; do
      [ -n "$line" ] && set -- "$@" -c "$line"
    done < "$DATA/xenon-start.conf"
  fi
  # A postmaster.pid here is stale (a VM killed, its Postgres with it): only this agent starts
  # Postgres in this VM, and the host runs one compute per data directory. Left, its pid could
  # name a live process of this boot, and its status line would read `ready` too early.
  rm -f "$DATA/pgdata/postmaster.pid"
  (
    setpriv --reuid="$uid" --regid="$gid" --clear-groups \
      "$PGBIN/postgres" -D "$DATA/pgdata" -c port=5432 -c listen_addresses='*' \
      -c unix_socket_directories=/run/postgresql "$@" < /dev/null > /dev/console 2>&1 &
    pg=$!
    echo "$pg" > "$PIDFILE"
    while :; do
      state=$(cut -d' ' -f3 "/proc/$pg/stat" 2>/dev/null)
      [ -z "$state" ] || [ "$state" = Z ] && break
      # postmaster.pid's 8th line is the postmaster's status (as pg_ctl reads it)
      if [ "$(sed -n 1p "$DATA/pgdata/postmaster.pid" 2>/dev/null)" = "$pg" ]; then
        case "$(sed -n 8p "$DATA/pgdata/postmaster.pid" 2>/dev/null)" in ready*) say ready; break ;; esac
      fi
      sleep 0.05
    done
    wait "$pg"
    status=$?
    rm -f "$PIDFILE"
    say "exited $status"
  ) &
}

stop_postgres() {
  if [ -f "$PIDFILE" ]; then kill -INT "$(cat "$PIDFILE")"; else say "exited none"; fi
}

say "booted $(online_count) $(mem_kb)"
while :; do
  while IFS= read -r cmd <&3; do
    case "$cmd" in
      start) start_postgres . ;;
      start\ *) start_postgres "${cmd#start }" ;;
      stop) stop_postgres ;;
      online|online\ *)
        n=${cmd#online}
        online_cpus "${n# }"
        say "cpus $(online_count)" ;;
      mem) say "mem $(mem_kb)" ;;
      stat)
        read -r _ u n sy id io irq sirq st _ < /proc/stat
        busy=$((u + n + sy + irq + sirq + st))
        mt=0
        ma=0
        while read -r k v _; do
          case "$k" in MemTotal:) mt=$v ;; MemAvailable:) ma=$v ;; esac
        done < /proc/meminfo
        say "stat $busy $((busy + id + io)) $mt $ma" ;;
      ping) say pong ;;
      *) say "error unknown command" ;;
    esac
  done
  sleep 1 # the host end is gone (a control plane restart): keep serving, wait for it
done
