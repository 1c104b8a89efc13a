#!/bin/sh
# The nested-KVM lab's /init in L1 (internal/kvmlab). It loads the kernel's
# own kvm and kvm-amd, runs each job of /lab/jobs with its verdicts and
# output framed on /dev/ttyS1, copies the run record there and powers off.
# Everything it says to the host goes to ttyS1; the console (ttyS0) only
# carries the kernel's and the tests' noise.
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
/bin/busybox mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# The root file system is already in RAM and writable; a tmpfs on /tmp
# would hide a repository that lives under /tmp on the host.
mkdir -p /tmp
chmod 1777 /tmp
res=/dev/ttyS1
stty -F $res raw -echo 115200 2>/dev/null
say() { echo "$*" >$res; }
off() { sync; poweroff -f; reboot -f; }
say "KVMLAB-BOOTED $(uname -r)"

# The modules come from the same package as this kernel
# (scripts/fetch-guests.sh keeps them).
for m in irqbypass kvm kvm-amd; do
	case " $(cat /proc/cmdline) " in *" kvmlab.nokvm "*) say "KVMLAB-NOKVM kvmlab.nokvm on the kernel command line: modules not loaded"; off ;; esac
	if ! out=$(insmod /lab/modules/$m.ko 2>&1); then
		say "KVMLAB-NOKVM insmod $m.ko: $out $(dmesg | grep -i -e kvm -e svm | tail -n 2 | tr "\n" " " | sed "s/ *$//")"
		off
	fi
done
if [ ! -c /dev/kvm ]; then
	say "KVMLAB-NOKVM modules loaded but no /dev/kvm: $(dmesg | grep -i kvm | tail -n 2 | tr "\n" " " | sed "s/ *$//")"
	off
fi
# Debian's udev rule, as scripts/setup.sh applies it on the host.
chgrp kvm /dev/kvm
chmod 0660 /dev/kvm
say "KVMLAB-KVM ok"

export HOME=/root TMPDIR=/tmp KVMSCOPE_IN_LAB=1 KVMSCOPE_RECORD=/lab/record.jsonl \
	KVMSCOPE_BIN_DIR=/lab/bin KVMSCOPE_CACHE=/lab/cache
: >/lab/record.jsonl
# A job line: NAME DIR BINARY TIMEOUT RUN BENCH BENCHTIME ENV ('-' for none).
while read -r name dir bin timeout run bench benchtime env; do
	set -- -test.v=test2json -test.count=1 -test.timeout="$timeout" -test.run="$run"
	[ "$bench" = - ] || set -- "$@" -test.bench="$bench" -test.benchtime="$benchtime"
	[ "$env" = - ] && env=
	say "KVMLAB-BEGIN $name"
	(cd "$dir" && exec env $(echo "$env" | tr ',' ' ') "/lab/bin/$bin" "$@") >$res 2>&1 </dev/null
	rc=$?
	say ""
	say "KVMLAB-END $name $rc"
done </lab/jobs
say "KVMLAB-RECORD-BEGIN"
cat /lab/record.jsonl >$res
say "KVMLAB-RECORD-END"
say "KVMLAB-DONE"
off
