package guestmem

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// mapMemfd maps read-only, into our process, the file range that QEMU (pid)
// maps at pm: the same file, the same offset, the same length (clipped to
// the file's size).
//
// The file is found through /proc/PID/fd: a fd whose link reads like the
// mapping's path and whose inode is the mapping's. QEMU keeps the fd of a
// memory backend open for the VM's life. Failing that, /proc/PID/map_files
// opens the mapping itself (the kernel allows that only with CAP_SYS_ADMIN
// or CAP_CHECKPOINT_RESTORE).
func mapMemfd(pid int, pm procMapping) (*memfdFile, error) {
	fd, err := openMappedFile(pid, pm)
	if err != nil {
		return nil, err
	}
	keep := false
	defer func() {
		if !keep {
			unix.Close(fd)
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("fstat %s: %w", pm.Path, err)
	}
	if !sameFile(&st, pm) {
		return nil, fmt.Errorf("%s changed while it was opened", pm.Path)
	}
	length := pm.End - pm.Start
	// Touching a mapped page beyond the end of the file raises SIGBUS, so
	// never map past it. QEMU seals its memfds against shrinking (seal=on
	// by default); copyMapped still turns a fault into an error.
	if size := uint64(max(st.Size, 0)); pm.Offset >= size {
		return nil, fmt.Errorf("%s: mapping at offset %#x lies beyond the file's end %#x", pm.Path, pm.Offset, size)
	} else if size-pm.Offset < length {
		length = (size - pm.Offset) &^ (uint64(os.Getpagesize()) - 1)
	}
	if length == 0 || length > 1<<47 {
		return nil, fmt.Errorf("%s: bad mapping length %#x", pm.Path, length)
	}
	// MAP_SHARED: we see QEMU's and the guest's writes as they happen.
	// PROT_READ: we can never write guest memory through this path.
	mem, err := unix.Mmap(fd, int64(pm.Offset), int(length), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %s: %w", pm.Path, err)
	}
	keep = true
	pages := (length + pageSize - 1) / pageSize
	return &memfdFile{mem: mem, fd: fd, off: pm.Offset, present: make([]atomic.Uint64, (pages+63)/64)}, nil
}

const pageSize = 4096

// has reports whether page i of f.mem is in the file, asking mincore(2)
// (which allocates nothing) the first time and remembering a yes: the
// guest does not give pages back often (a balloon or a discard punches
// holes; one punched after we saw the page is allocated again when read).
func (f *memfdFile) has(i uint64) bool {
	w, bit := &f.present[i/64], uint64(1)<<(i%64)
	if w.Load()&bit != 0 {
		return true
	}
	if !resident(f.mem[i*pageSize : i*pageSize+pageSize]) {
		return false
	}
	w.Or(bit)
	return true
}

// read copies len(dst) bytes at off in view v: from the mapping where the
// page is in the file, else with pread (see memfdFile).
func (v memfdView) read(dst []byte, off uint64) error {
	f := v.file
	for done := 0; done < len(dst); {
		at := v.base + off + uint64(done)
		page := at / pageSize
		n := min(len(dst)-done, int(pageSize-at%pageSize))
		if f.has(page) {
			copy(dst[done:done+n], f.mem[at:at+uint64(n)])
		} else if got, err := unix.Pread(f.fd, dst[done:done+n], int64(f.off+at)); err != nil || got != n {
			return fmt.Errorf("pread guest RAM at file offset %#x: %d bytes, %v", f.off+at, got, err)
		}
		done += n
	}
	return nil
}

// openMappedFile opens, read-only, the file behind QEMU's mapping pm.
func openMappedFile(pid int, pm procMapping) (int, error) {
	proc := filepath.Join("/proc", strconv.Itoa(pid))
	var firstErr error
	if ents, err := os.ReadDir(filepath.Join(proc, "fd")); err != nil {
		firstErr = fmt.Errorf("list QEMU's fds: %w", err)
	} else {
		for _, e := range ents {
			p := filepath.Join(proc, "fd", e.Name())
			if l, err := os.Readlink(p); err != nil || l != pm.Path {
				continue
			}
			// Opening the magic link reopens the memfd itself.
			fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				if firstErr == nil {
					firstErr = fmt.Errorf("open %s: %w", p, err)
				}
				continue
			}
			var st unix.Stat_t
			if unix.Fstat(fd, &st) == nil && sameFile(&st, pm) {
				return fd, nil
			}
			unix.Close(fd)
		}
	}
	p := filepath.Join(proc, "map_files", fmt.Sprintf("%x-%x", pm.Start, pm.End))
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err == nil {
		return fd, nil
	}
	if firstErr == nil {
		firstErr = fmt.Errorf("QEMU holds no fd of %s, and open %s: %w", pm.Path, p, err)
	}
	return -1, firstErr
}

// sameFile reports whether st is the file of mapping pm (device and inode).
func sameFile(st *unix.Stat_t, pm procMapping) bool {
	return st.Ino == pm.Inode && unix.Major(st.Dev) == pm.Major && unix.Minor(st.Dev) == pm.Minor
}

func (f *memfdFile) unmap() {
	if f.mem != nil {
		unix.Munmap(f.mem)
		f.mem = nil
		unix.Close(f.fd)
	}
}

// copyMapped copies len(dst) bytes at off of view v into dst. A fault while
// copying (the file was truncated under us: SIGBUS) becomes an error instead
// of killing the process, and the caller falls back to process_vm_readv.
func copyMapped(v memfdView, dst []byte, off uint64) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			err = fmt.Errorf("fault reading mapped guest RAM: %v", r)
		}
	}()
	return v.read(dst, off)
}

// copyMappedBatch copies, under one fault guard, every read of reqs that
// a mapping in views holds, and reports which it copied.
func copyMappedBatch(key []procRange, views []memfdView, reqs []PhysReq) (copied []bool, err error) {
	copied = make([]bool, len(reqs))
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			err = fmt.Errorf("fault reading mapped guest RAM: %v", r)
		}
	}()
	for i, r := range reqs {
		if v, off, ok := mappedView(key, views, r); ok {
			copied[i] = v.read(r.Buf, off) == nil
		}
	}
	return copied, nil
}
