package guestmem

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// procRange maps guest physical memory GPA..GPA+Size to QEMU's virtual
// addresses HVA.. in its process.
type procRange struct {
	GPA, Size, HVA uint64
	ReadOnly       bool
	Name           string
}

func rangesToRegions(rs []procRange) []Region {
	out := make([]Region, 0, len(rs))
	for _, r := range rs {
		out = append(out, Region{GPA: r.GPA, Size: r.Size, ReadOnly: r.ReadOnly, Name: r.Name})
	}
	return out
}

// maxIO bounds one process_vm_readv call; larger requests loop.
const maxIO = 1 << 30

// readRanges reads p at gpa from process pid through the sorted ranges rs,
// crossing range boundaries; a gap is a *HoleError.
func readRanges(pid int, rs []procRange, p []byte, gpa int64) (int, error) {
	return ioRanges(pid, rs, p, gpa, false)
}

func ioRanges(pid int, rs []procRange, p []byte, gpa int64, write bool) (int, error) {
	if gpa < 0 {
		return 0, fmt.Errorf("negative guest physical address %#x", gpa)
	}
	if pid == 0 {
		return 0, fmt.Errorf("the VM has not been created yet")
	}
	done := 0
	addr := uint64(gpa)
	for done < len(p) {
		r, ok := findRange(rs, addr)
		if !ok {
			return done, &HoleError{GPA: addr}
		}
		if write && r.ReadOnly {
			return done, fmt.Errorf("guest physical address %#x is read-only memory (ROM)", addr)
		}
		off := addr - r.GPA
		n := min(uint64(len(p)-done), r.Size-off, maxIO)
		if err := procIO(pid, r.HVA+off, p[done:done+int(n)], write); err != nil {
			return done, fmt.Errorf("guest physical %#x: %w", addr, err)
		}
		done += int(n)
		addr += n
	}
	return done, nil
}

// findRange finds the range holding addr by binary search.
func findRange(rs []procRange, addr uint64) (procRange, bool) {
	lo, hi := 0, len(rs)
	for lo < hi {
		m := (lo + hi) / 2
		switch {
		case addr < rs[m].GPA:
			hi = m
		case addr >= rs[m].GPA+rs[m].Size:
			lo = m + 1
		default:
			return rs[m], true
		}
	}
	return procRange{}, false
}

// procIO copies between b and pid's memory at hva with
// process_vm_readv/writev, which need no stop of QEMU.
func procIO(pid int, hva uint64, b []byte, write bool) error {
	for len(b) > 0 {
		local := []unix.Iovec{{Base: &b[0]}}
		local[0].SetLen(len(b))
		remote := []unix.RemoteIovec{{Base: uintptr(hva), Len: len(b)}}
		var n int
		var err error
		if write {
			n, err = unix.ProcessVMWritev(pid, local, remote, 0)
		} else {
			n, err = unix.ProcessVMReadv(pid, local, remote, 0)
		}
		if err != nil {
			return fmt.Errorf("QEMU memory at %#x: %w", hva, err)
		}
		if n == 0 {
			return fmt.Errorf("QEMU memory at %#x: nothing transferred", hva)
		}
		b = b[n:]
		hva += uint64(n)
	}
	return nil
}

// iovMax is the most ranges one process_vm_readv takes (UIO_MAXIOV).
const iovMax = 1024

// readBatchRanges does reqs from process pid through the sorted ranges rs,
// up to iovMax reads per process_vm_readv. A read that spans ranges, or
// that a call did not complete, is retried alone so its error is precise.
func readBatchRanges(pid int, rs []procRange, reqs []PhysReq) {
	var single []int
	local := make([]unix.Iovec, 0, iovMax)
	remote := make([]unix.RemoteIovec, 0, iovMax)
	var batch []int
	flush := func() {
		if len(batch) == 0 {
			return
		}
		n, _ := unix.ProcessVMReadv(pid, local, remote, 0)
		// The kernel stops at the first range it cannot read: the reads
		// before it are complete.
		for _, i := range batch {
			if n >= len(reqs[i].Buf) {
				n -= len(reqs[i].Buf)
				continue
			}
			n = 0
			single = append(single, i)
		}
		local, remote, batch = local[:0], remote[:0], batch[:0]
	}
	for i := range reqs {
		r := &reqs[i]
		if len(r.Buf) == 0 {
			continue
		}
		rg, ok := findRange(rs, r.GPA)
		if !ok || r.GPA+uint64(len(r.Buf)) > rg.GPA+rg.Size || pid == 0 {
			single = append(single, i)
			continue
		}
		iov := unix.Iovec{Base: &r.Buf[0]}
		iov.SetLen(len(r.Buf))
		local = append(local, iov)
		remote = append(remote, unix.RemoteIovec{Base: uintptr(rg.HVA + r.GPA - rg.GPA), Len: len(r.Buf)})
		batch = append(batch, i)
		if len(batch) == iovMax {
			flush()
		}
	}
	flush()
	for _, i := range single {
		if _, err := readRanges(pid, rs, reqs[i].Buf, int64(reqs[i].GPA)); err != nil {
			reqs[i].Err = err
		}
	}
}
