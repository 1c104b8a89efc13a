package guestmem

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ErrMapUnverified is a memory map from QMP that does not match the QEMU
// process's own mappings.
var ErrMapUnverified = errors.New("the guest memory map from QMP does not match QEMU's own mappings")

// VerifyMap checks the memory map QMP gave against the QEMU process: every
// guest RAM range must lie inside one of its mappings (/proc/PID/maps). A
// QMP socket of another QEMU fails here, before anything is read.
func (t *TCG) VerifyMap() error {
	rs, err := t.memoryMap(false)
	if err != nil {
		return err
	}
	pid := t.pid()
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return fmt.Errorf("QEMU %d: %w", pid, err)
	}
	defer f.Close()
	type span struct{ lo, hi uint64 }
	var maps []span
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		r, _, _ := strings.Cut(sc.Text(), " ")
		lo, hi, ok := strings.Cut(r, "-")
		a, err1 := strconv.ParseUint(lo, 16, 64)
		b, err2 := strconv.ParseUint(hi, 16, 64)
		if !ok || err1 != nil || err2 != nil {
			continue
		}
		// Adjacent mappings (one RAM block split by madvise or
		// mprotect) count as one.
		if n := len(maps); n > 0 && maps[n-1].hi == a {
			maps[n-1].hi = b
		} else {
			maps = append(maps, span{a, b})
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("QEMU %d: maps: %w", pid, err)
	}
	for _, r := range rs {
		in := false
		for _, m := range maps {
			if r.HVA >= m.lo && r.HVA+r.Size <= m.hi {
				in = true
				break
			}
		}
		if !in {
			return fmt.Errorf("%w: %s (%#x bytes at guest %#x, host %#x) is in no mapping of process %d", ErrMapUnverified, r.Name, r.Size, r.GPA, r.HVA, pid)
		}
	}
	return nil
}
