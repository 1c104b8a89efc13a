package guestmem

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Guest RAM without a monitor (kvmscope attach --pid P, no QMP).
//
// QEMU allocates a PC machine's RAM as one block of exactly the size -m
// names (anonymous memory, or the memory backend's memfd or file), and
// maps it in one piece. The machine shows the block's first `below` bytes
// at guest-physical 0 and the rest at 4 GiB, above the PCI hole; `below`
// follows from the machine type, its version and max-ram-below-4g (ramSplit).
// The map is then checked by finding the kernel where it says, and by the
// firmware's memory map the guest kernel kept (e820): both the caller's
// job (session discovery, session.CheckMemoryMap).

// maxInferredRAM bounds the guests whose map is inferred: from 1 TiB on,
// QEMU may move RAM above 4 GiB further up, past AMD's HyperTransport
// hole (pc_memory_init), by rules this does not follow.
const maxInferredRAM = 1000 << 30

// ErrNoInferredMap wraps every reason InferMap gives up.
var ErrNoInferredMap = errors.New("no guest memory map without a monitor")

// NewInferred returns the source for QEMU pid with its guest RAM found
// from its command line and /proc/PID/maps alone, and no monitor: it reads
// (and with allowWrite writes) memory, and has no registers.
func NewInferred(pid int, allowWrite bool) (*TCG, error) {
	rs, err := inferMap(pid)
	if err != nil {
		return nil, err
	}
	return &TCG{pid: func() int { return pid }, write: allowWrite, ranges: rs, fixed: true}, nil
}

// inferMap finds guest RAM in QEMU pid's address space.
func inferMap(pid int) ([]procRange, error) {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, fmt.Errorf("%w: QEMU %d: %w", ErrNoInferredMap, pid, err)
	}
	argv := strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00")
	size, err := ramSize(argv)
	if err != nil {
		return nil, fmt.Errorf("%w: QEMU %d: %w", ErrNoInferredMap, pid, err)
	}
	if size > maxInferredRAM {
		return nil, fmt.Errorf("%w: QEMU %d has %d GiB of RAM, which QEMU may place past the HyperTransport hole: give kvmscope its monitor (--qmp or --vm)", ErrNoInferredMap, pid, size>>30)
	}
	below, err := ramSplit(argv, size)
	if err != nil {
		return nil, fmt.Errorf("%w: QEMU %d: %w", ErrNoInferredMap, pid, err)
	}
	maps, err := readProcMaps(pid)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoInferredMap, err)
	}
	var found []procMapping
	for _, m := range maps {
		if m.End-m.Start != size || !strings.HasPrefix(m.Perms, "rw") {
			continue
		}
		// Anonymous RAM has no path; a backend's is its memfd or file.
		if m.Path == "" || m.isSharedMemfd() || strings.HasPrefix(m.Perms, "rw-s") {
			found = append(found, m)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("%w: QEMU %d has no %d MiB read-write mapping (is it QEMU, with this -m?)", ErrNoInferredMap, pid, size>>20)
	case 1:
	default:
		return nil, fmt.Errorf("%w: QEMU %d has %d mappings of %d MiB: which is guest RAM is not known: give kvmscope its monitor (--qmp or --vm)", ErrNoInferredMap, pid, len(found), size>>20)
	}
	rs := []procRange{{GPA: 0, Size: below, HVA: found[0].Start, Name: "ram below 4g (inferred)"}}
	if below < size {
		rs = append(rs, procRange{GPA: 4 << 30, Size: size - below, HVA: found[0].Start + below, Name: "ram above 4g (inferred)"})
	}
	return rs, nil
}

// ramSplit is how many bytes of size RAM a PC machine puts below 4 GiB
// (the rest goes at 4 GiB), as QEMU computes it (hw/i386/pc_piix.c
// pc_init1, pc_q35.c pc_q35_init):
//   - i440fx ("pc", "pc-i440fx-X.Y"): up to max-ram-below-4g (default
//     3.5 GiB) when RAM fits; when it does not, at most 3 GiB, so that
//     guest addresses aligned at 1 GiB stay aligned in the host
//     ("gigabyte_align", every machine version since 2.0);
//   - q35 ("q35", "pc-q35-X.Y"): all of it below 2.75 GiB, else 2 GiB;
//     either at most max-ram-below-4g.
//
// Other machine types, and i440fx versions before 2.0, are refused.
func ramSplit(argv []string, size uint64) (uint64, error) {
	typ, maxBelow, err := machineOpts(argv)
	if err != nil {
		return 0, err
	}
	var lowmem uint64
	switch {
	case typ == "pc" || strings.HasPrefix(typ, "pc-i440fx-") && !strings.HasPrefix(typ, "pc-i440fx-1."):
		if maxBelow == 0 {
			maxBelow = 0xe0000000
		}
		lowmem = maxBelow
		if size >= maxBelow && lowmem > 0xc0000000 {
			lowmem = 0xc0000000
		}
	case typ == "q35" || strings.HasPrefix(typ, "pc-q35-"):
		lowmem = 0xb0000000
		if size >= 0xb0000000 {
			lowmem = 0x80000000
		}
		if maxBelow != 0 && lowmem > maxBelow {
			lowmem = maxBelow
		}
	default:
		if size <= 2<<30 {
			// Every x86 machine keeps its first 2 GiB of RAM at 0.
			return size, nil
		}
		return 0, fmt.Errorf("machine type %q: where it puts RAM above 2 GiB is not known: give kvmscope its monitor (--qmp or --vm)", typ)
	}
	return min(size, lowmem), nil
}

// machineOpts reads QEMU's machine type and max-ram-below-4g (0: not
// given) from its argv: "-machine q35,accel=kvm", "-M pc", "-machine
// type=pc-q35-7.2,max-ram-below-4g=2G"; the last -machine naming a type
// wins, as in QEMU. No -machine is "pc", qemu-system-x86_64's default.
func machineOpts(argv []string) (typ string, maxBelow uint64, err error) {
	typ = "pc"
	for i := 1; i < len(argv); i++ {
		a := strings.TrimPrefix(strings.TrimPrefix(argv[i], "-"), "-")
		if !strings.HasPrefix(argv[i], "-") || a != "machine" && a != "M" || i+1 >= len(argv) {
			continue
		}
		i++
		for j, part := range strings.Split(argv[i], ",") {
			k, v, kv := strings.Cut(part, "=")
			switch {
			case j == 0 && !kv:
				typ = part
			case k == "type":
				typ = v
			case k == "max-ram-below-4g":
				if maxBelow, err = parseBytes(v); err != nil {
					return "", 0, fmt.Errorf("-machine max-ram-below-4g=%q: %v", v, err)
				}
			}
		}
	}
	if typ == "" {
		return "", 0, errors.New("-machine names no machine type")
	}
	return typ, maxBelow, nil
}

// ramSize reads QEMU's -m from its argv: "-m 512", "-m 512M", "-m 2G",
// "-m size=524288k,slots=..." (libvirt), "-m=512" (MiB when no suffix).
// Guests whose RAM is NUMA nodes or several backends are refused.
func ramSize(argv []string) (uint64, error) {
	var m string
	for i := 1; i < len(argv); i++ {
		if !strings.HasPrefix(argv[i], "-") {
			continue
		}
		// QEMU takes -opt and --opt alike.
		a := strings.TrimPrefix(strings.TrimPrefix(argv[i], "-"), "-")
		switch {
		case a == "numa":
			return 0, errors.New("its RAM is NUMA nodes (-numa)")
		case a == "m":
			if i+1 < len(argv) {
				m = argv[i+1]
				i++
			}
		case strings.HasPrefix(a, "m="):
			m = strings.TrimPrefix(a, "m=")
		}
	}
	if m == "" {
		return 128 << 20, nil // QEMU's default
	}
	for _, part := range strings.Split(m, ",") {
		if v, ok := strings.CutPrefix(part, "size="); ok {
			return parseSize(v)
		}
		if !strings.Contains(part, "=") {
			return parseSize(part)
		}
	}
	return 0, fmt.Errorf("-m %q names no size", m)
}

// parseSize reads a QEMU size as -m takes it: a number of MiB, or one with
// a k/M/G/T suffix (of 1024).
func parseSize(s string) (uint64, error) { return parseSizeIn(s, 1<<20) }

// parseBytes reads a QEMU size property: bytes, or k/M/G/T.
func parseBytes(s string) (uint64, error) { return parseSizeIn(s, 1) }

// parseSizeIn reads a size whose plain number counts units of mult.
func parseSizeIn(s string, mult uint64) (uint64, error) {
	s = strings.TrimSpace(s)
	if n := len(s); n > 0 {
		if shift := strings.IndexByte("KMGT", s[n-1]&^0x20); shift >= 0 && s[n-1] >= 'A' {
			mult, s = 1<<(10*(shift+1)), s[:n-1]
		}
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || v == 0 || v > (1<<50)/mult {
		return 0, fmt.Errorf("bad RAM size %q", s)
	}
	return v * mult, nil
}

// errNoMonitor is the registers of a source without a monitor.
var errNoMonitor = errors.New("no registers: attached without a monitor (--qmp, --vm) or a trace (--ptrace)")
