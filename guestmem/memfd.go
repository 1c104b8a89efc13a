package guestmem

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Guest RAM that QEMU backs with a memfd (-object memory-backend-memfd,
// libvirt's <memoryBacking><source type='memfd'/>) is a shmem file that QEMU
// maps MAP_SHARED. We map the same file read-only into our own process and
// serve reads with a plain copy from that mapping: no system call per read,
// no page-table walk of QEMU's mm (process_vm_readv pins every page with
// get_user_pages). Everything else (anonymous RAM, ROMs, a private mapping of
// a file) keeps going through process_vm_readv.
//
// The mapping is of the file, not of QEMU's address space, so it stays valid
// whatever QEMU later does with its own mappings; the slot-to-file
// association is rebuilt whenever the memslot table changes.

// memfdRAM caches, for one memslot table, which slots are memfd-backed and
// our read-only mapping of each backing file. The zero value is ready to use.
type memfdRAM struct {
	// mu is held for reading while a read copies from a mapping and for
	// writing while mappings are replaced, so that no copy ever touches an
	// unmapped range.
	mu    sync.RWMutex
	pid   int
	key   []procRange                // the slot table the views were built for
	views []memfdView                // one per element of key
	files map[procMapping]*memfdFile // our mappings, by QEMU's mapping
	err   error                      // why memfd-backed RAM could not be mapped
	built bool
	// faults counts copies from a mapping that faulted (the memfd shrank
	// under us) and were served by process_vm_readv instead.
	faults atomic.Uint64
}

// memfdView is the part of a mapped memfd that backs one memslot; data is
// nil for a slot that is not memfd-backed.
type memfdView struct {
	data []byte
	name string
	file *memfdFile // the mapping data is part of
	base uint64     // where data starts in file.mem
}

// memfdFile is our read-only mapping of the same file range that QEMU maps
// at Start..End, and the file itself, for the pages not known to be there.
//
// A read fault on a hole of a shared memfd mapping allocates the page (the
// guest's RAM would grow on the host by every page a scan reads that the
// guest never touched), so a page is copied from the mapping only once
// mincore(2) has found it in the file; any other is read with pread(2),
// which reads a hole as zeros without allocating and a swapped-out page as
// it is.
type memfdFile struct {
	mem     []byte
	fd      int
	off     uint64          // the file offset of mem[0]
	present []atomic.Uint64 // a bit per page of mem: found in the file
}

// procMapping is one line of /proc/PID/maps (see proc(5)).
type procMapping struct {
	Start, End   uint64
	Perms        string
	Offset       uint64
	Major, Minor uint32
	Inode        uint64
	Path         string
}

// isSharedMemfd reports whether QEMU maps a memfd here with MAP_SHARED. A
// private (copy-on-write) mapping of a memfd diverges from the file as soon
// as QEMU writes, so only shared mappings may be read through the file.
func (m procMapping) isSharedMemfd() bool {
	return len(m.Perms) == 4 && m.Perms[3] == 's' &&
		strings.HasPrefix(m.Path, "/memfd:") && m.Inode != 0
}

// maxMapsLine and maxMaps bound what parseProcMaps accepts. A path is at most
// PATH_MAX (4096) bytes; QEMU has a few hundred mappings, the kernel allows
// vm.max_map_count (65530 by default).
const (
	maxMapsLine = 4096 + 256
	maxMaps     = 1 << 20
)

// parseProcMaps parses /proc/PID/maps, whose lines are
// "start-end perms offset major:minor inode   path" with hex numbers except
// the decimal inode; the path may contain spaces and may be absent.
func parseProcMaps(r io.Reader) ([]procMapping, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxMapsLine)
	var out []procMapping
	for line := 1; sc.Scan(); line++ {
		if len(out) >= maxMaps {
			return nil, fmt.Errorf("maps: more than %d mappings", maxMaps)
		}
		m, err := parseMapsLine(sc.Text())
		if err != nil {
			return nil, fmt.Errorf("maps line %d: %w", line, err)
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("maps: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Start < out[j].Start })
	return out, nil
}

func parseMapsLine(s string) (procMapping, error) {
	var m procMapping
	rest := s
	field := func() string {
		rest = strings.TrimLeft(rest, " ")
		i := strings.IndexByte(rest, ' ')
		if i < 0 {
			f := rest
			rest = ""
			return f
		}
		f := rest[:i]
		rest = rest[i+1:]
		return f
	}
	rng, perms, off, dev, ino := field(), field(), field(), field(), field()
	lo, hi, ok := strings.Cut(rng, "-")
	if !ok {
		return m, fmt.Errorf("bad address range %q", rng)
	}
	var err error
	if m.Start, err = strconv.ParseUint(lo, 16, 64); err != nil {
		return m, fmt.Errorf("bad start address %q", lo)
	}
	if m.End, err = strconv.ParseUint(hi, 16, 64); err != nil {
		return m, fmt.Errorf("bad end address %q", hi)
	}
	if m.End < m.Start {
		return m, fmt.Errorf("range %q ends before it starts", rng)
	}
	if len(perms) != 4 {
		return m, fmt.Errorf("bad permissions %q", perms)
	}
	m.Perms = perms
	if m.Offset, err = strconv.ParseUint(off, 16, 64); err != nil {
		return m, fmt.Errorf("bad offset %q", off)
	}
	maj, mnr, ok := strings.Cut(dev, ":")
	if !ok {
		return m, fmt.Errorf("bad device %q", dev)
	}
	v, err := strconv.ParseUint(maj, 16, 32)
	if err != nil {
		return m, fmt.Errorf("bad device major %q", maj)
	}
	m.Major = uint32(v)
	if v, err = strconv.ParseUint(mnr, 16, 32); err != nil {
		return m, fmt.Errorf("bad device minor %q", mnr)
	}
	m.Minor = uint32(v)
	if m.Inode, err = strconv.ParseUint(ino, 10, 64); err != nil {
		return m, fmt.Errorf("bad inode %q", ino)
	}
	m.Path = strings.TrimLeft(rest, " ")
	return m, nil
}

// findMapping returns the mapping of sorted maps that holds all of
// [addr, addr+size), if one does.
func findMapping(maps []procMapping, addr, size uint64) (procMapping, bool) {
	i := sort.Search(len(maps), func(i int) bool { return maps[i].End > addr })
	if i == len(maps) {
		return procMapping{}, false
	}
	m := maps[i]
	if addr < m.Start || size > m.End-addr {
		return procMapping{}, false
	}
	return m, true
}

// current reports whether the views were built for pid and rs.
// Precondition: m.mu held (either way).
func (m *memfdRAM) current(pid int, rs []procRange) bool {
	if !m.built || m.pid != pid || len(m.key) != len(rs) {
		return false
	}
	for i := range rs {
		if rs[i] != m.key[i] {
			return false
		}
	}
	return true
}

// refresh rebuilds the views for pid's slot table rs unless they are
// current: it reads QEMU's mappings, maps each memfd that backs a slot and
// unmaps the ones no slot uses any more.
func (m *memfdRAM) refresh(pid int, rs []procRange) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.current(pid, rs) {
		return
	}
	if m.pid != pid {
		m.unmapAll()
	}
	m.pid, m.key, m.built, m.err = pid, append([]procRange(nil), rs...), true, nil
	m.views = make([]memfdView, len(rs))
	used := map[procMapping]bool{}
	defer func() {
		for k, f := range m.files {
			if !used[k] {
				f.unmap()
				delete(m.files, k)
			}
		}
	}()
	maps, err := readProcMaps(pid)
	if err != nil {
		m.err = err
		return
	}
	var errs []error
	for i, r := range rs {
		pm, ok := findMapping(maps, r.HVA, r.Size)
		if !ok || !pm.isSharedMemfd() {
			continue
		}
		f, ok := m.files[pm]
		if !ok {
			f, err = mapMemfd(pid, pm)
			if err != nil {
				errs = append(errs, fmt.Errorf("guest physical %#x: %w", r.GPA, err))
				continue
			}
			if m.files == nil {
				m.files = map[procMapping]*memfdFile{}
			}
			m.files[pm] = f
		}
		used[pm] = true
		off := r.HVA - pm.Start
		if off > uint64(len(f.mem)) || r.Size > uint64(len(f.mem))-off {
			// The file is shorter than QEMU's mapping (see mapMemfd).
			continue
		}
		m.views[i] = memfdView{data: f.mem[off : off+r.Size : off+r.Size], name: strings.TrimPrefix(strings.TrimSuffix(pm.Path, " (deleted)"), "/"), file: f, base: off}
	}
	m.err = errors.Join(errs...)
}

// unmapAll drops every mapping. Precondition: m.mu held for writing.
func (m *memfdRAM) unmapAll() {
	for k, f := range m.files {
		f.unmap()
		delete(m.files, k)
	}
	m.views = nil
	m.key = nil
	m.built = false
}

func readProcMaps(pid int) ([]procMapping, error) {
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "maps"))
	if err != nil {
		return nil, fmt.Errorf("QEMU's mappings: %w", err)
	}
	defer f.Close()
	return parseProcMaps(f)
}

// readAt reads p at gpa from pid through the slot table rs: from our
// mapping where a slot is memfd-backed, else with process_vm_readv. Same
// contract as readRanges.
func (m *memfdRAM) readAt(pid int, rs []procRange, p []byte, gpa int64) (int, error) {
	if gpa < 0 {
		return 0, fmt.Errorf("negative guest physical address %#x", gpa)
	}
	if pid == 0 {
		return 0, fmt.Errorf("the VM has not been created yet")
	}
	m.rlockCurrent(pid, rs)
	defer m.mu.RUnlock()
	// Use the table the views belong to: rs, or an even newer one another
	// reader installed meanwhile.
	rs, views := m.key, m.views
	done := 0
	addr := uint64(gpa)
	for done < len(p) {
		i, ok := findRangeIndex(rs, addr)
		if !ok {
			return done, &HoleError{GPA: addr}
		}
		r := rs[i]
		off := addr - r.GPA
		n := min(uint64(len(p)-done), r.Size-off, maxIO)
		dst := p[done : done+int(n)]
		served := false
		if v := views[i]; v.data != nil {
			if copyMapped(v, dst, off) == nil {
				served = true
			} else {
				m.faults.Add(1)
			}
		}
		if !served {
			if err := procIO(pid, r.HVA+off, dst, false); err != nil {
				return done, fmt.Errorf("guest physical %#x: %w", addr, err)
			}
		}
		done += int(n)
		addr += n
	}
	return done, nil
}

// findRangeIndex is findRange returning the index.
func findRangeIndex(rs []procRange, addr uint64) (int, bool) {
	i := sort.Search(len(rs), func(i int) bool { return rs[i].GPA+rs[i].Size > addr })
	if i == len(rs) || addr < rs[i].GPA {
		return 0, false
	}
	return i, true
}

// regions lists the slots of the current table that are served from a
// mapping, and why memfd-backed RAM could not be mapped, if it could not.
func (m *memfdRAM) regions(pid int, rs []procRange) ([]Region, error) {
	m.refresh(pid, rs)
	m.mu.RLock()
	defer m.mu.RUnlock()
	var out []Region
	for i, v := range m.views {
		if v.data != nil {
			r := m.key[i]
			out = append(out, Region{GPA: r.GPA, Size: r.Size, ReadOnly: r.ReadOnly, Name: v.name})
		}
	}
	return out, m.err
}

// close unmaps everything.
func (m *memfdRAM) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.unmapAll()
	m.err = nil
}

// readBatch does reqs from pid through the slot table rs: the reads that
// lie in one memfd-backed slot are copies from our mappings, made under
// one lock and one fault guard for the whole batch (a read costs about a
// copy, not a lookup and a guard of its own); the rest go in batched
// process_vm_readv calls.
func (m *memfdRAM) readBatch(pid int, rs []procRange, reqs []PhysReq) {
	m.rlockCurrent(pid, rs)
	copied, err := copyMappedBatch(m.key, m.views, reqs)
	if err != nil {
		// A mapping faulted (the memfd shrank under us): every read goes
		// through process_vm_readv.
		m.faults.Add(1)
		clear(copied)
	}
	m.mu.RUnlock()
	var rest []PhysReq
	var idx []int
	for i := range reqs {
		if !copied[i] {
			rest = append(rest, PhysReq{GPA: reqs[i].GPA, Buf: reqs[i].Buf})
			idx = append(idx, i)
		}
	}
	if len(rest) == 0 {
		return
	}
	readBatchRanges(pid, rs, rest)
	for k, i := range idx {
		reqs[i].Err = rest[k].Err
	}
}

// mappedView returns the view of our mapping that holds r, and r's offset
// in it, if one does.
func mappedView(key []procRange, views []memfdView, r PhysReq) (memfdView, uint64, bool) {
	j, ok := findRangeIndex(key, r.GPA)
	if !ok || views[j].data == nil || r.GPA+uint64(len(r.Buf)) > key[j].GPA+key[j].Size {
		return memfdView{}, 0, false
	}
	return views[j], r.GPA - key[j].GPA, true
}

// rlockCurrent takes m.mu for reading with the views built for rs (or a
// newer table another reader installed meanwhile).
func (m *memfdRAM) rlockCurrent(pid int, rs []procRange) {
	m.mu.RLock()
	if !m.current(pid, rs) {
		m.mu.RUnlock()
		m.refresh(pid, rs)
		m.mu.RLock()
	}
}
