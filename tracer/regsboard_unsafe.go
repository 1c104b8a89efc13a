//go:build linux && amd64

package tracer

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// RegsBoard is a memfd in which the tracer publishes every register
// snapshot it takes at a vCPU's kick stop, so that another process (the
// analysis process, tracer/handoff) can kick a vCPU and read what the
// stop copied without a round trip through the tracer's process: the
// kick goes straight to QEMU's vCPU thread and the reader sleeps on the
// slot's sequence number (a futex in the shared page) until the tracer
// has written it.
//
// A slot is a seqlock: the sequence number is odd while the tracer
// writes, and a reader that sees it change during its copy copies again.
type RegsBoard struct {
	f   *os.File
	mem []byte
}

// The board has a slot per vCPU id up to boardSlots; a vCPU with a
// higher id is read through the tracer's process instead.
const (
	boardSlots = 1024
	boardSlot  = 512 // seq (uint32, padded to 8), at (int64 ns), SyncRegs
	boardRegs  = 16
)

// futex(2) operations, on a shared (not private) futex: the reader is
// another process.
const (
	futexWait = 0
	futexWake = 1
)

// A slot holds SyncRegs (compile-time check: negative if not).
const _ = uint(boardSlot - boardRegs - unsafe.Sizeof(SyncRegs{}))

// NewRegsBoard makes an empty board, for the tracer (VM.Publish).
func NewRegsBoard() (*RegsBoard, error) {
	fd, err := unix.MemfdCreate("kvmscope-regs", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("register board: %w", err)
	}
	f := os.NewFile(uintptr(fd), "kvmscope-regs")
	if err := f.Truncate(boardSlots * boardSlot); err != nil {
		f.Close()
		return nil, fmt.Errorf("register board: %w", err)
	}
	return mapBoard(f, unix.PROT_READ|unix.PROT_WRITE)
}

// OpenRegsBoard maps the board f (from NewRegsBoard's File, passed to
// another process) for reading.
func OpenRegsBoard(f *os.File) (*RegsBoard, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("register board: %w", err)
	}
	if st.Size() != boardSlots*boardSlot {
		return nil, fmt.Errorf("register board: %d bytes, want %d", st.Size(), boardSlots*boardSlot)
	}
	return mapBoard(f, unix.PROT_READ)
}

func mapBoard(f *os.File, prot int) (*RegsBoard, error) {
	mem, err := unix.Mmap(int(f.Fd()), 0, boardSlots*boardSlot, prot, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("register board: mmap: %w", err)
	}
	return &RegsBoard{f: f, mem: mem}, nil
}

// File is the board's memfd, to hand to another process.
func (b *RegsBoard) File() *os.File { return b.f }

// Close unmaps the board.
func (b *RegsBoard) Close() error {
	unix.Munmap(b.mem)
	return b.f.Close()
}

func (b *RegsBoard) seq(id int) *uint32 {
	return (*uint32)(unsafe.Pointer(&b.mem[id*boardSlot]))
}

// publish writes a snapshot of vCPU id and wakes its readers. Called by
// the tracer thread only (one writer).
func (b *RegsBoard) publish(id int, r SyncRegs, at time.Time) {
	if id < 0 || id >= boardSlots {
		return
	}
	p := b.seq(id)
	s := atomic.LoadUint32(p)
	atomic.StoreUint32(p, s+1)
	slot := b.mem[id*boardSlot:]
	*(*int64)(unsafe.Pointer(&slot[8])) = at.UnixNano()
	*(*SyncRegs)(unsafe.Pointer(&slot[boardRegs])) = r
	atomic.StoreUint32(p, s+2)
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(p)), futexWake, 1<<30, 0, 0, 0)
}

// read copies the snapshot of vCPU id, with its sequence number.
func (b *RegsBoard) read(id int) (seq uint32, r SyncRegs, at time.Time) {
	p := b.seq(id)
	slot := b.mem[id*boardSlot:]
	for {
		s := atomic.LoadUint32(p)
		if s&1 == 0 {
			ns := *(*int64)(unsafe.Pointer(&slot[8]))
			r = *(*SyncRegs)(unsafe.Pointer(&slot[boardRegs]))
			if atomic.LoadUint32(p) == s {
				return s, r, time.Unix(0, ns)
			}
		}
	}
}

// wait sleeps until vCPU id's sequence number is no longer old, or d
// passes; it reports whether it changed.
func (b *RegsBoard) wait(ctx context.Context, id int, old uint32, d time.Duration) bool {
	p := b.seq(id)
	deadline := time.Now().Add(d)
	for atomic.LoadUint32(p) == old {
		left := time.Until(deadline)
		if left <= 0 || ctx.Err() != nil {
			return false
		}
		ts := unix.NsecToTimespec(int64(min(left, time.Millisecond)))
		unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(p)), futexWait, uintptr(old), uintptr(unsafe.Pointer(&ts)), 0, 0)
	}
	return true
}

// Sample kicks vCPU id, run by thread tid of QEMU pid, and returns the
// registers the tracer copied at the kick's stop (Fresh). ok is false when
// the vCPU did not answer (QEMU holds it outside KVM_RUN, or it is not on
// the board): then ask the tracer (VM.Registers).
func (b *RegsBoard) Sample(ctx context.Context, pid, tid, id int) (s Sample, ok bool, err error) {
	if id < 0 || id >= boardSlots {
		return s, false, nil
	}
	answered, err := kickUntil(ctx, pid, tid, func() func(context.Context) bool {
		old := atomic.LoadUint32(b.seq(id))
		return func(ctx context.Context) bool { return b.wait(ctx, id, old, kickTimeout) }
	})
	if err != nil || !answered {
		return s, false, err
	}
	_, r, at := b.read(id)
	return Sample{ID: id, Regs: r, At: at, Fresh: true}, true, nil
}
