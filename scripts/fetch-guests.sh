#!/usr/bin/env bash
# fetch-guests.sh fetches the real Linux guests kvmscope's tests boot under
# QEMU (TCG) and builds their busybox initramfs. Idempotent: files already in
# the cache are kept.
#
# Output (in $KVMSCOPE_GUESTS, default <repo>/.cache/guests):
#   debian/vmlinuz       Debian's newest linux-image-6.1.*-cloud-amd64 (BTF, KASLR, PTI)
#   debian/System.map    its symbol map (from the -dbg package) and
#   debian/config        debian/config its .config: for cross-checks in
#                        tests only; kvmscope never reads them
#   debian/version       the package name and version
#   debian/modules/      three small modules of it, for the lsmod tests
#   debian/kvm-modules/  its irqbypass, kvm and kvm-amd, for the nested-KVM lab
#   gokrazy/vmlinuz      github.com/gokrazy/kernel.amd64@latest (Linux 7.x, no BTF)
#   gokrazy/version      the module version
#   initramfs.cpio.gz    busybox (from busybox-static) with scripts/initramfs/init
#
# Needs: apt-get, dpkg-deb, go, cpio, gzip, and busybox-static (installed
# with apt-get when missing).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${KVMSCOPE_GUESTS:-$root/.cache/guests}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
work=$(mktemp -d)
# apt-get download runs as the _apt user when it can.
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

log() { echo "fetch-guests: $*" >&2; }

# apt_try runs an apt command, refreshing the package lists once if it fails
# (a fresh machine has stale or no lists).
apt_updated=
apt_try() {
	if "$@"; then return 0; fi
	if [ -z "$apt_updated" ]; then
		log "apt failed; running apt-get update once"
		apt-get update -qq
		apt_updated=1
		"$@"
		return
	fi
	return 1
}

debian_pkg() {
	# The meta-package's candidate depends on the newest ABI's image
	# (linux-image-6.1.0-NN-cloud-amd64).
	apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

fetch_debian() {
	local d=$dest/debian
	if [ -s "$d/vmlinuz" ] && [ -s "$d/System.map" ] && [ -s "$d/config" ] && [ -s "$d/modules/dummy.ko" ] && [ -s "$d/kvm-modules/kvm-amd.ko" ]; then
		log "debian: have $(cat "$d/version" 2>/dev/null)"
		return
	fi
	local pkg
	pkg=$(debian_pkg)
	if [ -z "$pkg" ]; then
		apt-get update -qq
		apt_updated=1
		pkg=$(debian_pkg)
	fi
	[ -n "$pkg" ] || { log "no linux-image-cloud-amd64 in apt"; exit 1; }
	case $pkg in linux-image-6.1.*) ;; *) log "unexpected kernel package $pkg (want 6.1)"; exit 1 ;; esac
	log "debian: downloading $pkg"
	(cd "$work" && apt_try apt-get download -q -o APT::Sandbox::User=root "$pkg")
	local deb
	deb=$(ls "$work"/"$pkg"_*.deb)
	mkdir -p "$work/deb" "$d"
	dpkg-deb -x "$deb" "$work/deb"
	cp "$work"/deb/boot/vmlinuz-* "$d/vmlinuz.tmp"
	# A few small modules the offsets tests load in the guest, to check
	# lsmod against the guest's /proc/modules.
	mkdir -p "$d/modules"
	for m in drivers/net/dummy.ko lib/crc7.ko lib/crc-itu-t.ko; do
		cp "$work"/deb/lib/modules/*/kernel/$m "$d/modules/"
	done
	# KVM itself, for the nested-KVM lab (internal/kvmlab): this kernel
	# boots as L1 under TCG with SVM and loads them to offer /dev/kvm.
	# Apart from modules/, which the lsmod tests load in every guest.
	mkdir -p "$d/kvm-modules"
	for m in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko; do
		cp "$work"/deb/lib/modules/*/kernel/$m "$d/kvm-modules/"
	done
	# The image package's System.map is a placeholder; the real one is
	# near the start of the (large) -dbg package: stop reading at it.
	log "debian: downloading ${pkg}-dbg for System.map"
	(cd "$work" && apt_try apt-get download -q -o APT::Sandbox::User=root "${pkg}-dbg")
	local dbg
	dbg=$(ls "$work"/"${pkg}-dbg"_*.deb)
	(dpkg-deb --fsys-tarfile "$dbg" 2>/dev/null || true) |
		tar -xO --occurrence=1 --wildcards './usr/lib/debug/boot/System.map-*' >"$d/System.map"
	rm -f "$dbg"
	grep -q ' T _text$' "$d/System.map" || { log "debian: no usable System.map in ${pkg}-dbg"; exit 1; }
	cp "$work"/deb/boot/config-* "$d/config"
	dpkg-deb -f "$deb" Package Version | tr '\n' ' ' >"$d/version"
	echo >>"$d/version"
	mv "$d/vmlinuz.tmp" "$d/vmlinuz"
	rm -f "$deb"
	log "debian: $(cat "$d/version")"
}

# fetch_debian612 fetches Debian's 6.12 cloud kernel (bookworm backports
# it): a real kernel with the kallsyms layout of 6.4 and later.
fetch_debian612() {
	local d=$dest/debian-6.12
	if [ -s "$d/vmlinuz" ]; then
		log "debian-6.12: have $(cat "$d/version" 2>/dev/null)"
		return
	fi
	local pkg
	pkg=$(apt-cache depends linux-image-6.12-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-6\.12/ { print $2; exit }')
	if [ -z "$pkg" ]; then
		apt-get update -qq
		apt_updated=1
		pkg=$(apt-cache depends linux-image-6.12-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-6\.12/ { print $2; exit }')
	fi
	[ -n "$pkg" ] || { log "debian-6.12: no linux-image-6.12-cloud-amd64 in apt"; exit 1; }
	log "debian-6.12: downloading $pkg"
	(cd "$work" && apt_try apt-get download -q -o APT::Sandbox::User=root "$pkg")
	local deb
	deb=$(ls "$work"/"$pkg"_*.deb)
	mkdir -p "$work/deb612" "$d"
	dpkg-deb -x "$deb" "$work/deb612"
	cp "$work"/deb612/boot/vmlinuz-* "$d/vmlinuz.tmp"
	dpkg-deb -f "$deb" Package Version | tr '\n' ' ' >"$d/version"
	echo >>"$d/version"
	mv "$d/vmlinuz.tmp" "$d/vmlinuz"
	rm -f "$deb"
	log "debian-6.12: $(cat "$d/version")"
}

fetch_gokrazy() {
	local d=$dest/gokrazy
	if [ -s "$d/vmlinuz" ]; then
		log "gokrazy: have $(cat "$d/version" 2>/dev/null)"
		return
	fi
	mkdir -p "$d"
	log "gokrazy: go mod download github.com/gokrazy/kernel.amd64@latest"
	local json dir ver
	# Outside any module so the project's go.mod is untouched.
	json=$(cd "$work" && GO111MODULE=on GOFLAGS=-mod=mod go mod download -json github.com/gokrazy/kernel.amd64@latest)
	dir=$(printf '%s' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
	ver=$(printf '%s' "$json" | sed -n 's/^[[:space:]]*"Version": "\(.*\)",*$/\1/p')
	[ -s "$dir/vmlinuz" ] || { log "gokrazy: no vmlinuz in $dir"; exit 1; }
	cp "$dir/vmlinuz" "$d/vmlinuz.tmp"
	chmod 644 "$d/vmlinuz.tmp"
	echo "github.com/gokrazy/kernel.amd64 $ver" >"$d/version"
	mv "$d/vmlinuz.tmp" "$d/vmlinuz"
	log "gokrazy: $ver"
}

build_initramfs() {
	local out=$dest/initramfs.cpio.gz
	local src=$root/scripts/initramfs
	# Rebuild when a file in scripts/initramfs is newer than the image.
	if [ -s "$out" ] && [ -z "$(find "$src" -newer "$out" -print -quit)" ]; then
		log "initramfs: up to date"
		return
	fi
	if ! dpkg -s busybox-static >/dev/null 2>&1; then
		log "installing busybox-static"
		apt_try apt-get install -y -q busybox-static
	fi
	local bb
	bb=$(dpkg -L busybox-static | grep -m1 '/busybox$')
	local r=$work/initramfs
	mkdir -p "$r"/{bin,sbin,proc,sys,dev,tmp,etc,root}
	cp "$bb" "$r/bin/busybox"
	for applet in $("$r/bin/busybox" --list); do
		[ -e "$r/bin/$applet" ] || ln -s busybox "$r/bin/$applet"
	done
	install -m 755 "$src/init" "$r/init"
	# Scripts, not busybox symlinks: busybox picks its applet from argv[0],
	# while the kernel sets comm from the executed file's name.
	install -m 755 "$src/kvm-uid1000" "$src/kvm-odd_name.x" "$src/crypto-miner" "$r/bin/"
	printf 'root:x:0:0:root:/root:/bin/sh\nkvmuser:x:1000:1000:kvmscope test:/tmp:/bin/sh\n' >"$r/etc/passwd"
	printf 'root:x:0:\nkvmuser:x:1000:\n' >"$r/etc/group"
	# Reproducible: fixed mtimes, inode numbers and no gzip timestamp.
	find "$r" -exec touch -h -d @0 {} +
	(cd "$r" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --reproducible -R 0:0) | gzip -9n >"$out.tmp"
	mv "$out.tmp" "$out"
	log "initramfs: $out"
}

case ${1:-all} in
all) fetch_debian; fetch_debian612; fetch_gokrazy; build_initramfs ;;
debian) fetch_debian ;;
debian-6.12) fetch_debian612 ;;
gokrazy) fetch_gokrazy ;;
initramfs) build_initramfs ;;
*) echo "usage: $0 [all|debian|debian-6.12|gokrazy|initramfs]" >&2; exit 2 ;;
esac
