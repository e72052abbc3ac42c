#!/usr/bin/env bash
# `make test-deb`: the .deb on a real systemd, in a Debian 12 booted with systemd-nspawn.
#
#   tests/deb/run-test.sh build/deb/dtsd_0.1.0_all.deb
#
# 1. The install section's install block, as written: apt installs PostgreSQL, Redis, etcd
#    and the .deb, every dependency from the Debian archive. Nothing starts dtsd, and the
#    postinst says so; README.Debian holds every command of the first-start block.
# 2. Its first-start block, as written: `systemctl start dtsd` returns after READY, the
#    unit is active, `systemctl status` shows the STATUS= line.
# 3. `dtsctl status` shows the node and its children; a job runs as a slot user dtsd-job-N
#    (never root, without privileges), cannot see or signal another job, cannot reach Redis,
#    and leaves nothing behind after setsid; the seed's jobs.json submits and completes.
# 4. Another [worker] processes and the reload block: the count changes, the unit stays
#    active, a running job survives; a reload to an exposed address or of a file that does
#    not parse is refused and `systemctl reload` fails; a reload back to 2 workers returns
#    only once the third has drained. `systemctl stop` drains; the journal holds the log.
# 5. A broken file exits 78 and is not restarted. `kill -9` of the master: systemd
#    restarts it and the queued jobs complete. Then the documented drop-in that loosens
#    the sandbox takes effect.
# 6. `dtsd token add`, then the purge block: no configuration, tokens file, state, unit or
#    process is left.
#
# The install section is the one headed "## Install on Debian 12" in README.md; its blocks are the ```sh fences that follow
# `<!-- test-deb: NAME -->` markers. They run as root in the container, in the directory
# holding the .deb, with apt configured to answer yes (there is no terminal).
#
# The container: a debootstrap tree cached in $DTSD_TEST_DEB_CACHE/bookworm (default
# /var/cache/dtsd-test-deb; rebuilt when missing or made by an older recipe), copied per run
# so that each run starts clean. It is booted with only a loopback network (everything is on
# 127.0.0.1 and nothing collides with the host's servers), so the packages are fetched
# first, by the same install block in the same tree, not booted, on the host's network and
# with apt told to download only. Fetched packages stay in $DTSD_TEST_DEB_CACHE/archives.
# Any failure prints the container's journal; the container is always stopped and its
# tree unmounted and removed (DTSD_TEST_DEB_PAUSE=SECONDS keeps it up that long after a
# failure, to look inside with nsenter).
set -Eeuo pipefail

DEB=$(readlink -f "${1:?usage: tests/deb/run-test.sh DTSD_DEB}")
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.."
HERE=$PWD/tests/deb
CACHE=${DTSD_TEST_DEB_CACHE:-/var/cache/dtsd-test-deb}
TREE=$CACHE/bookworm
ARCHIVES=$CACHE/archives
MIRROR=http://deb.debian.org/debian
# Bump the last word when the tree's recipe changes: the cached tree is rebuilt.
RECIPE="bookworm minbase systemd,systemd-sysv,dbus,sudo,procps,man-db r1"
INSTALL_HEADING="## Install on Debian 12"
CT_DIR=/srv/dtsd-test                  # inside the container: the .deb and the test's files
CT_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        HOME=/root LANG=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive SYSTEMD_PAGER=cat)

START=$SECONDS
WORK=""
NSPAWN_PID=""
CT_PID=""
MOUNTED_NSPAWN_RUN=""

say() { printf '\n=== [%3ds] %s\n' $((SECONDS - START)) "$*"; }
note() { printf -- '--- %s\n' "$*"; }

# --- the container ------------------------------------------------------------------------

ct() {  # run a command in the booted container, as root
	nsenter -t "$CT_PID" -a "${CT_ENV[@]}" "$@"
}

ct_sh() {  # run a shell script in the booted container, in $CT_DIR, tracing each command
	# `refute COMMAND` fails when COMMAND succeeds (`! COMMAND` would not stop `set -e`).
	ct bash -euo pipefail -c "refute() { if eval \"\$1\"; then echo \"refuted: \$1\" >&2; return 1; fi; }
		cd $CT_DIR; set -x; $1"
}

q() {  # q EXPR COMMAND...: the command's JSON output, through jsonq.py
	local expr=$1; shift
	ct "$@" | ct python3 "$CT_DIR/jsonq.py" "$expr"
}

quiet() {  # quiet PATTERN COMMAND...: run it, print its output without lines matching PATTERN
	local pattern=$1 log
	shift
	log=$(mktemp)
	if ! "$@" >"$log" 2>&1; then
		cat "$log" >&2
		rm -f "$log"
		return 1
	fi
	grep -vE "$pattern" "$log" || true
	rm -f "$log"
}

status_text() { ct systemctl show -p StatusText --value dtsd; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until the command succeeds
	local limit=$1 what=$2 deadline=$((SECONDS + $1))
	shift 2
	until "$@" >/dev/null 2>&1; do
		[ "$SECONDS" -lt "$deadline" ] || fail "not within ${limit}s: $what"
		sleep 0.5
	done
}

fail() {
	trap - ERR
	printf '\n*** test-deb FAILED: %s\n' "$*" >&2
	if [ -n "$CT_PID" ] && kill -0 "$CT_PID" 2>/dev/null; then
		printf '\n*** systemctl status dtsd:\n' >&2
		ct systemctl status --no-pager -l dtsd >&2 2>&1 || true
		printf '\n*** the container'"'"'s journal (last 400 lines):\n' >&2
		ct journalctl --no-pager -o short-precise -n 400 >&2 2>&1 || true
	elif [ -n "$WORK" ] && [ -f "$WORK/console.log" ]; then
		printf '\n*** the container'"'"'s console (last 100 lines):\n' >&2
		tail -n 100 "$WORK/console.log" >&2 || true
	fi
	if [ -n "${DTSD_TEST_DEB_PAUSE:-}" ] && [ -n "$CT_PID" ]; then
		printf '\n*** DTSD_TEST_DEB_PAUSE: the container stays up for %ss; enter it with\n' \
			"$DTSD_TEST_DEB_PAUSE" >&2
		printf '***   nsenter -t %s -a bash\n' "$CT_PID" >&2
		sleep "$DTSD_TEST_DEB_PAUSE" || true
	fi
	exit 1
}
trap 'fail "command failed (line $LINENO): $BASH_COMMAND"' ERR

cleanup() {
	local rc=$?
	trap - ERR
	set +e
	if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
		kill -TERM "$NSPAWN_PID" 2>/dev/null || true        # nspawn: orderly poweroff
		for _ in $(seq 60); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.5; done
		kill -KILL "$NSPAWN_PID" 2>/dev/null || true
		wait "$NSPAWN_PID" 2>/dev/null || true
	fi
	if [ -n "$WORK" ]; then
		# Whatever is still mounted below the tree goes first, so that rm stays in it.
		findmnt -n -l -o TARGET | awk -v w="$WORK/" 'index($0, w) == 1' | sort -r |
			while read -r target; do umount -l "$target"; done
		rm -rf --one-file-system "$WORK"
	fi
	if [ -n "$MOUNTED_NSPAWN_RUN" ]; then
		umount /run/systemd/nspawn 2>/dev/null || true
	fi
	[ "$rc" = 0 ] || printf '*** test-deb: cleaned up after the failure\n' >&2
	exit "$rc"
}
trap cleanup EXIT

# --- the install section ------------------------------------------------------------------

install_section() {  # the install section: from its heading to the next one of its level
	awk -v h="$INSTALL_HEADING" '
		$0 == h { on = 1; level = index(h, " "); print; next }
		on && /^#+ / && index($0, " ") <= level { exit }
		on { print }' "$INSTALL_DOC"
}

block() {  # block NAME: the ```sh block after <!-- test-deb: NAME --> of the install section
	install_section | awk -v m="<!-- test-deb: $1 -->" '
		$0 == m && !done { marked = 1; next }
		marked && /^```sh$/ { inside = 1; marked = 0; next }
		inside && /^```$/ { inside = 0; done = 1 }
		inside { print }'
}

# --- the cached tree ----------------------------------------------------------------------

ensure_tree() {
	if [ -f "$TREE/.dtsd-test-deb" ] && [ "$(cat "$TREE/.dtsd-test-deb")" = "$RECIPE" ]; then
		note "reusing the Debian 12 tree in $TREE"
		return
	fi
	say "debootstrap: a Debian 12 tree for the cache ($RECIPE)"
	local new=$TREE.new
	rm -rf --one-file-system "$new"
	local include
	include=$(echo "$RECIPE" | cut -d' ' -f3)
	debootstrap --variant=minbase --include="$include" bookworm "$new" "$MIRROR" \
		>"$CACHE/debootstrap.log" 2>&1 ||
		{ tail -n 30 "$CACHE/debootstrap.log" >&2; fail "debootstrap failed"; }
	rm -f "$new/etc/apt/sources.list" "$new"/var/cache/apt/archives/*.deb
	cat >"$new/etc/apt/sources.list.d/debian.sources" <<-EOF
	Types: deb
	URIs: $MIRROR
	Suites: bookworm bookworm-updates
	Components: main
	Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

	Types: deb
	URIs: ${MIRROR}-security
	Suites: bookworm-security
	Components: main
	Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
	EOF
	# No terminal answers apt's questions in the test.
	printf 'APT::Get::Assume-Yes "true";\n' >"$new/etc/apt/apt.conf.d/90dtsd-test-yes"
	echo dtsd-test >"$new/etc/hostname"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\tdtsd-test\n::1\tlocalhost ip6-localhost\n' \
		>"$new/etc/hosts"
	ln -sf /dev/null "$new/etc/systemd/system/console-getty.service"
	: >"$new/etc/machine-id"
	echo "$RECIPE" >"$new/.dtsd-test-deb"
	rm -rf --one-file-system "$TREE"
	mv "$new" "$TREE"
}

# --- the run ------------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || fail "needs root (debootstrap, systemd-nspawn, nsenter)"
[ -f "$DEB" ] || fail "no such package: $DEB"
# The install section of README.md is what the test runs, block by block.
if grep -xF -- "$INSTALL_HEADING" README.md >/dev/null; then
	INSTALL_DOC=README.md
else
	fail "README.md has no heading '$INSTALL_HEADING'"
fi
say "the install section: '$INSTALL_HEADING' of $INSTALL_DOC"
for name in install first-start reload purge; do
	[ -n "$(block "$name")" ] || fail "the install section has no '<!-- test-deb: $name -->' sh block"
done

mkdir -p "$CACHE" "$ARCHIVES/partial"
exec 9>"$CACHE/lock"
flock -w 1800 9 || fail "another test-deb holds $CACHE/lock"
ensure_tree

WORK=$(mktemp -d /var/tmp/dtsd-test-deb.XXXXXX)
say "copying the tree to $WORK/root"
cp -a --reflink=auto "$TREE" "$WORK/root"
mkdir -p "$WORK/root$CT_DIR"
cp "$DEB" "$HERE/jobs.json" "$HERE/jsonq.py" "$WORK/root$CT_DIR/"
chmod -R a+rX "$WORK/root$CT_DIR"
for name in install first-start reload purge; do block "$name" >"$WORK/root$CT_DIR/$name.sh"; done

if ! mountpoint -q /run/systemd/nspawn; then
	mkdir -p /run/systemd/nspawn
	mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn
	MOUNTED_NSPAWN_RUN=1
fi
NSPAWN=(systemd-nspawn -q --register=no --keep-unit -D "$WORK/root" --machine=dtsd-test
        --bind="$ARCHIVES:/var/cache/apt/archives")

say "fetching what the install block needs (not booted, host network, download only)"
quiet '^(Get|Hit|Ign):' "${NSPAWN[@]}" --pipe "${CT_ENV[@]}" bash -euo pipefail -c "
	apt-get update -q
	echo 'APT::Get::Download-Only \"true\";' >/etc/apt/apt.conf.d/90dtsd-test-download
	cd $CT_DIR
	bash -eu install.sh
	rm /etc/apt/apt.conf.d/90dtsd-test-download
	apt-get autoclean -q" </dev/null || fail "fetching failed"

say "booting the container (systemd-nspawn -b, loopback only)"
"${NSPAWN[@]}" -b --private-network >"$WORK/console.log" 2>&1 </dev/null &
NSPAWN_PID=$!
deadline=$((SECONDS + 30))
until CT_PID=$(pgrep -P "$NSPAWN_PID" -x systemd); do
	kill -0 "$NSPAWN_PID" 2>/dev/null || fail "systemd-nspawn exited"
	[ "$SECONDS" -lt "$deadline" ] || fail "no systemd in the container after 30s"
	sleep 0.2
done
wait_for 60 "the container booted" ct systemctl is-system-running --wait
note "container up: systemd pid $CT_PID on the host, $(ct systemctl is-system-running || true)"

# --- 1 ------------------------------------------------------------------------------------
say "1. the install block: PostgreSQL, Redis, etcd and the .deb, offline from the fetched archive"
install_out=$(quiet '^(Selecting|Preparing|Unpacking|Setting up|Processing|\(Reading|Get:|debconf: )' ct_sh "bash -eux install.sh") ||
	fail "the install block failed"
printf '%s\n' "$install_out"
grep -F "dtsd is installed and enabled, but not started" <<<"$install_out" >/dev/null &&
	grep -F "/usr/share/doc/dtsd/README.Debian" <<<"$install_out" >/dev/null ||
	fail "postinst did not say that dtsd is not started and where the first start is"
# README.Debian gives the first-start block of the README, command for command.
readme_debian=$(ct sh -c 'zcat -f /usr/share/doc/dtsd/README.Debian*')
while IFS= read -r line; do
	grep -F -- "${line#sudo }" <<<"$readme_debian" >/dev/null ||
		fail "README.Debian lacks the first-start line: $line"
done < <(block first-start)
note "postinst says dtsd is not started; README.Debian holds every first-start command"
ct_sh "dpkg-query -W -f='\${Package} \${Version} \${Status}\n' dtsd postgresql redis-server etcd-server"
ct_sh "apt-cache policy dtsd"
[ "$(ct systemctl is-active dtsd || true)" = inactive ] || fail "installing started dtsd"
[ "$(ct systemctl is-enabled dtsd)" = enabled ] || fail "dtsd.service is not enabled"
note "installed; dtsd.service enabled and inactive (not started before it is configured)"
ct_sh "getent passwd dtsd; stat -c '%n %a %U:%G' /etc/dtsd/dtsd.ini
	dpkg-query -W -f='\${Conffiles}\n' dtsd
	dtsd config-reference | cmp - /etc/dtsd/dtsd.ini
	refute 'dpkg-query -W -f=\${Depends} dtsd | grep -w supervisor'"
[ "$(ct stat -c '%a %U:%G' /etc/dtsd/dtsd.ini)" = "640 root:dtsd" ] || fail "dtsd.ini is not 0640 root:dtsd"
ct_sh "systemd-analyze verify dtsd.service && echo 'systemd-analyze verify: clean'
	mkdir -p /etc/systemd/system/dtsd.service.d
	cp /usr/share/doc/dtsd/examples/relax-hardening.conf /etc/systemd/system/dtsd.service.d/
	systemd-analyze verify dtsd.service && echo 'systemd-analyze verify with relax-hardening.conf: clean'
	rm -r /etc/systemd/system/dtsd.service.d
"
ct_sh "	man -w dtsd.8 dtsctl.1 dtsd.ini.5
	source /usr/share/bash-completion/completions/dtsctl
	COMP_WORDS=(dtsctl su); COMP_CWORD=1; _dtsctl_completion dtsctl
	[ \"\${COMPREPLY[*]}\" = submit ]"

# --- 2 ------------------------------------------------------------------------------------
say "2. the first-start block"
ct_sh "bash -eux first-start.sh" || fail "the first-start block failed"
started=$(date +%s.%N)
ct_sh "systemctl status --no-pager --lines=0 dtsd"
status_line=$(status_text)
[ "$(ct systemctl is-active dtsd)" = active ] || fail "dtsd is not active after start"
case "$status_line" in *"children 6/6 running"*) ;; *) fail "STATUS= is '$status_line'" ;; esac
grep -F "Status: \"$status_line\"" <<<"$(ct systemctl status --no-pager --lines=0 dtsd)" >/dev/null ||
	fail "systemctl status shows no Status: line"
# READY came from the master once every child ran: systemd's "Started" follows the
# master's "ready" in the journal.
journal=$(ct journalctl -u dtsd -o cat --no-pager)
ready_line=$(grep -n 'children are running: ready' <<<"$journal" | awk -F: 'NR == 1 { print $1 }')
started_line=$(grep -n '^Started dtsd.service' <<<"$journal" | awk -F: 'NR == 1 { print $1 }')
[ -n "$ready_line" ] && [ -n "$started_line" ] && [ "$ready_line" -lt "$started_line" ] ||
	fail "systemd did not wait for the master's READY (ready at line '$ready_line', Started at '$started_line')"
ct_sh "journalctl -u dtsd -o short-precise --no-pager | grep -E 'Starting dtsd|applied|ready|Started dtsd'"
start_usec=$(ct systemctl show -p ExecMainStartTimestampMonotonic --value dtsd)
active_usec=$(ct systemctl show -p ActiveEnterTimestampMonotonic --value dtsd)
note "systemctl start: ExecStart to active took $(( (active_usec - start_usec) / 1000 )) ms (migration, 6 children ready, startsecs)"
ct_sh "systemd-analyze security dtsd | tail -n 1"

# --- 3 ------------------------------------------------------------------------------------
say "3. dtsctl status, the job user, the seed's jobs.json"
# The node record reaches dtsctl through the coordinator, which publishes it every
# [dtsd] housekeeping_interval: it may trail READY by that long.
wait_for 10 "dtsctl status shows 1 coordinator, 2 servers, 2 workers and 1 web child RUNNING" \
	q 'sorted((c["role"], c["state"]) for n in d["nodes"] for c in n["children"]) == sorted(
	[("coordinator", "RUNNING"), ("web", "RUNNING")] + [("server", "RUNNING")] * 2 +
	[("worker", "RUNNING")] * 2)' \
	dtsctl -o json status
note "dtsctl status shows every child RUNNING $(awk -v a="$started" -v b="$(date +%s.%N)" \
	'BEGIN { printf "%.1f", b - a }')s after the first-start block"
ct_sh "dtsctl status"
note "dtsctl status: node $(q 'd["nodes"][0]["node_id"]' dtsctl -o json status) with 6 children RUNNING"
user=$(ct dtsctl submit --follow -- 'id -un; id -u; id -Gn' 2>/dev/null | tr '\n' ' ')
note "dtsctl submit --follow -- id -un; id -u; id -Gn: $user"
[[ "$user" =~ ^dtsd-job-([0-9]+)\ (700[0-9][0-9])\ dtsd-job-[0-9]+\ dtsd-job\ $ ]] ||
	fail "the job did not run as a slot user dtsd-job-N (uid 700NN) with dtsd-job's groups: '$user'"
waited=$(q 'd["job"]["status"] + " " + d["job"]["output"].strip()' dtsctl -o json submit --wait -- whoami)
note "dtsctl -o json submit --wait -- whoami: $waited"
[[ "$waited" =~ ^SUCCEEDED\ dtsd-job-[0-9]+$ ]] || fail "submit --wait: $waited"
# The web child under the packaged unit: ready, and /metrics counts the job that just ran.
http_get() { ct python3 -c 'import sys, urllib.request, urllib.error
try:
    reply = urllib.request.urlopen("http://127.0.0.1:8080" + sys.argv[1], timeout=5)
except urllib.error.HTTPError as exc:
    reply = exc
print(reply.status); print(reply.read().decode(), end="")' "$1"; }
readyz=$(http_get /readyz | tr '\n' ' ')
note "GET /readyz: $readyz"
[ "$readyz" = "200 ready postgres: ok redis: ok " ] || fail "/readyz: $readyz"
finished_metric() { http_get /metrics | grep -E '^dtsd_jobs_finished_total\{outcome="succeeded",queue="default"\} [1-9]'; }
wait_for 10 "/metrics counts the jobs that succeeded" finished_metric
note "GET /metrics: $(finished_metric)"
[ "$(http_get /metrics | grep -c '^dtsd_children{role="web",state="RUNNING"} 1.0$')" = 1 ] ||
	fail "/metrics does not show the web child RUNNING"

# The job's box under the packaged unit: no capability in any set, no_new_privs, and the
# configuration (0640 root:dtsd) out of reach.
privs=$(ct dtsctl submit --follow -- 'grep -E "^(NoNewPrivs|Cap[A-Za-z]+):" /proc/self/status' 2>/dev/null |
	tr -s '\t' ' ' | sort | tr '\n' ' ')
note "a job's /proc/self/status: $privs"
zero=0000000000000000
[ "$privs" = "CapAmb: $zero CapBnd: $zero CapEff: $zero CapInh: $zero CapPrm: $zero NoNewPrivs: 1 " ] ||
	fail "a job holds privileges: $privs"
ini=$(ct dtsctl submit --follow -- 'cat /etc/dtsd/dtsd.ini >/dev/null 2>&1 && echo readable || echo denied' 2>/dev/null)
note "a job reading /etc/dtsd/dtsd.ini: $ini"
[ "$ini" = denied ] || fail "a job can read /etc/dtsd/dtsd.ini"
# What the daemon's own processes hold: the master three capabilities (CAP_SETGID,
# CAP_SETUID, CAP_SETPCAP), each worker's launcher two (CAP_SETGID, CAP_SETUID, with an empty
# bounding set), the servers, the coordinator and the workers none.
for role in master server coordinator worker launcher; do
	case $role in master) pid=$(ct systemctl show -p MainPID --value dtsd) ;;
		*) pid=$(ct pgrep -f -o "dtsd\\.$role ") ;; esac
	caps=$(ct sh -c "grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/$pid/status" | tr -s '\t' ' ' | tr '\n' ' ')
	note "$role (pid $pid): $caps"
	case $role in
		master) want="CapEff: 00000000000001c0 CapBnd: 00000000000001c0 CapAmb: 00000000000001c0 NoNewPrivs: 1 " ;;
		launcher) want="CapEff: 00000000000000c0 CapBnd: $zero CapAmb: $zero NoNewPrivs: 1 " ;;
		*) want="CapEff: $zero CapBnd: $zero CapAmb: $zero NoNewPrivs: 1 " ;;
	esac
	[ "$caps" = "$want" ] || fail "$role holds $caps, expected $want"
done
# Jobs are strangers to each other: another job's processes are invisible (hidepid) and out
# of reach of signals, even with the pid in hand.
victim=$(ct dtsctl submit -- 'echo $$ > /tmp/victim.pid; chmod 644 /tmp/victim.pid; exec sleep 60')
wait_for 30 "the victim job runs" q 'd["jobs"][0]["status"] == "RUNNING"' dtsctl -o json status "$victim"
probe=$(ct dtsctl submit --follow -- 'pid=$(cat /tmp/victim.pid); [ -e /proc/$pid ] && echo seen || echo hidden
	kill -STOP $pid 2>/dev/null && echo stopped || echo refused; ps -e -o comm= | grep -c "^sleep$"; true' 2>/dev/null | tr '\n' ' ')
note "another job probing the victim (pid file, kill -STOP, ps): $probe"
[ "$probe" = "hidden refused 0 " ] || fail "a job reached another job's process: $probe"
[ "$(q 'd["jobs"][0]["status"]' dtsctl -o json status "$victim")" = RUNNING ] || fail "the victim job stopped"
ct dtsctl cancel "$victim" >/dev/null
# Nothing a job started outlives it, however it left the job's session.
escaped=$(ct dtsctl submit --wait -- 'setsid sleep 300 </dev/null >/dev/null 2>&1 & ( ( sleep 301 </dev/null >/dev/null 2>&1 & ) & ); sleep 0.5; echo started' 2>/dev/null)
[ "$escaped" = started ] || fail "the escaping job: $escaped"
wait_for 5 "what the escaping job left to be gone" bash -c "! nsenter -t $CT_PID -a pgrep -f 'sleep 30[01]'"
note "a job's setsid and double-forked children are gone when it ends"
# Redis is out of the jobs' reach: a unix socket only the group redis may open, no TCP.
sock=$(ct stat -c '%a %U:%G' /run/redis/redis-server.sock)
note "Redis socket: $sock; dtsd's groups: $(ct id -nG dtsd)"
[ "$sock" = "770 redis:redis" ] || fail "the Redis socket is $sock, not 770 redis:redis"
redis_probe=$(ct dtsctl submit --follow -- 'redis-cli -s /run/redis/redis-server.sock ping 2>&1; redis-cli -h 127.0.0.1 -p 6379 ping 2>&1; true' 2>/dev/null | tr '\n' ' ')
note "a job pinging Redis (socket, then TCP): $redis_probe"
case "$redis_probe" in *"Permission denied"*"Connection refused"*) ;; *) fail "a job reached Redis: $redis_probe" ;; esac
ct_sh "dtsctl submit --file jobs.json --wait"
ct_sh "dtsctl submit --follow -- 'touch /etc/dtsd/x 2>&1; touch /usr/x 2>&1; ls /home 2>&1; true'"
# Installing the package again runs the maintainer scripts as an upgrade does: the user is
# kept (same uid), and the running daemon is restarted (try-restart).
uid=$(ct id -u dtsd)
old_pid=$(ct systemctl show -p MainPID --value dtsd)
quiet '^(\(Reading|debconf: |WARNING: apt|$)' ct_sh "apt-get install -q --reinstall ./dtsd_*_all.deb" ||
	fail "reinstalling the package failed"
new_pid=$(ct systemctl show -p MainPID --value dtsd)
[ "$(ct id -u dtsd)" = "$uid" ] || fail "reinstalling changed the dtsd user"
[ "$(ct systemctl is-active dtsd)" = active ] && [ "$new_pid" != "$old_pid" ] ||
	fail "reinstalling did not restart dtsd (MainPID $old_pid -> $new_pid)"
note "reinstalled: user dtsd kept (uid $uid), dtsd restarted (MainPID $old_pid -> $new_pid), active"

# --- 4 ------------------------------------------------------------------------------------
say "4. reload with [worker] processes = 3 while a job runs; then stop drains"
survivor=$(ct dtsctl submit -- 'sleep 12; echo survived')
wait_for 30 "the long job runs" q 'd["jobs"][0]["status"] == "RUNNING"' dtsctl -o json status "$survivor"
ct sed -i '/^\[worker\]/,/^\[/ s/^;processes = 2$/processes = 3/' /etc/dtsd/dtsd.ini
ct_sh "sed -n '/^\[worker\]/,/^processes/p' /etc/dtsd/dtsd.ini | tail -n 1"
ct_sh "bash -eux reload.sh" || fail "the reload block failed"
workers='len([c for n in d["nodes"] for c in n["children"] if c["role"] == "worker" and c["state"] == "RUNNING"])'
wait_for 60 "3 workers RUNNING after the reload" q "$workers == 3" dtsctl -o json status
reloaded() { case "$(status_text)" in reloading*) return 1 ;; *"children 7/7 running"*) return 0 ;; esac; return 1; }
wait_for 30 "READY with 7 children after the reload" reloaded
[ "$(ct systemctl is-active dtsd)" = active ] || fail "dtsd is not active after the reload"
note "after reload: $(q "$workers" dtsctl -o json status) workers RUNNING; unit $(ct systemctl is-active dtsd); STATUS=$(status_text)"
wait_for 60 "the long job ends" q 'd["jobs"][0]["status"] not in ("PENDING", "RUNNING")' dtsctl -o json status "$survivor"
result=$(q '"{status} attempts={attempts} output={output}".format(**d["jobs"][0]).strip()' \
	dtsctl -o json status "$survivor")
note "the job that ran across the reload: $result"
[ "$result" = "SUCCEEDED attempts=1 output=survived" ] || fail "the running job did not survive the reload: $result"
ct_sh "journalctl -u dtsd -o cat --no-pager | grep -E 'reload|HUP' | tail -n 5"

# A reload runs every start check: an exposed listen address without tokens or TLS is
# refused, the running configuration stays, and `systemctl reload` reports the failure.
ct sed -i 's/^;listen = 127.0.0.1:50051$/listen = 0.0.0.0:50051/' /etc/dtsd/dtsd.ini
if ct systemctl reload dtsd; then fail "a reload to 0.0.0.0 without tokens or TLS succeeded"; fi
refused=$(ct journalctl -u dtsd -p err -o cat --no-pager | grep -c 'reload refused' || true)
note "reload to 0.0.0.0:50051 refused: ReloadResult=$(ct systemctl show -p ReloadResult --value dtsd), $refused error line(s) in the journal, unit $(ct systemctl is-active dtsd)"
[ "$refused" -ge 1 ] || fail "no 'reload refused' line at error priority in the journal"
[ "$(ct systemctl is-active dtsd)" = active ] || fail "dtsd is not active after a refused reload"
[ "$(ct dtsctl -o json status | ct python3 "$CT_DIR/jsonq.py" 'len(d["nodes"])')" = 1 ] ||
	fail "dtsctl status does not answer on 127.0.0.1 after the refused reload"
ct sed -i 's/^listen = 0.0.0.0:50051$/;listen = 127.0.0.1:50051/' /etc/dtsd/dtsd.ini
# A file that does not parse: refused the same way, `systemctl reload` fails.
ct sed -i '/^\[worker\]/,/^\[/ s/^processes = 3$/processes = many/' /etc/dtsd/dtsd.ini
if ct systemctl reload dtsd; then fail "a reload with [worker] processes = many succeeded"; fi
reload_result=$(ct systemctl show -p ReloadResult --value dtsd)
note "reload with [worker] processes = many: ReloadResult=$reload_result, unit $(ct systemctl is-active dtsd)"
[ "$reload_result" = exit-code ] || fail "a refused reload left ReloadResult=$reload_result"
errors=$(ct journalctl -u dtsd -p err -o cat --no-pager)
grep -F "[worker] processes: not a whole number: 'many'" <<<"$errors" >/dev/null ||
	fail "the journal does not say why the reload with processes = many was refused"
[ "$(ct systemctl is-active dtsd)" = active ] || fail "dtsd is not active after a refused reload"
# Back to 2 workers while jobs run: `systemctl reload` returns only once the worker that
# goes has drained and exited (it returned at once, with the status still 'reloading').
# (dtsctl reads dtsd.ini too, and refuses a file that does not parse: fixed first.)
ct sed -i '/^\[worker\]/,/^\[/ s/^processes = many$/;processes = 2/' /etc/dtsd/dtsd.ini
for _ in 1 2 3 4 5 6; do ct dtsctl submit -- 'sleep 4' >/dev/null; done
reload_start=$(date +%s.%N)
ct systemctl reload dtsd || fail "the reload back to the shipped file failed"
reload_took=$(awk -v a="$reload_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
at_return=$(ct python3 -c 'import json; r = json.load(open("/run/dtsd/node.json")); print(r["state"], sorted(c["role"] + ":" + c["state"] for c in r["children"] if c["role"] == "worker"))')
note "reload to 2 workers returned after ${reload_took}s: node $at_return; STATUS=$(status_text)"
[ "$at_return" = "running ['worker:RUNNING', 'worker:RUNNING']" ] ||
	fail "systemctl reload returned before the reload was done: $at_return"
case "$(status_text)" in reloading*) fail "STATUS= still says reloading after systemctl reload returned" ;; esac
[ "$(ct systemctl show -p ReloadResult --value dtsd)" = success ] || fail "ReloadResult is not success"
stamped=$(ct journalctl -u dtsd -o cat --no-pager | grep -cE '^20[0-9]{2}-[0-9]{2}-[0-9]{2} ' || true)
[ "$stamped" = 0 ] || fail "$stamped journal line(s) of dtsd carry a timestamp of their own"

drained=$(ct dtsctl submit -- 'sleep 6; echo drained')
wait_for 30 "the job to drain runs" q 'd["jobs"][0]["status"] == "RUNNING"' dtsctl -o json status "$drained"
stop_start=$SECONDS
ct systemctl stop dtsd
stop_took=$((SECONDS - stop_start))
note "systemctl stop dtsd took ${stop_took}s; unit $(ct systemctl is-active dtsd || true)"
[ "$(ct systemctl is-active dtsd || true)" = inactive ] || fail "dtsd is not inactive after stop"
drained_row=$(ct runuser -u postgres -- psql -d dtsd -Atc "SELECT status || ' attempts=' || attempts FROM jobs WHERE id = '$drained'")
note "the job running at stop: $drained_row"
[ "$drained_row" = "SUCCEEDED attempts=1" ] || fail "stop did not let the running job finish: $drained_row"
ct_sh "journalctl -u dtsd -o short-precise --no-pager | grep -E 'graceful stop|STOPPING|stopped|Stopping|Stopped|Deactivated' | tail -n 8"
journal=$(ct journalctl -u dtsd -o cat --no-pager)
grep -E 'SIGTERM: graceful stop' <<<"$journal" >/dev/null && grep 'master stopped' <<<"$journal" >/dev/null ||
	fail "the journal lacks the master's log of the stop"
ct pgrep -u dtsd >/dev/null && fail "processes of dtsd are left after stop: $(ct pgrep -a -u dtsd)"
note "journalctl -u dtsd holds $(ct journalctl -u dtsd -o cat --no-pager | wc -l) lines"

# --- 5 ------------------------------------------------------------------------------------
say "5. a broken file at start exits 78 and is not restarted; then kill -9 of the master"
ct sed -i 's/^;processes = 2$/processes = many/' /etc/dtsd/dtsd.ini
if ct systemctl start dtsd; then fail "dtsd started with [worker] processes = many"; fi
sleep 7     # RestartSec=5s: a restart would have happened by now
note "broken file: ExecMainStatus=$(ct systemctl show -p ExecMainStatus --value dtsd), NRestarts=$(ct systemctl show -p NRestarts --value dtsd), $(ct systemctl is-active dtsd || true)"
[ "$(ct systemctl show -p ExecMainStatus --value dtsd)" = 78 ] || fail "a configuration error did not exit 78"
[ "$(ct systemctl show -p NRestarts --value dtsd)" = 0 ] || fail "systemd restarted dtsd on a configuration error"
ct sed -i 's/^processes = many$/;processes = 2/' /etc/dtsd/dtsd.ini
ct systemctl reset-failed dtsd
ct systemctl start dtsd
ct python3 -c 'import json; print(json.dumps({"jobs": [{"name": f"q{i}", "command": f"sleep 2; echo {i}", "description": "queued"} for i in range(30)]}))' \
	>"$WORK/root$CT_DIR/queued.json"
ids=$(q '" ".join(j["id"] for j in d["jobs"])' dtsctl -o json submit --file "$CT_DIR/queued.json")
# shellcheck disable=SC2086
wait_for 30 "some queued jobs run" q 'any(j["status"] == "RUNNING" for j in d["jobs"])' dtsctl -o json status $ids
# shellcheck disable=SC2086
note "before the kill: $(q 'str({s: sum(j["status"] == s for j in d["jobs"]) for s in ("PENDING", "RUNNING", "SUCCEEDED")})' dtsctl -o json status $ids)"
old_pid=$(ct systemctl show -p MainPID --value dtsd)
ct kill -9 "$old_pid"
note "killed master pid $old_pid"
restarted() {
	local pid
	pid=$(ct systemctl show -p MainPID --value dtsd)
	[ "$pid" != 0 ] && [ "$pid" != "$old_pid" ] && [ "$(ct systemctl is-active dtsd)" = active ]
}
wait_for 60 "systemd restarts dtsd" restarted
note "restarted: MainPID $(ct systemctl show -p MainPID --value dtsd), NRestarts=$(ct systemctl show -p NRestarts --value dtsd), $(ct systemctl is-active dtsd)"
ct_sh "journalctl -u dtsd -o short-precise --no-pager | grep -E 'code=killed|Failed with|Scheduled restart|Started' | tail -n 4"
# shellcheck disable=SC2086
wait_for 120 "every queued job SUCCEEDED" q 'all(j["status"] == "SUCCEEDED" for j in d["jobs"])' dtsctl -o json status $ids
# shellcheck disable=SC2086
note "after the restart: $(q 'str({"SUCCEEDED": sum(j["status"] == "SUCCEEDED" for j in d["jobs"]), "attempts": sorted(set(j["attempts"] for j in d["jobs"]))})' dtsctl -o json status $ids)"

# The documented drop-in loosens the sandbox: with it, a job sees /home.
ct_sh "mkdir -p /etc/systemd/system/dtsd.service.d
	cp /usr/share/doc/dtsd/examples/relax-hardening.conf /etc/systemd/system/dtsd.service.d/
	systemctl daemon-reload && systemctl restart dtsd
	dtsctl submit --follow -- 'ls -ld /home'
	systemd-analyze security dtsd | tail -n 1
	rm -r /etc/systemd/system/dtsd.service.d && systemctl daemon-reload" ||
	fail "dtsd does not run with relax-hardening.conf"

# --- 6 ------------------------------------------------------------------------------------
say "6. the purge block, after \`dtsd token add\` made /etc/dtsd/tokens and /run/dtsd/tokens.lock"
# As the README's Security section has it, with the service stopped: the lock in /run/dtsd
# then outlives the service's runtime directory.
ct systemctl stop dtsd
printf '[server]\ntokens_file = /etc/dtsd/tokens\n' >"$WORK/root$CT_DIR/tokens.ini"
ct dtsd token add purge-check --role read -c "$CT_DIR/tokens.ini" >/dev/null
ct_sh "ls -l /etc/dtsd/tokens /run/dtsd/tokens.lock"
quiet '^\(Reading' ct_sh "bash -eux purge.sh" || fail "the purge block failed"
ct_sh "refute 'dpkg-query -W -f=\${db:Status-Abbrev} dtsd 2>/dev/null | grep -E ^i'
	refute '[ -e /etc/dtsd ] || [ -e /var/lib/dtsd ] || [ -e /run/dtsd ]'
	refute '[ -e /lib/systemd/system/dtsd.service ] || compgen -G \"/etc/systemd/system/*/dtsd.service\"'
	refute 'systemctl list-unit-files dtsd.service | grep dtsd'
	refute 'systemctl is-active dtsd'
	refute 'ps -u dtsd -o pid=,args='
	refute 'dpkg-statoverride --list /etc/dtsd/dtsd.ini'
	getent passwd dtsd" || fail "purge left something behind"
note "purged: no /etc/dtsd, /var/lib/dtsd, /run/dtsd, unit or dtsd process; the dtsd user stays"

say "test-deb passed in $((SECONDS - START))s"
