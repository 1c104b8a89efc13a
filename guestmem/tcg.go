package guestmem

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// TCG is a running QEMU guest without KVM (the TCG accelerator), reached
// through QMP: QEMU tells where guest RAM lives in its address space
// (`info mtree -f`, `gpa2hva`) and memory is then read directly from the
// QEMU process like the KVM source does; registers come from
// `info registers -a`. Guest RAM that QEMU backs with a memfd is read
// from our own read-only mapping of it, as the KVM source does (memfd.go):
// a scan makes thousands of small reads, and each process_vm_readv is a
// system call that pins QEMU's pages.
type TCG struct {
	qmp   Monitor
	pid   func() int
	write bool
	memfd memfdRAM

	mu      sync.Mutex
	ranges  []procRange
	fetched time.Time
	fixed   bool // ranges came without a monitor (NewMapped): never asked again
}

// NewTCG returns the source for the QEMU process pid() whose monitor is
// qmp.
func NewTCG(qmp Monitor, pid func() int, allowWrite bool) *TCG {
	return &TCG{qmp: qmp, pid: pid, write: allowWrite}
}

func (t *TCG) memoryMap(refresh bool) ([]procRange, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	// Guest RAM does not move once QEMU has set it up, so the map is asked
	// for once and again only when a read hits a hole (ROM remapping early
	// in boot, hotplug). Never on a timer: while QEMU is paused for a
	// consistent scan or a dump it cannot answer QMP.
	if t.fixed || !refresh && t.ranges != nil {
		return t.ranges, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rs, err := qmpMemoryMap(ctx, t.qmp)
	if err != nil {
		return nil, err
	}
	t.ranges, t.fetched = rs, time.Now()
	return rs, nil
}

// flatRange matches a line of `info mtree -f`:
// "  0000000000100000-000000001fffffff (prio 0, ram): pc.ram @0000000000100000 KVM"
var flatRange = regexp.MustCompile(`^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z ]+)\): (\S+)`)

// hvaReply matches gpa2hva: "Host virtual address for 0x100000 (pc.ram) is 0x7f..."
var hvaReply = regexp.MustCompile(`is (0x[0-9a-f]+)`)

// qmpMemoryMap builds the guest-physical map of the system address space.
func qmpMemoryMap(ctx context.Context, q Monitor) ([]procRange, error) {
	out, err := q.HMP(ctx, "info mtree -f")
	if err != nil {
		return nil, fmt.Errorf("read QEMU memory map: %w", err)
	}
	var rs []procRange
	inSystem := false
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "FlatView") {
			if inSystem {
				break // the system FlatView is done
			}
			continue
		}
		if strings.Contains(line, `AS "memory"`) {
			inSystem = true
			continue
		}
		if !inSystem {
			continue
		}
		m := flatRange.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		kind := m[3]
		if kind != "ram" && kind != "rom" && kind != "romd" {
			continue
		}
		start, _ := strconv.ParseUint(m[1], 16, 64)
		end, _ := strconv.ParseUint(m[2], 16, 64)
		if end < start {
			continue
		}
		reply, err := q.HMP(ctx, fmt.Sprintf("gpa2hva %#x", start))
		if err != nil {
			return nil, fmt.Errorf("gpa2hva %#x: %w", start, err)
		}
		h := hvaReply.FindStringSubmatch(reply)
		if h == nil {
			continue // not RAM-backed after all
		}
		hva, _ := strconv.ParseUint(h[1], 0, 64)
		rs = append(rs, procRange{GPA: start, Size: end - start + 1, HVA: hva, ReadOnly: kind != "ram", Name: m[4]})
	}
	if len(rs) == 0 {
		return nil, errors.New("QEMU reported no guest RAM in its memory map")
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].GPA < rs[j].GPA })
	return rs, nil
}

// Regions lists guest RAM and ROM.
func (t *TCG) Regions() []Region {
	rs, err := t.memoryMap(false)
	if err != nil {
		return nil
	}
	return rangesToRegions(rs)
}

// ReadAt reads guest physical memory.
func (t *TCG) ReadAt(p []byte, gpa int64) (int, error) {
	return t.io(p, gpa, false)
}

// WriteAt writes guest physical memory (only with allowWrite).
func (t *TCG) WriteAt(p []byte, gpa int64) (int, error) {
	if !t.write {
		return 0, ErrReadOnly
	}
	return t.io(p, gpa, true)
}

func (t *TCG) io(p []byte, gpa int64, write bool) (int, error) {
	rs, err := t.memoryMap(false)
	if err != nil {
		return 0, err
	}
	n, err := t.ioRanges(rs, p, gpa, write)
	var hole *HoleError
	if errors.As(err, &hole) {
		// The map may have changed (firmware remaps ROM early in boot).
		if rs, err2 := t.memoryMap(true); err2 == nil {
			return t.ioRanges(rs, p, gpa, write)
		}
	}
	return n, err
}

// ReadBatch does many small reads in few system calls (see BatchReader).
func (t *TCG) ReadBatch(reqs []PhysReq) {
	rs, err := t.memoryMap(false)
	if err != nil {
		readEach(t, reqs)
		return
	}
	t.memfd.readBatch(t.pid(), rs, reqs)
	// A hole may mean a stale map: ReadAt refreshes it and retries.
	for i := range reqs {
		var hole *HoleError
		if errors.As(reqs[i].Err, &hole) {
			_, reqs[i].Err = t.ReadAt(reqs[i].Buf, int64(reqs[i].GPA))
		}
	}
}

// ioRanges reads through a memfd mapping where there is one; writes always
// go through process_vm_writev (our mapping is read-only).
func (t *TCG) ioRanges(rs []procRange, p []byte, gpa int64, write bool) (int, error) {
	if write {
		return ioRanges(t.pid(), rs, p, gpa, true)
	}
	return t.memfd.readAt(t.pid(), rs, p, gpa)
}

// MemfdRegions lists the guest physical ranges that ReadAt serves from a
// read-only mapping of QEMU's memfd-backed guest RAM (see
// Live.MemfdRegions).
func (t *TCG) MemfdRegions() ([]Region, error) {
	rs, err := t.memoryMap(false)
	if err != nil {
		return nil, err
	}
	pid := t.pid()
	if pid == 0 {
		return nil, nil
	}
	return t.memfd.regions(pid, rs)
}

// Close releases the mappings of memfd-backed guest RAM (they keep the
// whole guest RAM alive after QEMU exits). The source stays usable.
func (t *TCG) Close() error {
	t.memfd.close()
	return nil
}

// CPUs returns the registers of every vCPU from `info registers -a`.
func (t *TCG) CPUs(ctx context.Context) ([]CPU, error) {
	if t.qmp == nil {
		return nil, errNoMonitor
	}
	out, err := t.qmp.HMP(ctx, "info registers -a")
	if err != nil {
		return nil, fmt.Errorf("read registers: %w", err)
	}
	return ParseInfoRegisters(out)
}

// regField matches "KEY=VALUE" pairs of `info registers`.
var regField = regexp.MustCompile(`([A-Z0-9]+)\s*=\s*([0-9a-f]+)`)

// ParseInfoRegisters parses HMP `info registers -a` output for x86-64.
func ParseInfoRegisters(out string) ([]CPU, error) {
	var cpus []CPU
	var cur *CPU
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "CPU#") {
			f := strings.Fields(line[4:])
			if len(f) == 0 {
				return nil, fmt.Errorf("bad CPU line %q", line)
			}
			id, err := strconv.Atoi(f[0])
			if err != nil {
				return nil, fmt.Errorf("bad CPU line %q", line)
			}
			cpus = append(cpus, CPU{ID: id})
			cur = &cpus[len(cpus)-1]
			continue
		}
		if cur == nil {
			if !regField.MatchString(line) {
				continue
			}
			// Single-CPU output ("info registers") has no CPU# header.
			cpus = append(cpus, CPU{})
			cur = &cpus[0]
		}
		// Segment lines: "CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]"
		if f := strings.Fields(strings.Replace(line, "=", " ", 1)); len(f) >= 5 && isSeg(f[0]) && len(f[1]) == 4 {
			base, _ := strconv.ParseUint(f[2], 16, 64)
			flags, _ := strconv.ParseUint(f[4], 16, 64)
			switch f[0] {
			case "CS":
				cur.CSBase = base
				cur.CSL = flags&(1<<21) != 0  // DESC_L_MASK
				cur.CSDB = flags&(1<<22) != 0 // DESC_B_MASK
			case "DS":
				cur.DSBase = base
			case "SS":
				cur.SSBase = base
			case "FS":
				cur.FSBase = base
			case "GS":
				cur.GSBase = base
			}
			continue
		}
		for _, m := range regField.FindAllStringSubmatch(line, -1) {
			v, err := strconv.ParseUint(m[2], 16, 64)
			if err != nil {
				continue
			}
			switch m[1] {
			case "RIP":
				cur.RIP = v
			case "IDT":
				// "IDT=     fffffe0000000000 00000fff": base, limit.
				cur.IDTBase = v
				if f := strings.Fields(line); len(f) >= 3 {
					l, _ := strconv.ParseUint(f[2], 16, 16)
					cur.IDTLimit = uint16(l)
				}
			case "RSP":
				cur.RSP = v
			case "RFL":
				cur.RFLAGS = v
			case "CR0":
				cur.CR0 = v
			case "CR2":
				cur.CR2 = v
			case "CR3":
				cur.CR3 = v
			case "CR4":
				cur.CR4 = v
			case "EFER":
				cur.EFER = v
			}
		}
	}
	if len(cpus) == 0 {
		return nil, errors.New("no CPU in QEMU's register dump")
	}
	return cpus, nil
}

func isSeg(s string) bool {
	switch s {
	case "ES", "CS", "SS", "DS", "FS", "GS":
		return true
	}
	return false
}

// Writable reports whether WriteAt may change guest memory.
func (t *TCG) Writable() bool { return t.write }
