#!/bin/sh
# Builds the tiny test guest: build.sh [OUTDIR] -> OUTDIR/tinyguest.elf
# (OUTDIR defaults to ./build beside this script). Needs only binutils.
#
# The code is 32- and 64-bit mixed, which only a 64-bit object can hold
# (32-bit ELF has no relocation for sign-extended 64-bit addressing), but
# QEMU's multiboot loader takes only ELF32 ("Cannot load x86-64 image, give a
# 32bit one"). So: assemble and link as ELF64, then convert to ELF32; every
# loaded address is below 4 GiB, so nothing is lost.
set -eu
src=$(cd "$(dirname "$0")" && pwd)
out=${1:-$src/build}
mkdir -p "$out"
"${AS:-as}" --64 -o "$out/guest.o" "$src/guest.s"
"${LD:-ld}" -m elf_x86_64 -nostdlib -static --build-id=none \
	-T "$src/guest.ld" -o "$out/tinyguest64.elf" "$out/guest.o"
"${OBJCOPY:-objcopy}" -O elf32-i386 "$out/tinyguest64.elf" "$out/tinyguest.elf"
rm -f "$out/guest.o"
