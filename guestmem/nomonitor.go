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
// QEMU allocates a machine's RAM as one block of exactly the size -m
// names (anonymous memory, or the memory backend's memfd or file), and
// maps it in one piece. Below the PCI hole (under 2 GiB for every PC
// machine type) guest-physical address A is that block's byte A; above,
// the split depends on the machine type and version, so larger guests are
// refused here rather than guessed. The map is then checked by finding
// the kernel where it says (the caller's job: session discovery).

// maxInferredRAM is the largest guest whose map is inferred: pc and q35
// both keep RAM below 2 GiB in one piece.
const maxInferredRAM = 2 << 30

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
		return nil, fmt.Errorf("%w: QEMU %d: %v", ErrNoInferredMap, pid, err)
	}
	size, err := ramSize(strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00"))
	if err != nil {
		return nil, fmt.Errorf("%w: QEMU %d: %v", ErrNoInferredMap, pid, err)
	}
	if size > maxInferredRAM {
		return nil, fmt.Errorf("%w: QEMU %d has %d MiB of RAM, split around the PCI hole by rules of its machine type: give kvmscope its monitor (--qmp or --vm)", ErrNoInferredMap, pid, size>>20)
	}
	maps, err := readProcMaps(pid)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoInferredMap, err)
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
	return []procRange{{GPA: 0, Size: size, HVA: found[0].Start, Name: "ram (inferred)"}}, nil
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

// parseSize reads a QEMU size: a number of MiB, or one with a k/M/G/T
// suffix (of 1024).
func parseSize(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	mult := uint64(1 << 20)
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
